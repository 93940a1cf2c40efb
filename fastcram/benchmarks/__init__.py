"""`fastcram bench`: kernel microbenchmarks (kernels.py with one cases_<op>.py per op), the end-to-end step
benchmark (step.py), the compile report, the speedrun, plots and the GPU report. Sits above train: may import
train, model, ops, data, observe, config, errors and files; never glue, export or cli (nothing below imports it).
"""
