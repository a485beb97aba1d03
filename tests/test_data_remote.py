"""Datasets behind fsspec URLs: cached locally, transient errors retried, persistent ones named."""

import json
from typing import ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pretrain.data.remote import RemoteDataError, is_remote, localize


class FlakyFileSystem(MemoryFileSystem):
    """An object store whose reads fail `failures` times before they work (a stand-in for S3 hiccups)."""

    protocol = "flaky"
    failures = 0
    store: ClassVar[dict] = {}  # own namespace, separate from memory://
    pseudo_dirs: ClassVar[list] = [""]

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode and FlakyFileSystem.failures > 0:
            FlakyFileSystem.failures -= 1
            raise ConnectionError("connection reset by peer")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def put_dataset(url, files):
    fs, root = fsspec.core.url_to_fs(url)
    for name, data in files.items():
        with fs.open(f"{root}/{name}", "wb") as f:
            f.write(data)


FILES = {
    "manifest.json": json.dumps(
        {"shards": [{"prefix": "part-0/shard-00000"}, {"prefix": "shard-00001"}]}
    ).encode(),
    "part-0/shard-00000.bin": b"\x01\x00" * 1000,
    "part-0/shard-00000.idx": b"index-0",
    "shard-00001.bin": b"\x02\x00" * 10,
    "shard-00001.idx": b"index-1",
}


def test_remote_dataset_is_copied_once_into_the_cache(tmp_path):
    assert is_remote("s3://bucket/x") and not is_remote("/data/x") and not is_remote("file:///data/x")
    put_dataset("memory://bucket/web", FILES)
    local = localize("memory://bucket/web", tmp_path)
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == FILES
    stamps = {p: p.stat().st_mtime_ns for p in local.rglob("*.bin")}
    assert localize("memory://bucket/web", tmp_path) == local
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*.bin")} == stamps  # nothing fetched again


def test_transient_errors_are_retried(tmp_path):
    put_dataset("flaky://bucket/web", FILES)
    FlakyFileSystem.failures = 2
    local = localize("flaky://bucket/web", tmp_path, attempts=3, backoff_s=0.0)
    assert (local / "shard-00001.bin").read_bytes() == FILES["shard-00001.bin"]


def test_persistent_errors_name_the_file(tmp_path):
    put_dataset("flaky://bucket/web", FILES)
    FlakyFileSystem.failures = 100
    with pytest.raises(
        RemoteDataError, match=r"cannot read flaky://bucket/web/manifest.json after 3 attempts"
    ):
        localize("flaky://bucket/web", tmp_path, attempts=3, backoff_s=0.0)
    FlakyFileSystem.failures = 0
    with pytest.raises(RemoteDataError, match=r"memory://nowhere/manifest.json does not exist"):
        localize("memory://nowhere", tmp_path)
