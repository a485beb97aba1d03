"""Pretraining of Llama-style decoder language models on DeepSpeed."""

__version__ = "0.1.0"
