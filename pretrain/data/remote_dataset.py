"""A remote dataset opened for training: its manifest and `.idx` files fetched once per node into the
cache (by the first rank of the node to take the dataset's file lock; the others wait on the lock,
not in a collective), checked against the manifest's sha256, and its `.bin` files read on demand
through the chunk cache (pretrain/data/remote_cache.py).

What is verified: every cached `.idx` by its sha256 in the manifest (when fetched; a stamp beside
it records the check, so the node's other ranks and later runs trust it while the file is unchanged);
every chunk of a `.bin` by its size; and with data.verify_checksums, each `.bin` by a streaming
sha256 of the whole remote file (reads the dataset once, on the rank asked to verify)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.config.data import DataConfig, parse_size
from pretrain.data.indexed import IndexedDataset, ShardError
from pretrain.data.manifest import MANIFEST, Manifest, ShardRecord, parse_manifest, require_tokens
from pretrain.data.remote import (
    RemoteDataError,
    RetryPolicy,
    default_cache_dir,
    install_bytes,
    node_lock,
    open_filesystem,
    read_bytes,
)
from pretrain.data.remote_cache import ChunkCache, RemoteBin
from pretrain.logs import get_logger

log = get_logger(__name__)

RE_UPLOAD = "the remote copy changed or is damaged: re-upload the dataset (or re-run prepare and upload it)"


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def open_remote(url: str, cfg: DataConfig) -> tuple[Manifest, list[IndexedDataset], ChunkCache]:
    """The manifest and shards of the dataset at `url`, the shards' tokens read through the cache."""
    policy = RetryPolicy.of(cfg)
    fs, root = open_filesystem(url, policy)
    base, url = root.rstrip("/"), url.rstrip("/")
    local = cache_root(cfg) / hashlib.sha256(url.encode()).hexdigest()[:16]
    with node_lock(local / ".lock"):
        manifest = require_tokens(url, _node_manifest(fs, base, url, local, policy))
        for shard in manifest.shards:
            _node_idx(fs, f"{base}/{shard.prefix}.idx", f"{url}/{shard.prefix}.idx", local, shard, policy)
    cache = ChunkCache(cache_root(cfg) / "chunks", parse_size(cfg.cache_limit), parse_size(cfg.cache_chunk))
    shards = []
    for shard in manifest.shards:
        bin_url = f"{url}/{shard.prefix}.bin"
        dtype = np.dtype(manifest.dtype)
        source = RemoteBin(fs, f"{base}/{shard.prefix}.bin", bin_url, dtype, shard.num_tokens * dtype.itemsize,
                           shard.bin_sha256[:32], cache, policy)  # fmt: skip
        opened = IndexedDataset(local / shard.prefix, source)
        _check_counts(opened, shard, manifest, url)
        if cfg.verify_checksums:
            _check_bin(source, shard, cache.chunk_bytes)
        shards.append(opened)
    _warn_if_too_small(url, cfg, manifest.num_tokens * np.dtype(manifest.dtype).itemsize)
    return manifest, shards, cache


def _warn_if_too_small(url: str, cfg: DataConfig, nbytes: int) -> None:
    """Under a global shuffle (data.shuffle_block=0) samples are drawn from anywhere in the dataset: a
    cache that cannot hold it keeps evicting chunks it needs again, and every sample read may then
    fetch a whole chunk. Blocks are read whole within their window, so a smaller cache costs them at
    most one fetch per chunk per epoch, as for any cache smaller than the data."""
    if cfg.shuffle_block == 0 and nbytes > parse_size(cfg.cache_limit):
        log.warning(
            f"data: {url} holds {nbytes:,} bytes of tokens, more than data.cache_limit={cfg.cache_limit}: "
            f"shuffled reads will fetch chunks again and again (up to data.cache_chunk={cfg.cache_chunk} per "
            f"sample); raise data.cache_limit above the datasets' size, lower data.cache_chunk toward "
            f"the bytes of one sample, or read in blocks (data.shuffle_block=null)"
        )


def launch_id() -> str:
    """The same for the ranks one launcher started on this node (their parent: the deepspeed launcher,
    torchrun's agent, srun's slurmstepd, mpirun's proxy), different for the next launch."""
    return os.environ.get("PRETRAIN_LAUNCH_ID") or f"{os.uname().nodename}:{os.getppid()}"


def _node_manifest(fs: Any, base: str, url: str, local: Path, policy: RetryPolicy) -> Manifest:
    """The manifest fetched by the first rank of this launch on the node; the others read its copy."""
    path, stamp = local / MANIFEST, local / f".{MANIFEST}.launch"
    if not (path.is_file() and stamp.is_file() and stamp.read_text() == launch_id()):
        install_bytes(path, read_bytes(fs, f"{base}/{MANIFEST}", f"{url}/{MANIFEST}", policy))
        install_bytes(stamp, launch_id().encode())
    return parse_manifest(path.read_bytes(), f"{url}/{MANIFEST}")


def _node_idx(fs: Any, source: str, url: str, local: Path, shard: ShardRecord, policy: RetryPolicy) -> None:
    """The shard's .idx in the cache, checked against the manifest's sha256 (once: see _verified)."""
    target = local / f"{shard.prefix}.idx"
    if _verified(target, shard.idx_sha256):
        return
    data = read_bytes(fs, source, url, policy)
    if hashlib.sha256(data).hexdigest() != shard.idx_sha256:
        raise RemoteDataError(f"{url} does not match the sha256 in its manifest.json; {RE_UPLOAD}")
    install_bytes(target, data)
    stat = target.stat()
    install_bytes(_stamp(target), f"{shard.idx_sha256} {stat.st_size} {stat.st_mtime_ns}".encode())


def _stamp(target: Path) -> Path:
    return target.with_name(f".{target.name}.sha256")


def _verified(target: Path, sha256: str) -> bool:
    """The file was checked against `sha256` and has not changed since (same size and mtime)."""
    try:
        stat, recorded = target.stat(), _stamp(target).read_text()
    except FileNotFoundError:
        return False
    return recorded == f"{sha256} {stat.st_size} {stat.st_mtime_ns}"


def _check_counts(opened: IndexedDataset, shard: ShardRecord, manifest: Manifest, url: str) -> None:
    if opened.dtype.name != manifest.dtype or (opened.num_tokens, opened.num_documents) != (
        shard.num_tokens,
        shard.num_documents,
    ):
        raise ShardError(
            f"{url}/{shard.prefix}.idx describes {opened.num_tokens} {opened.dtype} tokens in "
            f"{opened.num_documents} documents, but {url}/{MANIFEST} records {shard.num_tokens} "
            f"{manifest.dtype} tokens in {shard.num_documents}; {RE_UPLOAD}"
        )


def _check_bin(source: RemoteBin, shard: ShardRecord, step: int) -> None:
    """Stream the whole remote .bin through sha256 (not into the cache: it may not fit)."""
    digest = hashlib.sha256()
    for begin in range(0, source.nbytes, step):
        digest.update(source.fetch(begin, min(step, source.nbytes - begin)))
    if digest.hexdigest() != shard.bin_sha256:
        raise RemoteDataError(f"{source.url} does not match the sha256 in its manifest.json; {RE_UPLOAD}")
