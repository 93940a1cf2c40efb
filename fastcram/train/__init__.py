"""The budget loop and what it needs: loop.py reads top-down (data -> model -> compiled step -> clock ->
checkpoint -> summary); start.py, run_folder.py, step.py, schedule.py, evaluate.py, run_checkpoints.py,
checkpoint.py, autotune.py and distributed.py serve it.
May import model, ops, data, observe, config, errors and files; never glue, benchmarks, export or cli.
"""
