"""The CPU accelerator's shared-memory all-reduce buffer (deepspeed/ops/csrc/cpu/comm/shm.cpp).

When every rank is on one machine, each rank creates /dev/shm/<prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>
(69 MB) and maps its peers'; DeepSpeed never unlinks them, so each CPU run leaked one per rank.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SHM_DIRECTORY = "/dev/shm"
SHM_ALLREDUCE_PREFIX = "deepspeed_allreduce_buffer"


def shm_allreduce_buffer(rank: int) -> Path:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path(SHM_DIRECTORY) / f"{SHM_ALLREDUCE_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_shm_allreduce_buffer(rank: int) -> None:
    """Remove this rank's buffer name once every peer has mapped it (DeepSpeed's init maps all peers'
    buffers before it returns: call after a barrier that follows it). The mappings stay usable, and
    the memory goes back to the system when the last process exits, however it exits."""
    shm_allreduce_buffer(rank).unlink(missing_ok=True)


def remove_orphaned_shm_buffers(min_age_s: float = 60.0) -> list[Path]:
    """This user's buffers that no process maps any more (left by a run killed during its start-up),
    older than `min_age_s` so that one another run is creating right now is never touched."""
    directory = Path(SHM_DIRECTORY)
    prefix = f"{SHM_ALLREDUCE_PREFIX}_{os.getuid()}_"
    try:
        candidates = [p for p in directory.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    now = time.time()
    candidates = [p for p in candidates if _age(p, now) > min_age_s]
    if not candidates:
        return []
    mapped = _mapped_shm_names()
    removed = []
    for path in candidates:
        if path.name not in mapped:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _mapped_shm_names() -> set[str]:
    """Names under /dev/shm that some process of this machine has mapped (from /proc/*/maps)."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or another user's
            continue
        for line in text.splitlines():
            where = line.find(SHM_DIRECTORY + "/")
            if where >= 0:
                names.add(line[where + len(SHM_DIRECTORY) + 1 :].split(" ")[0])
    return names
