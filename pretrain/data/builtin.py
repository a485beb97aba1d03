"""A built-in corpus present on every machine with Python: the standard library's own source.

Read byte by byte (UTF-8 bytes are token ids 0-255, end-of-document is 256), it is real text
(code, comments, docstrings) that a tiny model learns visibly within minutes, with no download and
no tokenizer training. The data-pipeline issue adds trained tokenizers and Megatron-format shards.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import numpy as np

# Test suites are huge, repetitive and full of deliberately broken code; the rest is the library.
_SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus one end-of-document token."""

    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def stdlib_documents(root: Path | None = None) -> list[Path]:
    """The library's .py files in a fixed (sorted, relative-path) order."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_tokens(validation_fraction: float, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token streams; each document ends with EOD. A document's split depends
    only on a hash of its path, so it stays put when the library gains or loses files."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    docs = _documents(root)
    eod = np.array([ByteTokenizer.eod_id], dtype=np.uint16)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for path in docs:
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16)
        bucket = val if _held_out(path, root, validation_fraction) else train
        bucket.extend((data, eod))
    empty = np.zeros(0, dtype=np.uint16)
    return (np.concatenate(train) if train else empty), (np.concatenate(val) if val else empty)


def stdlib_token_counts(validation_fraction: float, root: Path | None = None) -> tuple[int, int]:
    """How many tokens `stdlib_tokens` would return (train, validation), from file sizes alone: one
    token per byte plus each document's EOD."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    counts = [0, 0]
    for path in _documents(root):
        counts[_held_out(path, root, validation_fraction)] += path.stat().st_size + 1
    return counts[0], counts[1]


def _documents(root: Path) -> list[Path]:
    docs = stdlib_documents(root)
    if not docs:
        raise FileNotFoundError(
            f"no Python source files found under {root}; set data.source to another corpus"
        )
    return docs


def _held_out(path: Path, root: Path, validation_fraction: float) -> bool:
    return zlib.crc32(path.relative_to(root).as_posix().encode()) < int(validation_fraction * 2**32)
