"""Which sample of a dataset its k-th draw is: position k mod N of a seeded permutation of epoch k div N.

Two orders exist, named by the version the loader's state records:

1 `GlobalOrder`: numpy's `Generator.permutation` of the whole dataset, built per epoch on every rank.
  4 bytes per sample per rank (8 while it is built): 40 GB per rank for 1e10 samples. Kept so that
  checkpoints written before version 2 resume on exactly the samples they would have trained on.
2 `FeistelOrder`: a keyed bijection of [0, N) evaluated per draw, so the order costs a few dozen
  bytes per rank whatever N is. A Feistel network over k = bit_length(N - 1) bits is a bijection of
  [0, 2^k) for any round function; "cycle walking" (apply it again while the result is >= N) turns it
  into a bijection of [0, N), and since 2^k < 2N a draw needs fewer than two evaluations on average.
  Everything is fixed-width integer arithmetic (uint64, wrapping) written out here, so the order is
  the same on every machine and numpy version; no numpy random generator is involved.

With shuffle off both are the identity, so an unshuffled loader has one order whatever the version.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import numpy as np

from pretrain.errors import DataError

LEGACY_ORDER, FEISTEL_ORDER = 1, 2
ORDER_VERSIONS = (LEGACY_ORDER, FEISTEL_ORDER)

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # 2^64 / phi: the splitmix64 increment
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
# 4 rounds already make a Feistel network a strong pseudo-random permutation given a random round
# function (Luby-Rackoff); 8 leave margin for the unbalanced halves of an odd bit count and small k.
ROUNDS = 8


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a bijection of 64-bit words
    whose every output bit depends on every input bit."""
    z = z ^ (z >> _S30)  # one new array, then in place: small batches are call-bound
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def _seed_key(seed: Sequence[int]) -> int:
    """One 64-bit key from any number of non-negative integers of any size (folded 64 bits at a time)."""
    key = np.array([len(seed)], dtype=np.uint64)
    for component in seed:
        if component < 0:
            raise ValueError(f"seed components must be non-negative, got {component}")
        words = [(component >> s) & _MASK64 for s in range(0, max(component.bit_length(), 1), 64)]
        for word in [len(words), *words]:
            key = _mix(key ^ np.uint64((word + _GOLDEN64) & _MASK64))
    return int(key[0])


