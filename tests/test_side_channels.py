"""The host-side side channels in two levels (node groups and a group of node leaders), and the
collective timeout that every group, DeepSpeed's included, takes from watchdog.collective_timeout."""

import time

import psutil
import pytest

from conftest import REPO
from pretrain.parallel.host_group import NodeLayout, sockets_per_rank
from pretrain.testing import run_distributed

TINY = REPO / "configs" / "tiny.yaml"


def tcp_sockets() -> int:
    """Connected TCP sockets of this process (gloo also listens on one more per group)."""
    return sum(c.status == psutil.CONN_ESTABLISHED for c in psutil.Process().net_connections(kind="tcp"))


def agree(nodes):
    """On 4 ranks placed on `nodes`: what each operation of a two-level group returns, and the TCP
    sockets it opened, against a flat gloo group over the same ranks."""
    from datetime import timedelta

    import torch.distributed as dist

    from pretrain.parallel.host_group import HostGroup

    rank = dist.get_rank()
    before = tcp_sockets()
    group = HostGroup(timedelta(seconds=60), node=nodes[rank])
    group.barrier()
    two_level = tcp_sockets() - before
    before = tcp_sockets()
    flat = dist.new_group(backend="gloo")
    dist.barrier(group=flat)
    flat_sockets = tcp_sockets() - before
    return {
        "max": group.max([rank, 10 - rank, 0]),
        "any": group.any_rank(rank == 2, False),
        "broadcast": group.broadcast({"from": rank}),
        "gather": group.gather(f"r{rank}"),
        "gather_to_root": group.gather_to_root(rank * rank),
        "leader": group.is_leader,
        "sockets": two_level,
        "flat_sockets": flat_sockets,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "nodes", [("a", "a", "b", "b"), ("a", "b", "a", "b"), ("a",) * 4], ids=["blocks", "cyclic", "one-node"]
)
def test_two_level_side_channel_agrees_like_one_group_with_fewer_sockets(nodes):
    results = run_distributed(agree, 4, nodes)
    for rank, got in enumerate(results):
        assert got["max"] == [3, 10, 0] and got["any"] == [True, False]
        assert got["broadcast"] == {"from": 0}
        assert got["gather"] == ["r0", "r1", "r2", "r3"]
        assert got["gather_to_root"] == ([0, 1, 4, 9] if rank == 0 else None)
    # The first rank of each node leads it, wherever the ranks of a node sit in the world.
    assert [r["leader"] for r in results] == [nodes.index(node) == rank for rank, node in enumerate(nodes)]
    # Measured: a gloo group holds one connection per pair of its members. Flat: 3 per rank (world - 1);
    # two levels: 1 (ranks per node - 1), and 1 more on a leader (nodes - 1).
    expected = sockets_per_rank(4, nodes.count(nodes[0]))
    assert [r["flat_sockets"] for r in results] == [expected["flat"]] * 4
    assert [r["sockets"] for r in results] == [
        expected["two_level_leader"] if r["leader"] else expected["two_level_rank"] for r in results
    ]


def test_sockets_per_rank_at_4096_ranks():
    assert sockets_per_rank(4096, 8) == {"flat": 4095, "two_level_rank": 7, "two_level_leader": 518}
    layout = NodeLayout.of(["n2", "n1", "n2", "n1", "n3"])
    assert layout.nodes == ((0, 2), (1, 3), (4,)) and layout.leaders == (0, 1, 4)


def hang_on_a_deepspeed_group():
    """Rank 1 never joins rank 0's all-reduce on DeepSpeed's tensor-parallel group: rank 0 must give up
    after the collective timeout (3 s), not after the 30 minutes torch gives groups by default."""
    import torch
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.parallel.topology import build_parallel_context

    cfg = load_config(TINY, ["parallel.tp=2"], world_size=2)
    ctx = build_parallel_context(cfg, dist.get_rank(), 2)
    if dist.get_rank() == 1:  # back before rank 0's next collective (the world's) times out too
        time.sleep(4.5)
        return None
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=ctx.tp_group)
    except RuntimeError as e:
        return time.monotonic() - started, str(e)[:200]
    return None


@pytest.mark.slow
def test_groups_made_by_deepspeed_take_the_collective_timeout():
    (waited, error), _ = run_distributed(hang_on_a_deepspeed_group, 2, collective_timeout=3.0, timeout=120)
    assert 2.5 < waited < 4.5 and "Timed out" in error, (waited, error)


def test_collective_timeout_must_outlast_the_watchdog():
    from pretrain.config import ConfigError, load_config

    cfg = load_config(TINY, [])
    assert cfg.watchdog.collective_timeout is None
    assert cfg.watchdog.resolved_collective_timeout() == 1800 + 300  # first_step_timeout + 300 s
    cfg = load_config(TINY, ["watchdog.step_timeout=0", "watchdog.first_step_timeout=0"])
    assert cfg.watchdog.resolved_collective_timeout() is None  # nothing to outlast: torch's default
    assert (
        load_config(TINY, ["watchdog.collective_timeout=1900"]).watchdog.resolved_collective_timeout() == 1900
    )
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["watchdog.collective_timeout=600"])
    assert "watchdog.collective_timeout=600 does not outlast watchdog.first_step_timeout=1800 by 60 s" in str(
        e.value
    ) and "Use watchdog.collective_timeout=2100 (or null), or lower watchdog.first_step_timeout" in str(
        e.value
    )
    with pytest.raises(ConfigError, match=r"watchdog.collective_timeout must be > 0 seconds"):
        load_config(TINY, ["watchdog.collective_timeout=0"])
