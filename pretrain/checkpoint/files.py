"""Durable file writing: checksums computed while the bytes go out, fsync, atomic replacement.

The checksum is xxHash's XXH3-128 (the `xxhash` package): measured here at 4.5 GB/s on one core
against 0.44 GB/s for sha256, and a checkpoint is hashed on every save and verified on every
resume. It detects truncation and corruption; it is not meant to resist deliberate tampering.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import IO, Any

import xxhash

CHECKSUM = "xxh3_128"
_CHUNK = 16 << 20


class HashingWriter:
    """A binary file whose checksum and size are computed from the bytes written (no re-read)."""

    def __init__(self, path: Path):
        self.path = path
        self._file: IO[bytes] = path.open("wb")
        self._hash = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += len(view)
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> str:
        """Flush to stable storage and return the checksum (hex)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()


def write_bytes_durably(path: Path, data: bytes) -> tuple[int, str]:
    """Write, fsync; returns (size, checksum)."""
    writer = HashingWriter(path)
    try:
        writer.write(data)
    except BaseException:
        writer.abort()
        raise
    return writer.size, writer.close()


def file_checksum(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, data: bytes) -> None:
    """Readers see the old content or the new, never a mix; durable when this returns. The temporary
    name is unique, so two writers never share one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write_bytes_durably(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomically(path: Path, data: Any) -> None:
    replace_atomically(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
