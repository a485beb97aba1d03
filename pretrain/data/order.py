"""Which sample of a dataset its k-th draw is: position k mod N of a seeded permutation of epoch k div N.

Three orders exist, named by the version the loader's state records:

1 `GlobalOrder`: numpy's `Generator.permutation` of the whole dataset, built per epoch on every rank.
  4 bytes per sample per rank (8 while it is built): 40 GB per rank for 1e10 samples. Kept so that
  checkpoints written before version 2 resume on exactly the samples they would have trained on.
2 `FeistelOrder`: a keyed bijection of [0, N) evaluated per draw, so the order costs a few hundred
  bytes per rank whatever N is. A Feistel network on the pairs [0, a) x [0, b), a b >= N, is a
  bijection of [0, a b) for any round function; "cycle walking" (apply it again while the result is
  >= N) turns it into a bijection of [0, N), and with a b - N < sqrt(N) a second pass is rare.
  Everything is fixed-width integer arithmetic (uint64, wrapping) written out here, so the order is
  the same on every machine and numpy version; no numpy random generator is involved.

3 per dataset either version 2's order (data.shuffle_block = 0) or `BlockOrder`
  (pretrain/data/block_order.py): blocks of consecutive samples shuffled, then samples shuffled within
  windows of blocks, so that a partial pass reads about its share of a remote dataset's bytes.

With shuffle off all are the identity, so an unshuffled loader has one order whatever the version.
"""

from __future__ import annotations

import math
import time
import tracemalloc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from pretrain.errors import DataError

