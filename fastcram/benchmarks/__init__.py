"""`fastcram bench`: kernel microbenchmarks (kernels.py with one cases_<op>.py per op), the end-to-end step
benchmark (step.py), plots and the GPU report. Sits above train; nothing below imports it.
"""
