"""Pre-flight check, right after the process group exists and before anything is built.

Every rank reports what it runs (code commit and a hash of the sources, config hash, Python,
torch, DeepSpeed, CUDA, NCCL, device model and count, the address it reaches the rendezvous from);
all of it is gathered on every rank. Disagreement aborts on every rank alike with one table that
names the odd ranks and their nodes: a node with a stale checkout, another torch, a different
config, a GPU missing. Rank 0 prints a one-screen summary and writes every rank's facts to
run.dir/launch.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

from launch.env import LaunchError, LaunchInfo
from launch.hostlist import compress
from launch.rendezvous import ranges
from pretrain.logs import get_logger

REPO = Path(__file__).resolve().parent.parent
log = get_logger("launch.preflight")


class PreflightMismatch(LaunchError):
    """The ranks disagree on what they run; every rank found the same table, rank 0 prints it."""

    def report(self, rank: int) -> str | None:
        return f"error: {self}" if rank == 0 else None


# Facts every rank must share; a difference is an error naming the odd ranks.
MUST_AGREE = (
    "commit",
    "sources",
    "config",
    "python",
    "torch",
    "deepspeed",
    "cuda",
    "nccl",
    "device",
    "device_name",
)
_LABELS = {"sources": "source files", "config": "config hash", "device_name": "device model"}


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_hash(root: Path = REPO) -> str:
    """sha256 over the framework's Python sources (pretrain/, launch/): catches uncommitted edits and
    checkouts that differ between nodes, which the commit alone does not."""
    digest = hashlib.sha256()
    for package in ("pretrain", "launch"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _route_address(info: LaunchInfo) -> str:
    """The local address this rank reaches rank 0's host from (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((info.master_addr, info.master_port or 1))
            return str(s.getsockname()[0])
    except OSError:
        return "unknown"


def local_facts(info: LaunchInfo, config_text: str) -> dict[str, Any]:
    import deepspeed
    import torch

    cuda = torch.cuda.is_available()
    facts: dict[str, Any] = {
        "rank": info.rank,
        "local_rank": info.local_rank,
        "local_world_size": info.local_world_size,
        "node": info.node,
        "node_rank": info.node_rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "commit": _git_commit(),
        "sources": source_hash(),
        "config": hashlib.sha256(config_text.encode()).hexdigest()[:12],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(torch.cuda.current_device()) if cuda else "cpu",
        "device_count": torch.cuda.device_count() if cuda else None,
        # Which physical GPU this rank uses: with GPUs bound per task every rank sees one, as "0".
        "device_uuid": str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        if cuda
        else None,
        "route": _route_address(info),
        "socket_ifname": os.environ.get("NCCL_SOCKET_IFNAME") or os.environ.get("GLOO_SOCKET_IFNAME"),
    }
    return facts


def _where(facts: list[dict[str, Any]]) -> str:
    nodes = list(dict.fromkeys(f["node"] for f in facts))
    return f"rank{'s' * (len(facts) > 1)} {ranges([f['rank'] for f in facts])} ({compress(nodes)})"


def problems(gathered: list[dict[str, Any]]) -> list[str]:
    """Every disagreement between ranks, each naming the ranks and nodes on each side."""
    out = []
    for key in MUST_AGREE:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for facts in gathered:
            groups.setdefault(facts[key], []).append(facts)
        if len(groups) > 1:
            ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
            sides = "; ".join(f"{value} on {_where(members)}" for value, members in ordered)
            out.append(f"{_LABELS.get(key, key)}: {sides}")
    if gathered and gathered[0]["device"] == "cuda":
        out += _gpu_problems(gathered)
    return out


def node_gpus(members: list[dict[str, Any]]) -> int:
    """The GPUs a node has for its ranks: all it shows them (one task per GPU, node-wide visibility),
    or the distinct GPUs its ranks use (GPUs bound per task, each rank seeing one)."""
    return max(max(m["device_count"] for m in members), len({m.get("device_uuid") for m in members}))


