"""GLUE fine-tuning and scoring of a pretrained run (`fastcram eval glue`): finetune.py drives it, data.py
reads the tasks, metrics.py scores them. Sits above train (it reuses its checkpoints and model builder): may
import train, model, ops, data, observe, config, errors and files; never benchmarks, export or cli.
"""
