"""Measured memory beside planned memory, per rank.

Each rank records its peak resident set (VmHWM: the process's high-water mark, so "after the first
step" includes the build) before the model exists, after its layers are built, after the engine is
built and after the first optimizer step of this process; on CUDA also the peak allocated device
memory after the build and after the first step. Beside it stands `pretrain.plan`'s estimate for the
same layout and this rank's pipeline stage, so a plan that is wrong for a real run shows in the run's
own files (`run_summary.json` `memory`) and on the console, not only at the next out-of-memory kill.

On a CPU the resident set also holds the interpreter, torch, DeepSpeed and the data's memory maps;
`baseline_bytes` (before the model) is what the planner's figure is to be compared against the growth
over.
"""

from __future__ import annotations

import contextlib
import json
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.logs import get_logger
from pretrain.train.callbacks.base import MEASURE, Callback, TrainerView

log = get_logger(__name__)
GIB = 2**30


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_peak_bytes() -> int:
    """This process's peak resident set so far (Linux VmHWM; elsewhere getrusage's maximum)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def host_resident_bytes() -> int:
    kib = _status_kib("VmRSS")
    return host_peak_bytes() if kib is None else kib * 1024


def device_peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def planned_bytes(cfg: Config, world_size: int, stage: int, device: torch.device) -> int:
    """pretrain.plan's peak for pipeline stage `stage` of this layout on this kind of device (its
    working memory only: no fragmentation margin or runtime reserve)."""
    from pretrain.plan.memory import CPU, CUDA, estimate_memory

    runtime = CUDA if device.type == "cuda" else CPU
    plan = estimate_memory(cfg, world_size, capacity=0, runtime=runtime)
    return next(s.peak for s in plan.stages if s.stage == stage)


@dataclass
class RankMemory:
    rank: int
    baseline_bytes: int  # resident before the model was built
    construction_peak_bytes: int = 0  # peak once this rank's layers exist (ZeRO-3: partitioned)
    build_peak_bytes: int = 0  # peak once the DeepSpeed engine exists
    step_peak_bytes: int = 0  # peak after the first optimizer step of this process
    planned_bytes: int = 0
    device_build_peak_bytes: int | None = None
    device_step_peak_bytes: int | None = None


def reset_host_peak() -> None:
    """Restart the high-water mark from the current resident set (Linux), so that a peak measured later
    is the peak since now, not an earlier moment's (imports, reading the data's index)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class MemoryMarks:
    """The build's side: call `mark_*` as the build passes each point."""

    def __init__(self, rank: int):
        reset_host_peak()
        self.record = RankMemory(rank=rank, baseline_bytes=host_resident_bytes())

    def mark_constructed(self) -> None:
        self.record.construction_peak_bytes = host_peak_bytes()

    def mark_built(self, cfg: Config, world_size: int, stage: int, device: torch.device) -> None:
        self.record.build_peak_bytes = host_peak_bytes()
        self.record.device_build_peak_bytes = device_peak_bytes(device)
        self.record.planned_bytes = planned_bytes(cfg, world_size, stage, device)


class MemoryReport(Callback):
    """After the first step of this process: every rank's figures to rank 0, which prints one line and
    writes them into run_summary.json as `memory` (a list, one entry per rank). A collective: on
    every rank."""

    priority = MEASURE + 1

    def __init__(self, marks: MemoryMarks, summary_path: Path | None):
        self.marks, self.summary_path = marks, summary_path
        self.done = False

    def on_step_end(self, trainer: TrainerView) -> None:
        if self.done:
            return
        self.done = True
        record = self.marks.record
        record.step_peak_bytes = host_peak_bytes()
        record.device_step_peak_bytes = device_peak_bytes(trainer.engine.device)
        records: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(records, asdict(record))
        if trainer.dist.is_main:
            log.info(describe(records))
            if self.summary_path is not None:
                write_memory(self.summary_path, records)


def describe(records: list[dict[str, Any]]) -> str:
    """One line: the rank with the highest peak after the first step, against its plan."""
    worst = max(records, key=lambda r: r["step_peak_bytes"])
    grown = (worst["step_peak_bytes"] - worst["baseline_bytes"]) / GIB
    line = (
        f"memory: peak resident {worst['step_peak_bytes'] / GIB:.2f} GiB on rank {worst['rank']} after the first "
        f"step ({worst['build_peak_bytes'] / GIB:.2f} GiB once built, {grown:.2f} GiB above the "
        f"{worst['baseline_bytes'] / GIB:.2f} GiB before the model); planned {worst['planned_bytes'] / GIB:.2f} GiB"
    )
    if worst["device_step_peak_bytes"] is not None:
        line += f"; device peak {worst['device_step_peak_bytes'] / GIB:.2f} GiB"
    return line + " (every rank: run_summary.json memory)"


def write_memory(summary_path: Path, records: list[dict[str, Any]]) -> None:
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["memory"] = records
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(summary_path)
