"""Datasets behind fsspec URLs (s3://, gs://, https://, ...): copied once into a local cache, then
memory-mapped like local ones. Transient read errors are retried with backoff; a persistent one is
reported as what it is, naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pretrain.errors import DataError

MANIFEST = "manifest.json"


class RemoteDataError(DataError):
    """A remote dataset that cannot be read (after retries); names the URL."""


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain")) / "datasets"


def _with_retries(action: Any, what: str, attempts: int, backoff_s: float) -> Any:
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except FileNotFoundError as e:
            raise RemoteDataError(f"{what} does not exist: {e}") from e
        except OSError as e:
            if attempt == attempts:
                raise RemoteDataError(f"cannot read {what} after {attempts} attempts: {e}") from e
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _copy(fs: Any, source: str, target: Path) -> None:
    """Stream one file into place; a concurrent rank may race, and each rename installs a complete file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with fs.open(source, "rb") as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, target)


def fetch_manifest(url: str, attempts: int = 4, backoff_s: float = 1.0) -> bytes:
    """The bytes of the manifest of the dataset at `url` (and nothing else of it)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)

    def read_manifest() -> bytes:
        with fs.open(f"{root.rstrip('/')}/{MANIFEST}", "rb") as f:
            return bytes(f.read())

    return bytes(_with_retries(read_manifest, f"{url}/{MANIFEST}", attempts, backoff_s))


def localize(url: str, cache_dir: Path | None = None, attempts: int = 4, backoff_s: float = 1.0) -> Path:
    """Local folder holding the dataset at `url` (its manifest and every shard it lists)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    local = (cache_dir or default_cache_dir()) / hashlib.sha256(url.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    base = root.rstrip("/")
    manifest_bytes = fetch_manifest(url, attempts, backoff_s)
    try:
        shards = json.loads(manifest_bytes)["shards"]
        names = [f"{shard['prefix']}{ext}" for shard in shards for ext in (".bin", ".idx")]
    except (ValueError, KeyError, TypeError) as e:
        raise RemoteDataError(f"{url}/{MANIFEST} is not a dataset manifest ({e}); re-run prepare") from e
    for name in names:
        target, source = local / name, f"{base}/{name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and target.stat().st_size == _with_retries(
            lambda source=source: fs.size(source), f"{url}/{name}", attempts, backoff_s
        ):
            continue
        _with_retries(
            lambda source=source, target=target: _copy(fs, source, target),
            f"{url}/{name}",
            attempts,
            backoff_s,
        )
    tmp = local / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_bytes(manifest_bytes)
    os.replace(tmp, local / MANIFEST)  # last: a cache with a manifest is complete
    return local
