"""Helpers for testing parallel code on CPU with gloo."""

from pretrain.testing.distributed import run_distributed

__all__ = ["run_distributed"]
