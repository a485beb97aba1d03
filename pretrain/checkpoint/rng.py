"""Every random-number generator a rank uses, as one per-rank part of the run's state.

Python's `random`, NumPy's global generator, torch's CPU generator and, when present, every CUDA
device's generator. Nothing in the model draws random numbers today (no dropout; data order is a
function of the seed), but an exact resume must not depend on that staying true. On disk (see
`pretrain.checkpoint.state`): tensors plus JSON metadata in safetensors, no pickle.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load

from pretrain.checkpoint.state import decode_rank_state, encode_rank_state


def generator_states() -> dict[str, Any]:
    """This process's generator states."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python_mt": torch.tensor(np.asarray(mt, dtype=np.int64)),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": version, "gauss_next": gauss},
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            state[f"torch_cuda_{index}"] = torch.cuda.get_rng_state(index)
    return state


def set_generator_states(state: dict[str, Any]) -> None:
    """Put the generators back exactly as `generator_states` found them."""
    python = state["python"]
    random.setstate(
        (python["version"], tuple(int(x) for x in state["python_mt"].tolist()), python["gauss_next"])
    )
    numpy = state["numpy"]
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"torch_cuda_{index}" in state:
                torch.cuda.set_rng_state(state[f"torch_cuda_{index}"], index)


def capture() -> bytes:
    """This process's generator states, serialised."""
    return encode_rank_state(generator_states())


def restore(data: bytes, metadata: dict[str, str]) -> None:
    set_generator_states({**load(data), **{k: json.loads(v) for k, v in metadata.items()}})


def restore_file(path: Path) -> None:
    set_generator_states(decode_rank_state(path))


class RandomState:
    """The generators of this rank as a per-rank part: restored exactly in the same layout; in
    another, fresh and distinct per rank, derived from the seed and the step resumed."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def state_dict(self) -> dict[str, Any]:
        return generator_states()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_generator_states(state)

    def start_fresh(self, step: int) -> None:
        seed = self.seed + 1_000_003 * step + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
