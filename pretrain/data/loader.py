"""Packed samples in a global order that depends on (seed, data, seq_len) only, split over ranks.

A sample is seq_len + 1 consecutive tokens of the concatenated documents (packing across document
boundaries), giving inputs [:-1] and next-token labels [1:]. Global sample g of the run is sample
perm_e[g mod N] of epoch e = g div N, where perm_e is a permutation seeded by (seed, e). A step
consumes the next global_batch_size global samples; data-parallel rank r takes the r-th slice of
each micro-batch round. So the samples a step trains on never depend on the number of ranks, and
the loader's whole state is the count of consumed samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class PackedSamples:
    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_samples = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


class GlobalOrder:
    """Global sample index -> sample id, reshuffled every epoch."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self._epoch, self._perm = -1, np.arange(num_samples)

    def __getitem__(self, global_index: int) -> int:
        epoch, position = divmod(global_index, self.num_samples)
        if self.shuffle and epoch != self._epoch:
            self._epoch, self._perm = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(self.num_samples),
            )
        return int(self._perm[position])


Batch = tuple[torch.Tensor, torch.Tensor]


class DistributedBatches:
    """Each call to `next_step()` gives this rank's micro-batches (inputs, labels) for one optimizer step."""

    def __init__(
        self,
        samples: PackedSamples,
        seed: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        shuffle: bool = True,
    ):
        if len(samples) == 0:
            raise ValueError(
                f"the data holds fewer than seq_len + 1 = {samples.seq_len + 1} tokens; "
                f"use more data or a shorter train.seq_len"
            )
        self.samples = samples
        self.order = GlobalOrder(len(samples), seed, shuffle)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = 0

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def step_sample_ids(self, step_start: int) -> list[list[int]]:
        """This rank's sample ids per micro-batch for the step starting at global index `step_start`."""
        round_size = self.micro_batch_size * self.dp_size
        ids = []
        for micro in range(self.accumulation_steps):
            first = step_start + micro * round_size + self.dp_rank * self.micro_batch_size
            ids.append([self.order[g] for g in range(first, first + self.micro_batch_size)])
        return ids

    def next_step(self) -> list[Batch]:
        batches = []
        for ids in self.step_sample_ids(self.consumed_samples):
            rows = torch.from_numpy(np.stack([self.samples[i] for i in ids]).astype(np.int64))
            batches.append((rows[:, :-1], rows[:, 1:]))
        self.consumed_samples += self.global_batch_size
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
