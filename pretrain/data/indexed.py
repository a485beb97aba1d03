"""The Megatron-LM memory-mapped indexed dataset: `PREFIX.bin` (tokens) + `PREFIX.idx` (index).

Byte for byte the layout of Megatron-LM's `megatron/core/datasets/indexed_dataset.py`, so shards
made here load in Megatron-LM and GPT-NeoX and theirs load here:

    .idx  b"MMIDIDX\\x00\\x00"        9-byte magic
          <Q version = 1
          <B dtype code             1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
          <Q sequence count  S
          <Q document count  D      = len(document_indices) = number of documents + 1
          int32[S]  sizes           tokens per sequence
          int64[S]  pointers        byte offset of each sequence in .bin
          int64[D]  document_indices  sequence index where each document starts, then S
    .bin  the sequences' tokens back to back, little-endian, in the dtype above

We write one sequence per document (document_indices = 0, 1, ..., S).
"""

from __future__ import annotations

import os
import struct
from array import array
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from pretrain.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_HEADER = struct.Struct("<9sQBQQ")


class ShardError(DataError):
    """A .bin/.idx pair that is missing, truncated or corrupt; names the file and the fix."""


def dtype_code(dtype: np.dtype | type | str) -> int:
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {dtype} has no code in the Megatron indexed-dataset format")


def best_dtype(vocab_size: int) -> type[np.generic]:
    """uint16 while every token id fits (vocabularies up to 65,536), else int32."""
    return np.uint16 if vocab_size <= 2**16 else np.int32