class FeistelOrder:
    """Version 2: draw k of a dataset of `num_samples` samples -> sample id, reshuffled every epoch,
    in O(1) memory. `lookup` is vectorised over any batch of draws (memory O(batch))."""

    version = FEISTEL_ORDER

    def __init__(self, num_samples: int, seed: int | Sequence[int], shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"an order needs at least one sample, got {num_samples}")
        self.num_samples, self.shuffle = num_samples, shuffle
        self.seed = [seed] if isinstance(seed, int) else list(seed)
        self._key = np.uint64(_seed_key(self.seed))
        bits = (num_samples - 1).bit_length()  # the smallest k with 2^k >= N
        self._low_bits = bits // 2  # right half; the left half takes the odd bit
        self._low_mask = np.uint64((1 << self._low_bits) - 1)
        self._high_mask = np.uint64((1 << (bits - self._low_bits)) - 1)

    def __getitem__(self, index: int) -> int:
        return int(self.lookup(np.array([index], dtype=np.int64))[0])

    def lookup(self, draws: np.ndarray) -> np.ndarray:
        """Sample ids (int64) of the draws `draws` (non-negative int64 counters)."""
        epochs, positions = np.divmod(np.asarray(draws, dtype=np.int64), self.num_samples)
        if not self.shuffle or self.num_samples == 1:
            return positions
        unique, which = np.unique(epochs, return_inverse=True)  # a batch spans one epoch, rarely two
        keys = self._round_keys(unique.astype(np.uint64))  # (ROUNDS, epochs in the batch)
        per_draw = len(unique) > 1  # else one column of keys broadcasts over every draw
        if per_draw:
            keys = keys[:, which.reshape(-1)]
        values = positions.astype(np.uint64)
        pending = np.arange(len(values))
        while len(pending):  # cycle walking: fewer than 2 passes per draw on average, since 2^k < 2N
            values[pending] = self._feistel(values[pending], keys[:, pending] if per_draw else keys)
            pending = pending[values[pending] >= np.uint64(self.num_samples)]
        return values.astype(np.int64)

    def _round_keys(self, epochs: np.ndarray) -> np.ndarray:
        """(ROUNDS, len(epochs)) uint64: the round keys of each epoch, from (seed, epoch) alone."""
        epoch_keys = _mix(_mix(epochs + np.uint64(_GOLDEN64)) ^ self._key)
        rounds = np.arange(1, ROUNDS + 1, dtype=np.uint64)[:, None] * np.uint64(_GOLDEN64)
        return _mix(epoch_keys[None, :] + rounds)

    def _feistel(self, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """One pass of the network over [0, 2^k): each round changes one half by a keyed hash of the
        other, which any hash keeps invertible, so the pass is a bijection."""
        shift = np.uint64(self._low_bits)
        high, low = values >> shift, values & self._low_mask
        for r in range(ROUNDS):
            if r % 2 == 0:
                high = high ^ (_mix(low ^ keys[r]) & self._high_mask)
            else:
                low = low ^ (_mix(high ^ keys[r]) & self._low_mask)
        return (high << shift) | low


class GlobalOrder:
    """Version 1: draw k -> sample id through numpy's permutation of the whole epoch, built per epoch
    (O(N) memory per rank). Only for runs whose checkpoints say version 1."""

    version = LEGACY_ORDER

    def __init__(self, num_samples: int, seed: int | Sequence[int], shuffle: bool = True):
        self.num_samples, self.shuffle = num_samples, shuffle
        self.seed = [seed] if isinstance(seed, int) else list(seed)
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def __getitem__(self, index: int) -> int:
        return int(self.lookup(np.array([index], dtype=np.int64))[0])

    def lookup(self, draws: np.ndarray) -> np.ndarray:
        epochs, positions = np.divmod(np.asarray(draws, dtype=np.int64), self.num_samples)
        if not self.shuffle:  # the identity needs no table (version 1 built np.arange(N) anyway)
            return positions
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            if epoch != self._epoch:
                rng = np.random.default_rng([*self.seed, int(epoch)])
                dtype = np.uint32 if self.num_samples < 2**32 else np.int64  # half the memory
                self._epoch, self._perm = int(epoch), rng.permutation(self.num_samples).astype(dtype)
            mask = epochs == epoch
            out[mask] = self._perm[positions[mask]]
        return out


SampleOrder = FeistelOrder | GlobalOrder


def sample_order(
    version: int, num_samples: int, seed: int | Sequence[int], shuffle: bool = True
) -> SampleOrder:
    if version == FEISTEL_ORDER:
        return FeistelOrder(num_samples, seed, shuffle)
    if version == LEGACY_ORDER:
        return GlobalOrder(num_samples, seed, shuffle)
    raise DataError(
        f"sample order version {version} is not one this code knows ({ORDER_VERSIONS}); the checkpoint "
        f"was written by a newer version of the framework: resume it with that version"
    )


def order_memory(num_samples: int, version: int = FEISTEL_ORDER, batch: int = 1024) -> dict[str, Any]:
    """What one dataset's order costs one rank, for benchmarks: the peak bytes Python and numpy
    allocate (tracemalloc) while building the order and reading 4 batches of `batch` draws (two at
    the start of epoch 0, two across the boundary into epoch 1), and the time per draw looked up.
    A run holds one order per dataset, so its sample-order memory per rank is the sum over datasets."""
    sample_order(version, 3, [0, 0]).lookup(np.arange(4))  # first calls import and cache: not the order's
    tracemalloc.start()
    try:
        order = sample_order(version, num_samples, [0, 0])
        built = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        starts = [0, batch, num_samples - batch, num_samples]
        began = time.perf_counter()
        for start in starts:
            order.lookup(np.arange(start, start + batch, dtype=np.int64))
        seconds = time.perf_counter() - began
        read = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {
        "num_samples": num_samples,
        "order_version": version,
        "build_peak_bytes": built,
        "read_peak_bytes": read,
        "peak_bytes": max(built, read),
        "seconds_per_draw": seconds / (len(starts) * batch),
    }
