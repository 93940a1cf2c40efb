"""Exports of a trained run for other libraries: `fastcram export hf` (Hugging Face transformers)."""
