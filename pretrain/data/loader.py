"""Packed samples, blended over datasets, in a global order that depends on (seed, data, seq_len) only.

A dataset is one token stream (its documents, each ending with EOD, concatenated across shards).
A sample is seq_len + 1 consecutive tokens of it (packing across document boundaries), giving
inputs [:-1] and next-token labels [1:].

Global sample g of the run comes from dataset d(g) of the blend (a low-discrepancy sequence over the
normalised weights, so every dataset's share of any window of a few hundred samples is within about
1% of its weight), and is that dataset's k-th sample, k = how many earlier samples came from d. The
k-th sample of a dataset with N samples is perm_e[k mod N] of epoch e = k div N, a permutation seeded
by (seed, d, e): every epoch reshuffles. It is a global shuffle, or (order version 3, for datasets
with data.shuffle_block > 0, the default for remote ones) a shuffle of blocks of consecutive samples
and of the samples within windows of blocks, which reads a dataset's bytes in about the order drawn. The permutation is evaluated per draw (pretrain/data/order.py),
so a rank holds no table of samples and looks up only its own. A step consumes the next
global_batch_size global samples; data-parallel rank r takes the r-th slice of each micro-batch round.
So what a step trains on never depends on the number of ranks, and the loader's whole state is the
count of consumed samples (and which version of the order the run uses, with its block sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pretrain.data.block_order import kept_order_note, recorded_blocks
from pretrain.data.indexed import TokenSource
from pretrain.data.manifest import REWRITE_SHARD
from pretrain.data.order import (
    BLOCK_ORDER,
    FEISTEL_ORDER,
    LEGACY_ORDER,
    GlobalOrder,
    SampleOrder,
    sample_order,
)
from pretrain.errors import DataError
from pretrain.logs import get_logger

# GlobalOrder lives in order.py now; it stays importable from here, where it used to be.
__all__ = ["Batch", "BlendSchedule", "DistributedBatches", "GlobalOrder", "PackedSamples", "SkippedBatches"]
__all__ += ["TokenStream", "document_positions"]
log = get_logger(__name__)

# 1/phi: consecutive multiples modulo 1 are the most evenly spread sequence there is (Weyl/Kronecker).
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class TokenStream:
    """Arrays (shards) read as one sequence of tokens without copying them together. `names` and
    `document_sizes` (tokens per document, per part) serve only to say where a token came from.
    A part is read only by slicing, so a remote .bin (a TokenSource reading through the node's cache)
    serves as well as a memory-mapped one."""

    def __init__(
        self,
        parts: Sequence[np.ndarray | TokenSource],
        names: Sequence[str] | None = None,
        document_sizes: Sequence[np.ndarray] | None = None,
    ):
        kept = [i for i, p in enumerate(parts) if len(p)]
        self.parts = [parts[i] for i in kept]
        self.names = [names[i] if names else f"part {i}" for i in kept]
        self.document_sizes = [document_sizes[i] for i in kept] if document_sizes else None
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def where(self, position: int) -> str:
        """The part, document and offset in it of the token at `position`, in words."""
        part = int(np.searchsorted(self.offsets, position, side="right")) - 1
        local = position - int(self.offsets[part])
        if self.document_sizes is None:
            return f"{self.names[part]}, token {local}"
        ends = np.cumsum(self.document_sizes[part], dtype=np.int64)
        document = int(np.searchsorted(ends, local, side="right"))
        start = int(ends[document - 1]) if document else 0
        return f"{self.names[part]}, document {document}, token {local - start}"

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            part = self.parts[first]
            local = start - int(self.offsets[first])
            piece = part[local : local + (stop - start)]
            pieces.append(piece)
            start += len(piece)
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class PackedSamples:
    """Samples of seq_len + 1 tokens from the window [start, stop) of a stream. `shuffle_blocks`:
    (block, window) of the order a new run draws them in; (0, 0) is a global shuffle."""

    def __init__(
        self,
        stream: TokenStream | np.ndarray,
        seq_len: int,
        start: int = 0,
        stop: int | None = None,
        shuffle_blocks: tuple[int, int] = (0, 0),
    ):
        self.stream = stream if isinstance(stream, TokenStream) else TokenStream([stream])
        self.seq_len, self.start, self.shuffle_blocks = seq_len, start, shuffle_blocks
        stop = len(self.stream) if stop is None else stop
        self.num_samples = max(0, (stop - start - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        begin = self.start + index * self.seq_len
        return self.stream.read(begin, begin + self.seq_len + 1)

    def where(self, index: int, offset: int) -> str:
        """Where token `offset` of sample `index` comes from, in words."""
        return self.stream.where(self.start + index * self.seq_len + offset)


class BlendSchedule:
    """Global sample index -> (dataset, that dataset's sample counter), deterministic from (weights, seed)."""

    BLOCK = 1 << 16

    def __init__(self, weights: Sequence[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        self.bounds = np.cumsum(w / w.sum())
        self.bounds[-1] = 1.0  # no sample may fall past the last dataset through rounding
        self.phase = float(np.random.default_rng([seed, 0x5EED]).random())
        # Counts at every BLOCK boundary reached so far, so counts_before() never recounts from 0: one
        # int64 row per 65,536 samples (1.2 MB per dataset at 1e10 samples), grown by doubling.
        self._counts_at_block = np.zeros((1, len(w)), dtype=np.int64)
        self._blocks_known = 1

    def datasets(self, start: int, stop: int) -> np.ndarray:
        u = (self.phase + np.arange(start, stop, dtype=np.float64) * _GOLDEN) % 1.0
        return np.searchsorted(self.bounds, u, side="right").clip(max=len(self.bounds) - 1)

    def counts_before(self, index: int) -> np.ndarray:
        """How many of the global samples [0, index) each dataset has supplied."""
        if len(self.bounds) == 1:
            return np.array([index], dtype=np.int64)
        block = index // self.BLOCK
        while self._blocks_known <= block:  # extend the cache of block-boundary counts
            if self._blocks_known == len(self._counts_at_block):
                self._counts_at_block = np.concatenate([self._counts_at_block, self._counts_at_block])
            b = self._blocks_known - 1
            ids = self.datasets(b * self.BLOCK, (b + 1) * self.BLOCK)
            self._counts_at_block[b + 1] = self._counts_at_block[b] + np.bincount(
                ids, minlength=len(self.bounds)
            )
            self._blocks_known += 1
        base = block * self.BLOCK
        ids = self.datasets(base, index)
        return self._counts_at_block[block] + np.bincount(ids, minlength=len(self.bounds))

    def locate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, per-dataset counter) for every global sample in [start, stop)."""
        if len(self.bounds) == 1:
            return np.zeros(stop - start, dtype=np.int64), np.arange(start, stop, dtype=np.int64)
        ids = self.datasets(start, stop)
        counters = np.empty(len(ids), dtype=np.int64)
        before = self.counts_before(start)
        for d in range(len(self.bounds)):
            mask = ids == d
            counters[mask] = before[d] + np.arange(int(mask.sum()))
        return ids, counters


Batch = tuple[torch.Tensor, torch.Tensor]


class DistributedBatches:
    """Each call to `next_step()` gives this rank's micro-batches (inputs, labels) for one optimizer step.

    With `prefetch`, the next step's samples are read (and, with `pin_memory`, copied into page-locked
    memory so the engine's host-to-device copy is asynchronous) in a background thread while the
    current step trains. Which samples a step holds is still decided on the calling thread from the
    position alone, and a prefetched step is used only if it is the one asked for next, so prefetching
    never changes what is trained on, whatever `load_state_dict` or `skip_batch` does in between.
    """

    def __init__(
        self,
        datasets: PackedSamples | Sequence[PackedSamples],
        seed: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        shuffle: bool = True,
        weights: Sequence[float] | None = None,
        prefetch: bool = False,
        pin_memory: bool = False,
        vocab_size: int | None = None,
    ):
        self.datasets = [datasets] if isinstance(datasets, PackedSamples) else list(datasets)
        for index, samples in enumerate(self.datasets):
            if len(samples) == 0:
                raise DataError(
                    f"dataset {index} holds fewer than seq_len + 1 = {samples.seq_len + 1} tokens; "
                    f"use more data or a shorter train.seq_len"
                )
        if weights is None:
            weights = [float(len(s)) for s in self.datasets]
        self.schedule = BlendSchedule(weights, seed)
        self.seed, self.shuffle = seed, shuffle
        # A new run's order; load_state_dict takes the checkpoint's. Without blocks it is version 2,
        # so such runs record (and train on) exactly what they did before version 3 existed.
        self.configured_blocks = [
            (s.shuffle_blocks if s.shuffle_blocks[0] > 0 else (0, 0)) for s in self.datasets
        ]
        self.blocks = list(self.configured_blocks)
        self.order_version = BLOCK_ORDER if any(b for b, _ in self.blocks) else FEISTEL_ORDER
        self.orders = self._orders(self.order_version, self.blocks)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = 0
        self.skipped_batches: list[int] = []  # global positions whose batch is never trained on
        self.last_step_start = 0  # global position of the batch next_step() returned last
        self.pin_memory = pin_memory
        self.vocab_size = vocab_size  # every token id read must be below it (None: not checked)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self._prefetched: tuple[int, Future[list[Batch]]] | None = None

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def step_sample_ids(self, step_start: int) -> list[list[tuple[int, int]]]:
        """This rank's (dataset, sample id) per micro-batch for the step starting at global index `step_start`."""
        ids, counters = self.schedule.locate(step_start, step_start + self.global_batch_size)
        micro, rounds = self.micro_batch_size, self.accumulation_steps
        firsts = np.arange(rounds) * (micro * self.dp_size) + self.dp_rank * micro
        mine = (firsts[:, None] + np.arange(micro)).reshape(-1)  # only this rank's draws are looked up
        pairs = list(
            zip(ids[mine].tolist(), self._sample_ids(ids[mine], counters[mine]).tolist(), strict=True)
        )
        return [pairs[m * micro : (m + 1) * micro] for m in range(rounds)]

    def batch_sample_ids(self, step_start: int) -> list[tuple[int, int]]:
        """(dataset, sample id) of every sample, over all ranks, of the batch at global position `step_start`."""
        ids, counters = self.schedule.locate(step_start, step_start + self.global_batch_size)
        return list(zip(ids.tolist(), self._sample_ids(ids, counters).tolist(), strict=True))

    def _sample_ids(self, datasets: np.ndarray, counters: np.ndarray) -> np.ndarray:
        """Sample id of each (dataset, that dataset's draw counter), one vectorised lookup per dataset."""
        out = np.empty(len(counters), dtype=np.int64)
        for d in np.unique(datasets).tolist():
            mask = datasets == d
            out[mask] = self.orders[d].lookup(counters[mask])
        return out

    def _orders(self, version: int, blocks: list[tuple[int, int]]) -> list[SampleOrder]:
        return [
            sample_order(version, len(s), [self.seed, d], self.shuffle, blocks[d])
            for d, s in enumerate(self.datasets)
        ]

    def skip_batch(self, step_start: int) -> None:
        """Never train on the batch at global position `step_start` (e.g. one that made the loss non-finite)."""
        if step_start not in self.skipped_batches:
            self.skipped_batches.append(step_start)

    def next_step(self) -> list[Batch]:
        start = self._next_position(self.consumed_samples)
        self.last_step_start = start
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == start:
            batches = prefetched[1].result()
        else:
            batches = self._read(self.step_sample_ids(start))
        self.consumed_samples = start + self.global_batch_size
        if self._reader is not None:
            following = self._next_position(self.consumed_samples)
            ids = self.step_sample_ids(following)  # here: the orders and the blend are not thread-safe
            self._prefetched = (following, self._reader.submit(self._read, ids))
        return batches

    def close(self) -> None:
        """Stop the prefetch thread (what it was reading ahead is not needed any more)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader, self._prefetched = None, None

    def _next_position(self, position: int) -> int:
        while position in self.skipped_batches:
            position += self.global_batch_size
        return position

    def _read(self, step_ids: list[list[tuple[int, int]]]) -> list[Batch]:
        batches = []
        for ids in step_ids:
            stacked = np.stack([self.datasets[d][i] for d, i in ids])
            self._check_token_ids(stacked, ids)
            rows = torch.from_numpy(stacked.astype(np.int64))
            tokens, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
            if self.pin_memory:
                tokens, labels = tokens.pin_memory(), labels.pin_memory()
            batches.append((tokens, labels))
        return batches

    def _check_token_ids(self, rows: np.ndarray, ids: list[tuple[int, int]]) -> None:
        """Corrupt shards (verify_checksums is off by default) must not reach the embedding, where an
        id past the vocabulary is an IndexError on CPU and a device-side assert on GPU. A min and a
        max per micro-batch, on the prefetch thread: ~10 us for 8 x 4097 tokens."""
        if self.vocab_size is None:
            return
        low = 0 if rows.dtype.kind == "u" else int(rows.min())
        if low >= 0 and int(rows.max()) < self.vocab_size:
            return
        row, column = (int(x) for x in np.argwhere((rows < 0) | (rows >= self.vocab_size))[0])
        dataset, sample = ids[row]
        raise DataError(
            f"token id {int(rows[row, column])} at {self.datasets[dataset].where(sample, column)} is outside "
            f"the vocabulary of the data's tokenizer (ids 0 to {self.vocab_size - 1}): the shard is "
            f"corrupt. {REWRITE_SHARD.capitalize()}; `python -m pretrain.data inspect` on the dataset checks "
            f"every shard's sha256, and data.verify_checksums=true makes training check them before it starts"
        )

    def consumed_per_dataset(self) -> list[int]:
        """Samples each dataset has supplied to the run so far (over all ranks)."""
        return [int(c) for c in self.schedule.counts_before(self.consumed_samples)]

    def state_dict(self) -> dict[str, Any]:
        """The position only: the skipped batches are the run's history, saved as a part of their
        own (`SkippedBatches`) so that a rollback to an older position keeps them. And the version
        of the sample order, which a run keeps for its whole life (see pretrain/data/order.py), with
        each dataset's [block, window] in version 3."""
        state: dict[str, Any] = {
            "consumed_samples": self.consumed_samples,
            "order_version": self.order_version,
        }
        if self.order_version == BLOCK_ORDER:
            state["shuffle_blocks"] = [list(b) for b in self.blocks]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # States written before the field existed are positions in the version 1 order.
        version = int(state.get("order_version", LEGACY_ORDER))
        blocks = recorded_blocks(state, version, self.configured_blocks)
        if (version, blocks) != (self.order_version, self.blocks):
            self.orders, self.order_version, self.blocks = self._orders(version, blocks), version, blocks
            self._prefetched = None  # read ahead in the other order
            if self.shuffle and version == LEGACY_ORDER:
                log.info(
                    "data: the checkpoint's samples are in the version 1 order (a permutation table of "
                    "every dataset per epoch on every rank, 4 bytes per sample); this run keeps it so "
                    "that it resumes on exactly the next samples"
                )
            if self.shuffle and (note := kept_order_note(version, blocks, self.configured_blocks)):
                log.warning(note)
        self.consumed_samples = int(state["consumed_samples"])
        # Checkpoints written before SkippedBatches existed hold them here; skips only ever grow.
        for position in state.get("skipped_batches", []):
            self.skip_batch(int(position))


class SkippedBatches:
    """The batches a run decided never to train on (global sample positions). Run history: it
    survives rollbacks (registered with rolled_back=False) and requeues."""

    def __init__(self, batches: DistributedBatches):
        self.batches = batches

    def state_dict(self) -> dict[str, Any]:
        return {"positions": list(self.batches.skipped_batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for position in state["positions"]:
            self.batches.skip_batch(int(position))


def document_positions(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Position ids that restart after every end-of-document token, for models that reset positions
    (or build block-diagonal attention masks) per packed document. (batch, seq) -> (batch, seq)."""
    seq = tokens.shape[-1]
    index = torch.arange(seq, device=tokens.device).expand_as(tokens)
    # a document starts at 0 and right after each EOD; carry the latest start forward
    starts = torch.where(
        torch.nn.functional.pad(tokens[..., :-1] == eod_id, (1, 0), value=True),
        index,
        torch.zeros_like(index),
    )
    return index - torch.cummax(starts, dim=-1).values
