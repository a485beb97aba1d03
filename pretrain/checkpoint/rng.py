"""Every random-number generator a rank uses, as safetensors (tensors plus JSON metadata, no pickle).

Python's `random`, NumPy's global generator, torch's CPU generator and, when present, every CUDA
device's generator. Nothing in the model draws random numbers today (no dropout; data order is a
function of the seed), but an exact resume must not depend on that staying true.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save


def capture() -> bytes:
    """This process's generator states, serialised."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python_mt": torch.tensor(np.asarray(mt, dtype=np.int64)),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            tensors[f"torch_cuda_{index}"] = torch.cuda.get_rng_state(index)
    metadata = {
        "python": json.dumps({"version": version, "gauss_next": gauss}),
        "numpy": json.dumps(
            {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
        ),
    }
    return save(tensors, metadata=metadata)


def restore(data: bytes, metadata: dict[str, str]) -> None:
    """Put the generators back exactly as `capture` found them."""
    tensors = load(data)
    python = json.loads(metadata["python"])
    random.setstate(
        (python["version"], tuple(int(x) for x in tensors["python_mt"].tolist()), python["gauss_next"])
    )
    numpy = json.loads(metadata["numpy"])
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"torch_cuda_{index}" in tensors:
                torch.cuda.set_rng_state(tensors[f"torch_cuda_{index}"], index)


def restore_file(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    restore(path.read_bytes(), metadata)


def file_name(rank: int) -> str:
    return f"rng/rank_{rank:05d}.safetensors"
