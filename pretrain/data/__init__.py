"""Token sources and the deterministic, rank-independent batch order."""

from __future__ import annotations

import numpy as np

from pretrain.config import DataConfig
from pretrain.data.builtin import ByteTokenizer, stdlib_tokens
from pretrain.data.loader import DistributedBatches, GlobalOrder, PackedSamples

__all__ = ["ByteTokenizer", "DistributedBatches", "GlobalOrder", "PackedSamples", "load_tokens"]


def load_tokens(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(train tokens, validation tokens, tokenizer vocabulary size) for the configured source."""
    if cfg.source == "python-stdlib":
        train, val = stdlib_tokens(cfg.validation_fraction)
        return train, val, ByteTokenizer.vocab_size
    raise ValueError(f"data.source {cfg.source!r} is unknown; the built-in source is 'python-stdlib'")
