"""Sockets each rank opens for one host-side side channel (prints JSON): a flat gloo group over every
rank against the two-level one of `pretrain.parallel.host_group` (node groups + a group of node
leaders), measured on CPU processes whose nodes are named as a cluster's would be, then stated for
large worlds by the same rule.

    python bench/side_channels.py [--output bench/results/side-channels-DATE.json]

The run keeps two side channels (the training thread's and the checkpoint writer's), so a rank holds
twice the figure; before they were two flat groups, 2 x (world - 1) sockets per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH")])
)


def connected_sockets() -> int:
    import psutil

    return sum(c.status == psutil.CONN_ESTABLISHED for c in psutil.Process().net_connections(kind="tcp"))


def measure(ranks_per_node: int) -> dict[str, Any]:
    """On one rank: the connections a two-level side channel adds, then those a flat gloo group adds."""
    from datetime import timedelta

    import torch.distributed as dist

    from pretrain.parallel.host_group import HostGroup

    rank = dist.get_rank()
    before = connected_sockets()
    group = HostGroup(timedelta(seconds=120), node=f"node{rank // ranks_per_node}")
    group.barrier()
    two_level = connected_sockets() - before
    before = connected_sockets()
    flat = dist.new_group(backend="gloo")
    dist.barrier(group=flat)
    return {"leader": group.is_leader, "two_level": two_level, "flat": connected_sockets() - before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    import side_channels  # the ranks import the worker by this name, not as __main__

    from pretrain.parallel.host_group import sockets_per_rank
    from pretrain.testing import run_distributed

    measured = []
    for world, per_node in ((4, 2), (8, 2), (8, 4)):
        ranks = run_distributed(side_channels.measure, world, per_node)
        measured.append(
            {
                "world_size": world,
                "ranks_per_node": per_node,
                "flat_per_rank": sorted({r["flat"] for r in ranks}),
                "two_level_per_rank": sorted({r["two_level"] for r in ranks if not r["leader"]}),
                "two_level_per_leader": sorted({r["two_level"] for r in ranks if r["leader"]}),
                "rule": sockets_per_rank(world, per_node),
            }
        )
    at_scale = [{"world_size": w, "ranks_per_node": 8, **sockets_per_rank(w, 8)} for w in (512, 4096, 16384)]
    result = {"bench": "side_channels", "measured": measured, "by_the_rule": at_scale}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
