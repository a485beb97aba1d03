"""Open a prepared dataset (manifest + Megatron-format shards) as train and validation samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.config import DataConfig
from pretrain.data.checks import check_training_samples, dataset_name, training_cut
from pretrain.data.loader import PackedSamples, TokenStream

if TYPE_CHECKING:
    from pretrain.data.indexed import IndexedDataset
    from pretrain.data.manifest import Manifest


@dataclass
class OpenedDataset:
    name: str
    train: PackedSamples
    validation: PackedSamples
    vocab_size: int
    eod_id: int
    tokenizer_hash: str
    fingerprint: str  # of the shards' checksums in the manifest: changes when the data is re-prepared


def open_dataset(path: str, cfg: DataConfig, seq_len: int) -> OpenedDataset:
    """Validate the dataset at `path` against its manifest (sizes always, sha256 if asked), memory-map
    its shards (a remote dataset's: read through the node's cache), and hold out its last
    validation_fraction of tokens for validation."""
    from pretrain.data.manifest import check_vocabulary, recorded_tokenizer

    manifest, shards = _open_shards(path, cfg)
    tokenizer = recorded_tokenizer(manifest)
    if tokenizer is not None:
        check_vocabulary(manifest, path, tokenizer)
    # Shards named as configured (a remote dataset's URL, not the cache): that is what to re-prepare.
    names = [f"{path.rstrip('/')}/{shard.prefix}.bin" for shard in manifest.shards]
    stream = TokenStream([shard.tokens for shard in shards], names, [shard.sizes for shard in shards])
    total = len(stream)
    cut = training_cut(total, cfg.validation_fraction)
    check_training_samples(path, total, cut, seq_len, cfg.validation_fraction)
    from pretrain.data.block_order import shuffle_blocks
    from pretrain.data.remote import is_remote

    blocks = shuffle_blocks(cfg, is_remote(path), seq_len, shards[0].dtype.itemsize)
    return OpenedDataset(
        dataset_name(path),
        PackedSamples(stream, seq_len, 0, cut, blocks),
        PackedSamples(stream, seq_len, cut, total),
        manifest.vocab_size,
        manifest.eod_id,
        manifest.tokenizer_hash,
        _fingerprint([f"{r.prefix}:{r.bin_sha256}:{r.idx_sha256}" for r in manifest.shards]),
    )


def _open_shards(path: str, cfg: DataConfig) -> tuple[Manifest, list[IndexedDataset]]:
    from pretrain.data.indexed import IndexedDataset
    from pretrain.data.manifest import verify
    from pretrain.data.remote import is_remote
    from pretrain.data.remote_dataset import open_remote

    if is_remote(path):
        manifest, shards, _ = open_remote(path, cfg)
        return manifest, shards
    manifest = verify(Path(path), checksums=cfg.verify_checksums)
    return manifest, [IndexedDataset(Path(path) / shard.prefix) for shard in manifest.shards]


def _fingerprint(items: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
