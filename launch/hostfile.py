"""A DeepSpeed hostfile (`host slots=N` per line) from a SLURM allocation or a host list, for
users who prefer `deepspeed --hostfile` (which then needs ssh/pdsh, or `--launcher slurm`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from launch.env import LaunchError
from launch.hostlist import HostlistError, expand, expand_counts


def _gpus_per_node(env: Mapping[str, str]) -> int | None:
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    spec = env.get("SLURM_GPUS_PER_NODE", "")  # "8" or "a100:8"
    m = re.fullmatch(r"(?:[\w-]+:)?(\d+)", spec)
    return int(m.group(1)) if m else None


def hostfile_lines(
    env: Mapping[str, str] | None = None, nodelist: str | None = None, slots: int | None = None
) -> list[str]:
    """One `host slots=N` line per node. Nodes: `nodelist`, else the job's SLURM_JOB_NODELIST. Slots:
    `slots`, else the GPUs per node of the allocation, else its tasks per node."""
    env = os.environ if env is None else env
    nodelist = nodelist or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError(
            "no nodes: not inside a SLURM allocation (SLURM_JOB_NODELIST is unset); pass --nodelist 'gpu[01-04]'"
        )
    try:
        nodes = expand(nodelist)
    except HostlistError as e:
        raise LaunchError(str(e)) from None
    if slots is not None:
        per_node = [slots] * len(nodes)
    elif _gpus_per_node(env):
        per_node = [_gpus_per_node(env) or 0] * len(nodes)
    elif env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE"):
        spec = env.get("SLURM_TASKS_PER_NODE") or env["SLURM_NTASKS_PER_NODE"]
        counts = expand_counts(spec)
        per_node = counts if len(counts) == len(nodes) else [counts[0]] * len(nodes)
    else:
        raise LaunchError(
            "cannot tell how many GPUs each node has (no GPUs or tasks in the allocation); pass --slots N"
        )
    if any(n <= 0 for n in per_node):
        raise LaunchError(f"slots per node must be positive, got {per_node}; pass --slots N")
    return [f"{node} slots={n}" for node, n in zip(nodes, per_node, strict=True)]