LEGACY_ORDER, FEISTEL_ORDER, BLOCK_ORDER = 1, 2, 3
ORDER_VERSIONS = (LEGACY_ORDER, FEISTEL_ORDER, BLOCK_ORDER)

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # 2^64 / phi: the splitmix64 increment
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)
# 4 rounds already make a Feistel network a strong pseudo-random permutation given a random round
# function (Luby-Rackoff); 8 leave margin for unequal halves (a != b), small N and a cheap hash.
ROUNDS = 8
HalfSize = np.ndarray | np.uint64  # a Feistel half's size: one for all values, or one per value


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
        # The network's domain is [0, a) x [0, b), a = ceil(sqrt(N)), b = ceil(N / a): a b - N < a,
        # so a draw falls outside [0, N) with probability below 1/b ~ 1/sqrt(N), and a batch almost
        # never needs a second pass (each pass is ~50 numpy calls, whatever the batch size).
        self._high = math.isqrt(num_samples - 1) + 1
        self._low = -(-num_samples // self._high)
        self._cached_epoch, self._cached_keys = -1, np.zeros(0, dtype=np.uint64)

    def __getitem__(self, index: int) -> int:
        return int(self.lookup(np.array([index], dtype=np.int64))[0])

    def lookup(self, draws: np.ndarray) -> np.ndarray:
        """Sample ids (int64) of the draws `draws` (non-negative int64 counters)."""
        epochs, positions = np.divmod(np.asarray(draws, dtype=np.int64), self.num_samples)
        if not self.shuffle or self.num_samples == 1 or len(positions) == 0:
            return positions
        first, last = int(epochs.min()), int(epochs.max())
        if first == last:  # the usual batch: one column of keys broadcasts over every draw
            keys, per_draw = self._epoch_keys(first), False
        else:  # a batch across an epoch boundary (or a tiny dataset's several epochs)
            unique, which = np.unique(epochs, return_inverse=True)
            keys, per_draw = self._round_keys(unique.astype(np.uint64))[:, :, which.reshape(-1)], True
        values = positions.astype(np.uint64)
        pending = np.arange(len(values))
        while len(pending):  # cycle walking: a draw that lands in [N, a b) takes another pass
            values[pending] = self._feistel(values[pending], keys[:, :, pending] if per_draw else keys)
            pending = pending[values[pending] >= np.uint64(self.num_samples)]
        return values.astype(np.int64)

    def _epoch_keys(self, epoch: int) -> np.ndarray:
        """The round keys of one epoch, remembered for the epoch in progress (2 x ROUNDS words)."""
        if self._cached_epoch != epoch:
            self._cached_keys = self._round_keys(np.array([epoch], dtype=np.uint64))
            self._cached_epoch = epoch
        return self._cached_keys

    def _round_keys(self, epochs: np.ndarray) -> np.ndarray:
        return round_keys(self._key, epochs)

    def position_of(self, epoch: int, sample: int) -> int:
        """The inverse: the position in epoch `epoch` at which `sample` is drawn."""
        if not self.shuffle or self.num_samples == 1:
            return sample
        keys, value = self._epoch_keys(epoch), np.array([sample], dtype=np.uint64)
        a, b = np.uint64(self._high), np.uint64(self._low)
        value = feistel_unpass(value, keys, a, b)
        while value[0] >= np.uint64(self.num_samples):  # undo the cycle walk: every step before was >= N
            value = feistel_unpass(value, keys, a, b)
        return int(value[0])

    def _feistel(self, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return feistel_pass(values, keys, np.uint64(self._high), np.uint64(self._low))


def round_keys(key: np.uint64, ids: np.ndarray) -> np.ndarray:
    """(2, ROUNDS, len(ids)) uint64: per round an xor key and an odd multiplier for each id (an epoch),
    from (key, id) alone."""
    epoch_keys = _mix(_mix(ids + np.uint64(_GOLDEN64)) ^ key)
    rounds = np.arange(1, 2 * ROUNDS + 1, dtype=np.uint64)[:, None] * np.uint64(_GOLDEN64)
    keys = _mix(epoch_keys[None, :] + rounds).reshape(2, ROUNDS, len(ids))
    keys[1] |= np.uint64(1)  # multiply-shift wants odd multipliers (an even one drops a bit)
    return keys


def feistel_pass(values: np.ndarray, keys: np.ndarray, a: HalfSize, b: HalfSize) -> np.ndarray:
    """One pass of the network over [0, a b): x = high b + low, and each round adds to one half,
    modulo its size, a keyed hash of the other half. A round is undone by subtracting the same
    hash, whatever the hash, so the pass is a bijection. The hash is multiply-shift: bits 32-63 of
    (half xor key) * odd multiplier mod 2^64, which depend on every bit of a half below 2^32.
    `a`, `b` and the keys are scalars or one per value (broadcast)."""
    xor_keys, multipliers = keys
    high, low = np.divmod(values, b)
    for r in range(ROUNDS):
        if r % 2 == 0:
            high += _hash(low, xor_keys[r], multipliers[r]) % a
            high %= a
        else:
            low += _hash(high, xor_keys[r], multipliers[r]) % b
            low %= b
    return high * b + low


def feistel_unpass(values: np.ndarray, keys: np.ndarray, a: HalfSize, b: HalfSize) -> np.ndarray:
    """The inverse of `feistel_pass`: the rounds in reverse, each subtracting its hash (adding its
    complement modulo the half's size, to stay in unsigned arithmetic)."""
    xor_keys, multipliers = keys
    high, low = np.divmod(values, b)
    for r in reversed(range(ROUNDS)):
        if r % 2 == 0:
            high += a - _hash(low, xor_keys[r], multipliers[r]) % a
            high %= a
        else:
            low += b - _hash(high, xor_keys[r], multipliers[r]) % b
            low %= b
    return high * b + low


def _hash(half: np.ndarray, key: np.ndarray, multiplier: np.ndarray) -> np.ndarray:
    mixed = half ^ key  # then in place: a batch of a few draws costs its numpy calls, not its size
    mixed *= multiplier
    mixed >>= _S32
    return mixed


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


if TYPE_CHECKING:
    from pretrain.data.block_order import BlockOrder

SampleOrder = Union[FeistelOrder, GlobalOrder, "BlockOrder"]


def sample_order(
    version: int,
    num_samples: int,
    seed: int | Sequence[int],
    shuffle: bool = True,
    blocks: tuple[int, int] = (0, 0),
) -> SampleOrder:
    """The order of one dataset; `blocks` = (block, window) counts only in version 3, where (0, 0)
    is version 2's order of the dataset."""
    if version == BLOCK_ORDER and blocks[0] > 0:
        from pretrain.data.block_order import BlockOrder  # it builds on this module

        return BlockOrder(num_samples, seed, blocks[0], blocks[1], shuffle)
    if version in (FEISTEL_ORDER, BLOCK_ORDER):
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
