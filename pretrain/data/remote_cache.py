"""A node's cache of remote `.bin` byte ranges, and the array view of a remote `.bin` that reads
through it.

A `.bin` is read in fixed-size aligned chunks (data.cache_chunk). Chunk k of a shard is one file,
named by the shard's sha256 in the manifest (so a re-prepared shard never reuses old bytes) and k.
The ranks of a node share the folder: each chunk is fetched under its own file lock by the first
rank that needs it, the others wait on the lock and then map the file. After each fetch the cache
evicts the least recently used chunks (file mtime, refreshed on use) until it is under its limit;
a chunk another process is fetching or opening (its lock held) is left alone, and a chunk a process
still maps stays readable after its unlink (POSIX), so eviction never breaks a reader."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.remote import RemoteDataError, RetryPolicy, install_bytes, node_lock, read_bytes


class ChunkCache:
    """Chunk files in `folder`, at most `limit` bytes of them (plus the chunks still mapped by readers
    after their eviction: at most OPEN_MAPS per process)."""

    OPEN_MAPS = 4  # per process; each is one chunk's mapping
    TOUCH_S = 5.0  # how often a chunk in use refreshes its mtime (its place in the LRU order)

    def __init__(self, folder: Path, limit: int, chunk_bytes: int):
        self.folder, self.limit = folder, limit
        self.chunk_bytes = max(8, chunk_bytes - chunk_bytes % 8)  # whole tokens of every dtype
        self._maps: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread reads too
        self.fetched_bytes = 0  # by this process

    def get(self, name: str, size: int, fetch: Callable[[], bytes]) -> np.ndarray:
        """The `size` bytes of chunk `name`, from the cache or from `fetch()` (then cached)."""
        with self._lock:
            hit = self._maps.get(name)
            if hit is not None:
                self._maps.move_to_end(name)
                if time.monotonic() - hit[1] > self.TOUCH_S:
                    self._touch(name)
                return hit[0]
        data = self._load(name, size, fetch)
        with self._lock:
            self._maps[name] = (data, time.monotonic())
            while len(self._maps) > self.OPEN_MAPS:
                self._maps.popitem(last=False)
        return data

    def _touch(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: our mapping still reads it
            os.utime(self.folder / name)
        data, _ = self._maps[name]
        self._maps[name] = (data, time.monotonic())

    def _load(self, name: str, size: int, fetch: Callable[[], bytes]) -> np.ndarray:
        path = self.folder / name
        with node_lock(self.folder / "locks" / f"{name}.lock"):
            fetched = not (path.is_file() and path.stat().st_size == size)
            if fetched:
                data = fetch()
                install_bytes(path, data)
                with self._lock:
                    self.fetched_bytes += len(data)
            else:
                os.utime(path)
            mapped = np.memmap(path, dtype=np.uint8, mode="r")  # open under the lock: eviction waits
        if fetched:
            self.evict(keep=path)
        return mapped

    def evict(self, keep: Path | None = None) -> None:
        """Unlink the least recently used chunks until the cache is within its limit."""
        with node_lock(self.folder / "locks" / "evict.lock"):
            stats = sorted(_chunk_files(self.folder))
            total = sum(size for _, size, _ in stats)
            for _, size, path in stats:
                if total <= self.limit:
                    return
                if path != keep and _unlink_unless_locked(path, self.folder / "locks" / f"{path.name}.lock"):
                    total -= size


def _chunk_files(folder: Path) -> list[tuple[int, int, Path]]:
    """(mtime, size, path) of the cached chunks (not the temporary files of fetches in progress)."""
    found = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):  # unlinked since the listing
            stat = entry.stat()
            found.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
    return found


def _unlink_unless_locked(path: Path, lock: Path) -> bool:
    with lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # being fetched or opened right now
        try:
            path.unlink(missing_ok=True)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return True


class RemoteBin:
    """A remote `.bin` as a read-only token array: `len()` and contiguous slices (what TokenStream and
    IndexedDataset.document use), each slice fetching only the chunks it covers."""

    def __init__(
        self, fs: Any, path: str, url: str, dtype: np.dtype, nbytes: int, key: str, cache: ChunkCache,
        policy: RetryPolicy,
    ):  # fmt: skip
        self.fs, self.path, self.url, self.key = fs, path, url, key
        self.dtype, self.nbytes = np.dtype(dtype), nbytes
        self.cache, self.policy = cache, policy

    def __len__(self) -> int:
        return self.nbytes // self.dtype.itemsize

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError(f"{type(self).__name__} takes slices, not {type(index).__name__}")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise TypeError(f"{type(self).__name__} takes contiguous slices (step 1), not step {step}")
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        begin, end = start * self.dtype.itemsize, stop * self.dtype.itemsize
        size = self.cache.chunk_bytes
        pieces = []
        for k in range(begin // size, (end - 1) // size + 1):
            chunk = self._chunk(k)
            pieces.append(chunk[max(begin, k * size) - k * size : min(end, (k + 1) * size) - k * size])
        raw = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return np.asarray(raw).view(self.dtype)

    def _chunk(self, k: int) -> np.ndarray:
        begin = k * self.cache.chunk_bytes
        size = min(self.cache.chunk_bytes, self.nbytes - begin)
        return self.cache.get(f"{self.key}.{k:06d}", size, lambda: self.fetch(begin, size))

    def fetch(self, begin: int, size: int) -> bytes:
        """Bytes [begin, begin + size) of the remote file, straight from the server."""
        what = f"{self.url} (bytes {begin}-{begin + size - 1})"
        data = read_bytes(self.fs, self.path, what, self.policy, begin, begin + size)
        if len(data) != size:
            raise RemoteDataError(
                f"{what}: the server sent {len(data)} bytes instead of {size}: the file is not the size its "
                f".idx says (re-upload the dataset), or the server does not answer byte-range requests"
            )
        return data
