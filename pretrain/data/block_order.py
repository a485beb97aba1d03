"""Order version 3's shuffle with locality: a partial pass over a dataset reads about its share of the
dataset's bytes, so a remote dataset fetches about what it trains on (pretrain/data/remote_cache.py
fetches whole chunks; a global shuffle touches a new chunk with nearly every sample).

Two levels, like MosaicML streaming's block shuffles. An epoch's N samples are cut into blocks of B
consecutive samples (the last one may be shorter). A keyed Feistel bijection (`FeistelOrder` on the
block count) permutes the blocks into slots; consecutive slots form windows of W blocks, and the draws
inside a window are permuted by a second keyed bijection over the window's samples, keyed by
(epoch, window). So draws [0, k) lie in the first ~k / (W B) windows: about k / B blocks (each read
whole, sooner or later) plus at most the W of the window in progress; and any W B consecutive draws
are a uniform-looking mix of W blocks from anywhere in the dataset. What the window gives up against a
global shuffle: a window's draws come from W places in the data, not W B, and a sample returns to
the same neighbourhood as its block's other B - 1 samples within one window's worth of draws.

The short block, if any, sits in the slot the block permutation gives it; its slot is found by the
permutation's inverse, so every lookup is O(1) memory per rank and vectorised, as in version 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pretrain.config.data import AUTO_BLOCK_CHUNKS, DataConfig, parse_size
from pretrain.data.order import BLOCK_ORDER, FeistelOrder, _seed_key, feistel_pass, round_keys
from pretrain.data.order import _mix as mix
from pretrain.errors import DataError

_GOLDEN64 = np.uint64(0x9E3779B97F4A7C15)


class BlockOrder:
    """Version 3 with blocks: draw k of a dataset of `num_samples` samples -> sample id, reshuffled every
    epoch, for blocks of `block` samples shuffled within windows of `window` blocks."""

    version = BLOCK_ORDER

    def __init__(
        self, num_samples: int, seed: int | Sequence[int], block: int, window: int, shuffle: bool = True
    ):
        if num_samples < 1 or block < 1 or window < 1:
            raise ValueError(f"a block order needs N, B, W >= 1, got {num_samples}, {block}, {window}")
        self.num_samples, self.block, self.window, self.shuffle = num_samples, block, window, shuffle
        self.seed = [seed] if isinstance(seed, int) else list(seed)
        self.num_blocks = -(-num_samples // block)
        # The short block's size (B when there is none); B and W key both bijections, so an order with
        # other sizes is another order, not a reshuffle of this one's blocks.
        self.tail = num_samples - (self.num_blocks - 1) * block
        keyed = [*self.seed, BLOCK_ORDER, block, window]
        self.blocks = FeistelOrder(self.num_blocks, [*keyed, 0], shuffle)
        self._window_key = np.uint64(_seed_key([*keyed, 1]))
        self._short_slots: dict[int, int] = {}  # epoch -> slot of the short block (a few epochs at most)

    def __getitem__(self, index: int) -> int:
        return int(self.lookup(np.array([index], dtype=np.int64))[0])

    def lookup(self, draws: np.ndarray) -> np.ndarray:
        """Sample ids (int64) of the draws `draws` (non-negative int64 counters)."""
        epochs, positions = np.divmod(np.asarray(draws, dtype=np.int64), self.num_samples)
        if not self.shuffle or self.num_samples == 1 or len(positions) == 0:
            return positions
        short = self._short_slot_per_draw(epochs)
        windows = self._slot(positions, short) // self.window
        start = self._slot_start(windows * self.window, short)
        stop = self._slot_start(np.minimum((windows + 1) * self.window, self.num_blocks), short)
        mixed = start + self._within_window(positions - start, stop - start, epochs, windows)
        slots = self._slot(mixed, short)
        offsets = mixed - self._slot_start(slots, short)
        return self.blocks.lookup(epochs * self.num_blocks + slots) * self.block + offsets

    def _short_slot_per_draw(self, epochs: np.ndarray) -> np.ndarray:
        """The slot holding the short block (the last block id) in each draw's epoch."""
        if self.tail == self.block:  # no short block: any slot serves, the arithmetic is the same
            return np.zeros(len(epochs), dtype=np.int64)
        unique, which = np.unique(epochs, return_inverse=True)
        slots = [self._short_slot(int(e)) for e in unique.tolist()]
        return np.asarray(slots, dtype=np.int64)[which.reshape(-1)]

    def _short_slot(self, epoch: int) -> int:
        if epoch not in self._short_slots:
            if len(self._short_slots) > 4:  # a loader reads one epoch, two across a boundary
                self._short_slots.clear()
            self._short_slots[epoch] = self.blocks.position_of(epoch, self.num_blocks - 1)
        return self._short_slots[epoch]

    def _slot_start(self, slots: np.ndarray, short: np.ndarray) -> np.ndarray:
        """Position of the first sample of each slot: slots past the short one start B - tail earlier."""
        return slots * self.block - (self.block - self.tail) * (slots > short)

    def _slot(self, positions: np.ndarray, short: np.ndarray) -> np.ndarray:
        """The slot of each position (its inverse of `_slot_start`)."""
        past_short = positions >= short * self.block + self.tail
        return (positions + (self.block - self.tail) * past_short) // self.block

    def _within_window(
        self, local: np.ndarray, lengths: np.ndarray, epochs: np.ndarray, windows: np.ndarray
    ) -> np.ndarray:
        """A keyed bijection of [0, length) per (epoch, window), applied to each draw's `local` offset:
        a Feistel network on [0, a) x [0, b), a b >= length, with cycle walking, as in FeistelOrder,
        with one network size and key per draw (a batch holds a few distinct ones)."""
        ids = mix(epochs.astype(np.uint64) + _GOLDEN64) ^ windows.astype(np.uint64)
        unique_ids, which = np.unique(ids, return_inverse=True)
        keys = round_keys(self._window_key, unique_ids)[:, :, which.reshape(-1)]
        sizes, size_of = np.unique(lengths, return_inverse=True)
        highs = np.array([math.isqrt(int(n) - 1) + 1 for n in sizes.tolist()], dtype=np.uint64)
        lows = (sizes.astype(np.uint64) + highs - np.uint64(1)) // highs
        a, b = highs[size_of.reshape(-1)], lows[size_of.reshape(-1)]
        limit = lengths.astype(np.uint64)
        values = local.astype(np.uint64)
        pending = np.arange(len(values))
        while len(pending):  # cycle walking: a draw that lands in [length, a b) takes another pass
            values[pending] = feistel_pass(values[pending], keys[:, :, pending], a[pending], b[pending])
            pending = pending[values[pending] >= limit[pending]]
        return values.astype(np.int64)