def _gpu_problems(gathered: list[dict[str, Any]]) -> list[str]:
    out = []
    by_node: dict[str, list[dict[str, Any]]] = {}
    for facts in gathered:
        by_node.setdefault(facts["node"], []).append(facts)
    counts: dict[int, list[str]] = {}
    for node, members in by_node.items():
        counts.setdefault(node_gpus(members), []).append(node)
    if len(counts) > 1:
        sides = "; ".join(f"{count} on {compress(nodes)}" for count, nodes in sorted(counts.items()))
        out.append(f"GPUs per node: {sides} (every node must have the same number)")
    for node, members in by_node.items():
        users: dict[Any, list[int]] = {}
        for m in members:
            users.setdefault(m.get("device_uuid"), []).append(m["rank"])
        shared = [ranks for ranks in users.values() if len(ranks) > 1]
        if shared:
            out.append(
                f"node {node}: ranks {ranges(shared[0])} share one GPU ({len(members)} ranks, {node_gpus(members)} "
                f"GPUs): start one task per GPU (--ntasks-per-node = --gpus-per-node, or --gpus-per-task=1)"
            )
            break
    return out


def summary(info: LaunchInfo, gathered: list[dict[str, Any]], details: Path | None) -> str:
    first = gathered[0]
    per_node: dict[str, list[dict[str, Any]]] = {}
    for facts in gathered:
        per_node.setdefault(facts["node"], []).append(facts)
    sizes = sorted({len(v) for v in per_node.values()})
    shape = f"{sizes[0]} per node" if len(sizes) == 1 else f"{'/'.join(map(str, sizes))} per node"
    started = info.describe().split("started by ")[1].split(";")[0]
    lines = [
        f"launch: {info.world_size} rank{'s' * (info.world_size > 1)} on {len(per_node)} node"
        f"{'s' * (len(per_node) > 1)} ({shape}), started by {started}; rendezvous {info.master_addr}:{info.master_port}"
    ]
    names = list(per_node)
    shown = names if len(names) <= 8 else [*names[:4], *names[-2:]]
    for node in shown:
        members = per_node[node]
        device = members[0]["device_name"] if members[0]["device"] == "cuda" else "cpu"
        count = f"{node_gpus(members)} x " if members[0]["device_count"] else ""
        lines.append(
            f"  {node}: rank{'s' * (len(members) > 1)} {ranges([m['rank'] for m in members])}, {count}{device}, "
            f"reaches the rendezvous from {members[0]['route']}"
        )
        if len(names) > 8 and node == names[3]:
            lines.append(f"  ... {len(names) - 6} more nodes ...")
    software = f"python {first['python']}, torch {first['torch']}, deepspeed {first['deepspeed']}"
    if first["cuda"]:
        software += f", CUDA {first['cuda']}, NCCL {first['nccl']}"
    lines.append(
        f"  same on every rank: code {first['commit']} (sources {first['sources']}), config {first['config']}, {software}"
    )
    if details is not None:
        lines.append(f"  every rank's values: {details}")
    return "\n".join(lines)


def preflight(info: LaunchInfo, config_text: str, run_dir: Path | None = None) -> list[dict[str, Any]]:
    """Gather every rank's facts (a collective: call it on every rank), raise PreflightMismatch on any
    disagreement, print the summary on rank 0 and write run_dir/launch.json there."""
    import torch.distributed as dist

    facts = local_facts(info, config_text)
    gathered: list[Any] = [None] * info.world_size
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_gather_object(gathered, facts)
    else:
        gathered = [facts]
    found = problems(gathered)
    if found:
        raise PreflightMismatch(
            "pre-flight check failed, the ranks disagree (nothing was started):\n  - "
            + "\n  - ".join(found)
            + "\nEvery rank must run the same code, config and software on the same kind of device: "
            "sync the checkout and environment on the odd nodes, or exclude them (sbatch --exclude=...)"
        )
    if info.rank == 0:
        details = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            details = run_dir / "launch.json"
            record = {"launch": info.as_dict(), "ranks": gathered}
            details.write_text(json.dumps(record, indent=1) + "\n")
        log.info(summary(info, gathered, details))
    return gathered
