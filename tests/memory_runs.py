"""Training runs that report their memory, for tests/test_zero3_memory.py (importable by spawned ranks)."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

M_MMAP_THRESHOLD = -3


def train_and_read_memory(overrides: list[str], run_dir: str) -> list[dict[str, Any]] | None:
    """train_and_read_metrics, then run_summary.json's `memory` (rank 0; None elsewhere). Allocations of
    64 KiB and more get their own mmap, so a freed tensor leaves the resident set at once and the
    peak follows live tensor bytes (see tests/plan_memory_probe.py)."""
    import torch.distributed as dist

    from training_runs import train_and_read_metrics

    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 65536)
    train_and_read_metrics(overrides, run_dir)
    if dist.get_rank() != 0:
        return None
    return json.loads((Path(run_dir) / "run_summary.json").read_text())["memory"]