def shuffle_blocks(cfg: DataConfig, remote: bool, seq_len: int, token_bytes: int) -> tuple[int, int]:
    """(block, window) of a dataset's order from data.shuffle_block and shuffle_window; (0, 0) is
    version 2's global shuffle. Auto (null): global for local data, where a random read costs one
    sample's pages; for remote data blocks of AUTO_BLOCK_CHUNKS cache chunks, so that the two chunks
    a block's ends share with its neighbours (rarely read with it) waste at most 1 / AUTO_BLOCK_CHUNKS."""
    block = cfg.shuffle_block
    if block is None:
        sample_bytes = seq_len * token_bytes
        block = -(-AUTO_BLOCK_CHUNKS * parse_size(cfg.cache_chunk) // sample_bytes) if remote else 0
    return (block, cfg.shuffle_window) if block > 0 else (0, 0)


def recorded_blocks(
    state: dict[str, Any], version: int, configured: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Each dataset's (block, window) in the order of a loader state: recorded in version 3 (a dataset
    the checkpoint did not have, after an allowed change of data.paths, takes the configured one)."""
    if version != BLOCK_ORDER:
        return [(0, 0)] * len(configured)
    if "shuffle_blocks" not in state:
        raise DataError(
            "the data loader's state says sample order version 3 but records no shuffle_blocks: it was "
            "not written by this framework; resume from another checkpoint"
        )
    recorded = [(int(b), int(w)) for b, w in state["shuffle_blocks"]]
    return (recorded + configured[len(recorded) :])[: len(configured)]


def kept_order_note(
    version: int, kept: list[tuple[int, int]], configured: list[tuple[int, int]]
) -> str | None:
    """What to tell a resumed run whose configuration asks for another order than its checkpoint's."""
    asked = configured if any(b for b, _ in configured) else None
    recorded = kept if version == BLOCK_ORDER else None
    if asked == recorded:
        return None
    return (
        f"data: the checkpoint's sample order is version {version} with [block, window] per dataset "
        f"{recorded or 'none (a global shuffle)'}; the configuration asks for {asked or 'a global shuffle'} "
        f"(data.shuffle_block, data.shuffle_window, and for remote data data.cache_chunk). The run keeps "
        f"the checkpoint's order, so that it resumes on exactly the next samples; a new run "
        f"(checkpoint.resume=none in a new run.dir) uses the configured one"
    )