class IndexedDatasetWriter:
    """Streams documents into PREFIX.bin; `finalize()` writes PREFIX.idx. The shard appears complete
    (its .idx exists) only after both files are fully written, fsynced and renamed into place.

    Memory stays bounded: tokens go straight to the file, only one int32 size per document is kept."""

    def __init__(self, prefix: Path | str, dtype: np.dtype | type | str):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._tmp_bin = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self._tmp_idx = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        self._bin = self._tmp_bin.open("wb")
        self._sizes = array("i")  # C int: 32 bits on every platform numpy supports
        self.num_tokens = 0

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    def add_document(self, tokens: np.ndarray) -> None:
        tokens = self._cast(np.asarray(tokens))
        self._bin.write(tokens.tobytes(order="C"))
        self._sizes.append(len(tokens))
        self.num_tokens += len(tokens)

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Several documents at once: `tokens` back to back, `sizes[i]` tokens each (one write)."""
        tokens = self._cast(np.asarray(tokens))
        if int(np.sum(sizes, dtype=np.int64)) != len(tokens):
            raise ValueError(f"sizes add up to {int(np.sum(sizes))} tokens but {len(tokens)} were given")
        self._bin.write(tokens.tobytes(order="C"))
        self._sizes.extend(np.asarray(sizes, dtype=np.int32).tolist())
        self.num_tokens += len(tokens)

    def _cast(self, tokens: np.ndarray) -> np.ndarray:
        if tokens.dtype == self.dtype:
            return np.ascontiguousarray(tokens)
        # A silent wrap-around (70000 -> 4464 in uint16) would corrupt the data without any error.
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        if info is not None and tokens.size and (tokens.min() < info.min or tokens.max() > info.max):
            raise ValueError(
                f"{self.prefix}: token ids {tokens.min()}..{tokens.max()} do not fit {self.dtype}; "
                f"write with a wider dtype (best_dtype(vocab_size))"
            )
        return np.ascontiguousarray(tokens, dtype=self.dtype)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.intc).astype(np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(len(sizes) + 1, dtype=np.int64)
        with self._tmp_idx.open("wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(documents)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(documents.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp_bin, Path(f"{self.prefix}.bin"))
        os.replace(self._tmp_idx, Path(f"{self.prefix}.idx"))  # last: the .idx marks the shard complete
        _fsync_dir(self.prefix.parent)

    def abort(self) -> None:
        """Drop the unfinished shard (its temporary files); the final names were never written."""
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable: without it a power loss can forget them after we report success."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open folders; the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TokenSource(Protocol):
    """Tokens read by slicing, like a memory-mapped .bin: what TokenStream and `document` need of one.
    (A remote .bin read through the node's cache is one: pretrain/data/remote_cache.py.)"""

    dtype: np.dtype
    nbytes: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> np.ndarray: ...


class IndexedDataset:
    """Read-only view of one shard; the header is checked on open, the tokens are memory-mapped lazily
    (or, given a `bin_source`, read from it: the .bin of a remote dataset)."""

    def __init__(self, prefix: Path | str, bin_source: TokenSource | None = None):
        self.prefix = Path(prefix)
        self.idx_path, self.bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        self.bin_source = bin_source
        for path in (self.idx_path,) if bin_source else (self.idx_path, self.bin_path):
            if not path.is_file():
                raise ShardError(
                    f"{path} does not exist; re-run `python -m pretrain.data prepare` for this dataset"
                )
        # Mapped, not read: 20 bytes per document that every rank of a node would otherwise hold a
        # private copy of (sizes stay alive in the TokenStream); mapped, they are the page cache's,
        # shared by the node's ranks. The checks below still read it all once, per shard.
        size = self.idx_path.stat().st_size
        if size < _HEADER.size:
            raise ShardError(
                f"{self.idx_path} is truncated ({size} bytes, header alone is {_HEADER.size}); re-run prepare"
            )
        raw = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        magic, version, code, sequences, documents = _HEADER.unpack_from(raw[: _HEADER.size].tobytes())
        if magic != MAGIC:
            raise ShardError(
                f"{self.idx_path} is not a Megatron indexed-dataset index (magic {magic!r}); re-run prepare"
            )
        if version != VERSION:
            raise ShardError(
                f"{self.idx_path} has index version {version}, but only version {VERSION} exists: the file "
                f"is corrupt or from another format; re-run prepare"
            )
        if code not in DTYPE_CODES:
            raise ShardError(
                f"{self.idx_path} has unknown dtype code {code}; the file is corrupt, re-run prepare"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + sequences * (4 + 8) + documents * 8
        if len(raw) != expected:
            raise ShardError(
                f"{self.idx_path} holds {len(raw)} bytes but its header promises {expected} "
                f"({sequences} sequences, {documents} document entries): truncated or corrupt; re-run prepare"
            )
        offset = _HEADER.size
        self.sizes = np.frombuffer(raw, dtype="<i4", count=sequences, offset=offset)
        offset += sequences * 4
        self.pointers = np.frombuffer(raw, dtype="<i8", count=sequences, offset=offset)
        offset += sequences * 8
        self.document_indices = np.frombuffer(raw, dtype="<i8", count=documents, offset=offset)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        bin_size = bin_source.nbytes if bin_source else self.bin_path.stat().st_size
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise ShardError(
                f"{self.bin_path} holds {bin_size} bytes but its index describes {self.num_tokens} tokens of "
                f"{self.dtype} ({self.num_tokens * self.dtype.itemsize} bytes): truncated or corrupt; re-run prepare"
            )
        if np.any(self.sizes < 0) or (
            sequences
            and (
                self.pointers[0] != 0
                or np.any(np.diff(self.pointers) != self.sizes[:-1].astype(np.int64) * self.dtype.itemsize)
            )
        ):
            raise ShardError(
                f"{self.idx_path} has sizes and pointers that do not agree: corrupt; re-run prepare"
            )
        docs = self.document_indices
        if documents == 0 or docs[0] != 0 or docs[-1] != sequences or np.any(np.diff(docs) < 0):
            raise ShardError(
                f"{self.idx_path} has a document index that does not run from 0 to its {sequences} "
                f"sequences: corrupt; re-run prepare"
            )

    @property
    def num_documents(self) -> int:
        return max(0, len(self.document_indices) - 1)

    @cached_property
    def tokens(self) -> np.ndarray | TokenSource:
        """The whole .bin as one read-only array, mapped on first use (opening a shard reads only its .idx)."""
        if self.bin_source is not None:
            return self.bin_source
        if self.num_tokens == 0:  # numpy cannot map an empty file
            empty = np.zeros(0, dtype=self.dtype)
            empty.flags.writeable = False
            return empty
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.sizes)

    def document(self, index: int) -> np.ndarray:
        """Tokens of sequence `index` (= document `index` in shards written here)."""
        start = int(self.pointers[index]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[index])]
