"""Exports of a trained run for other libraries: `fastcram export hf` (Hugging Face transformers): run.py reads
the run, hf.py writes the folder and checks its logits, hf_tokenizer.py the tokenizer files, hf_template/ the
modeling code. May import train, model, ops, data, observe, config, errors and files; never glue, benchmarks or cli.
"""
