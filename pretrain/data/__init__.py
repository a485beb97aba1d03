"""Token sources, the shard format, and the deterministic, rank-independent batch order."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import DataConfig
from pretrain.data.builtin import ByteTokenizer, stdlib_tokens
from pretrain.data.checks import check_one_tokenizer, check_training_samples, unreadable
from pretrain.data.loader import BlendSchedule, DistributedBatches, GlobalOrder, PackedSamples, TokenStream
from pretrain.errors import DataError

__all__ = [
    "BlendSchedule",
    "ByteTokenizer",
    "DataError",
    "DistributedBatches",
    "GlobalOrder",
    "PackedSamples",
    "TokenStream",
    "TrainingData",
    "load_training_data",
]

BUILTIN_NAME = "python-stdlib"


@dataclass
class TrainingData:
    names: list[str]
    train: list[PackedSamples]
    validation: list[PackedSamples]
    weights: list[float] | None
    vocab_size: int  # of the tokenizer the data was made with
    eod_id: int
    tokenizer_hash: str | None  # None for the built-in byte-level corpus
    fingerprints: list[str]  # one per dataset, from its manifest: a re-prepared dataset gets a new one

    def identity(self) -> dict[str, object]:
        """What a checkpoint records of its data, and a resume compares."""
        return {
            "datasets": self.names,
            "tokenizer_hash": self.tokenizer_hash,
            "fingerprints": self.fingerprints,
        }


def load_training_data(cfg: DataConfig, seq_len: int) -> TrainingData:
    """Open every configured dataset (or the built-in corpus) and split off its validation tail."""
    from pretrain.data.block_order import shuffle_blocks

    if not cfg.paths:
        train, val = stdlib_tokens(cfg.validation_fraction)
        check_training_samples(
            BUILTIN_NAME, len(train) + len(val), len(train), seq_len, cfg.validation_fraction
        )
        return TrainingData(
            [BUILTIN_NAME],
            [
                PackedSamples(
                    train, seq_len, shuffle_blocks=shuffle_blocks(cfg, False, seq_len, train.itemsize)
                )
            ],
            [PackedSamples(val, seq_len)],
            None,
            ByteTokenizer.vocab_size,
            ByteTokenizer.eod_id,
            None,
            [f"builtin:{len(train)}"],
        )
    from pretrain.data.shards import open_dataset

    opened = []
    for path in cfg.paths:
        try:
            opened.append(open_dataset(path, cfg, seq_len))
        except OSError as e:
            raise unreadable(path, e) from e
    check_one_tokenizer([d.name for d in opened], [d.tokenizer_hash for d in opened])
    return TrainingData(
        [d.name for d in opened],
        [d.train for d in opened],
        [d.validation for d in opened],
        cfg.weights,
        max(d.vocab_size for d in opened),
        opened[0].eod_id,
        opened[0].tokenizer_hash,
        [d.fingerprint for d in opened],
    )
