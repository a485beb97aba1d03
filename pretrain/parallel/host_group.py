"""Host-side side channels: a few integers or small objects agreed on by every rank, over gloo, in two
levels so that the sockets a rank opens do not grow with the world.

A gloo group connects each member to every other one when it is made (one TCP connection per pair):
a flat group over 4,096 ranks costs every rank 4,095 sockets, and eight ranks per node 32,760 of
the node's ports, per group. Here the ranks of one node form a group, and the first rank of each node
(its leader) joins a group of leaders: a rank opens (ranks per node - 1) sockets, a leader also
(nodes - 1). At 4,096 ranks on 512 nodes of 8: 7 per rank, 518 per leader (`sockets_per_rank`).

Each operation goes up to the leaders, across them, and back down: three small messages on the host,
never on the device and never on the training thread's groups, with the timeout given (a long one:
these carry start-up and checkpoint agreement, where one rank may work alone for a long time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class NodeLayout:
    """Which ranks share a node (rank order within a node; nodes ordered by their first rank)."""

    nodes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, node_of_rank: list[str]) -> NodeLayout:
        members: dict[str, list[int]] = {}
        for rank, node in enumerate(node_of_rank):
            members.setdefault(node, []).append(rank)
        return cls(tuple(tuple(ranks) for ranks in sorted(members.values(), key=lambda r: r[0])))

    def node_ranks(self, rank: int) -> tuple[int, ...]:
        return next(ranks for ranks in self.nodes if rank in ranks)

    @property
    def leaders(self) -> tuple[int, ...]:
        return tuple(ranks[0] for ranks in self.nodes)


def sockets_per_rank(world_size: int, ranks_per_node: int) -> dict[str, int]:
    """The gloo connections one rank opens for one side channel: flat, and in two levels."""
    nodes = -(-world_size // ranks_per_node)
    return {
        "flat": world_size - 1,
        "two_level_rank": ranks_per_node - 1,
        "two_level_leader": ranks_per_node - 1 + nodes - 1,
    }


def this_node() -> str:
    """The scheduler's name for this node (as the launch resolved it), else the hostname."""
    from launch.rendezvous import current

    joined = current()
    return joined[0].node if joined is not None else os.uname().nodename


class HostGroup:
    """Every rank's side channel: MAX of flags, rank 0's object to all, every rank's object to all or
    to rank 0, and a barrier. Every rank must construct it, and call each method, at the same point."""

    def __init__(self, timeout: timedelta, node: str | None = None):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        names: list[Any] = [None] * self.world_size
        dist.all_gather_object(names, node or this_node())
        self.layout = NodeLayout.of(names)
        self.local: Any = None
        self.leaders: Any = None
        # Every rank calls new_group for every group in the same order (torch names groups by count);
        # a rank outside a group gets a placeholder and opens no connection for it.
        for ranks in self.layout.nodes:
            group = dist.new_group(list(ranks), timeout=timeout, backend="gloo") if len(ranks) > 1 else None
            if self.rank in ranks:
                self.local = group
        node_ranks = self.layout.node_ranks(self.rank)
        self.local_ranks, self.leader = node_ranks, node_ranks[0]
        if len(self.layout.nodes) > 1:
            group = dist.new_group(list(self.layout.leaders), timeout=timeout, backend="gloo")
            self.leaders = group if self.rank == self.leader else None

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    def any_rank(self, *flags: bool) -> list[bool]:
        """For each flag: whether it is set on any rank."""
        return [bool(v) for v in self.max([int(f) for f in flags])]

    def max(self, values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64)
        if len(self.layout.nodes) == 1 and self.local is not None:  # one node: one all-reduce, not two
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.local)
            return [int(v) for v in tensor.tolist()]
        if self.local is not None:
            dist.reduce(tensor, dst=self.leader, op=dist.ReduceOp.MAX, group=self.local)
        if self.leaders is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.leaders)
        if self.local is not None:
            dist.broadcast(tensor, src=self.leader, group=self.local)
        return [int(v) for v in tensor.tolist()]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (rank 0 leads the first node)."""
        box = [obj]
        if self.leaders is not None:
            dist.broadcast_object_list(box, src=0, group=self.leaders)
        if self.local is not None:
            dist.broadcast_object_list(box, src=self.leader, group=self.local)
        return box[0]

    def gather_to_root(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` in rank order on rank 0; None elsewhere."""
        mine = self._gather_node(obj)
        if mine is None:
            return None
        nodes: list[Any] = [mine]
        if self.leaders is not None:
            nodes = [None] * len(self.layout.nodes) if self.rank == 0 else []
            dist.gather_object(mine, nodes if self.rank == 0 else None, dst=0, group=self.leaders)
        return self._in_rank_order(nodes) if self.rank == 0 else None

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        return self.broadcast(self.gather_to_root(obj))

    def barrier(self) -> None:
        self.max([0])

    def _gather_node(self, obj: Any) -> list[Any] | None:
        """The objects of this node's ranks on its leader; None elsewhere."""
        if self.local is None:
            return [obj]
        out: list[Any] = [None] * len(self.local_ranks) if self.is_leader else []
        dist.gather_object(obj, out if self.is_leader else None, dst=self.leader, group=self.local)
        return out if self.is_leader else None

    def _in_rank_order(self, per_node: list[list[Any]]) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        for ranks, objects in zip(self.layout.nodes, per_node, strict=True):
            for rank, value in zip(ranks, objects, strict=True):
                out[rank] = value
        return out
