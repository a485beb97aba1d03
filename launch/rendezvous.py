"""Joining the job: every rank checks in at rank 0's TCPStore before the process group exists.

`join()` gives the rendezvous a deadline and a useful failure: a rank that cannot reach rank 0
says which address and port it tried; rank 0, when ranks are missing after `timeout` seconds,
names them and the nodes they should have come from, and every rank that did join exits with that
same message, instead of all of them sitting in torch's 30-minute rendezvous timeout. The store
then carries the process group (`init_process_group`) and the watchdog's heartbeats.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from typing import Any

from launch.env import LaunchError, LaunchInfo

_current: tuple[LaunchInfo, Any] | None = None  # (info, TCPStore) of this process, once joined


def current() -> tuple[LaunchInfo, Any] | None:
    """The LaunchInfo and rendezvous store of this process, or None before `join`."""
    return _current


def ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, rs, i = [], sorted(set(ranks)), 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        out.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ", ".join(out)


def check_address(info: LaunchInfo) -> None:
    try:
        socket.getaddrinfo(info.master_addr, info.master_port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LaunchError(
            f"MASTER_ADDR {info.master_addr!r} does not resolve on {info.node} ({e.strerror}); set MASTER_ADDR to "
            f"a name or address of rank 0's host that every node can resolve and reach"
        ) from None


def _open_store(info: LaunchInfo, timeout: float) -> Any:
    from torch.distributed import TCPStore

    wait = timedelta(seconds=timeout)
    if info.rank == 0:
        try:
            return TCPStore(info.master_addr, info.master_port, None, True, wait, wait_for_workers=False)
        except Exception as e:  # DistNetworkError, RuntimeError: address in use, no such interface
            raise LaunchError(
                f"rank 0 on {info.node} cannot listen on port {info.master_port} ({e}); another process (a second "
                f"job on this node?) may hold it: set MASTER_PORT to a free port"
            ) from None
    try:
        return TCPStore(info.master_addr, info.master_port, None, False, wait)
    except Exception as e:
        raise LaunchError(
            f"rank {info.rank} on {info.node} could not reach rank 0's rendezvous at {info.master_addr}:"
            f"{info.master_port} within {timeout:.0f} s ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Check that rank 0 started (its log), that {info.master_addr} is rank 0's host and reachable from "
            f"{info.node} on that port, or raise watchdog.join_timeout"
        ) from None


def _missing_message(info: LaunchInfo, store: Any, timeout: float) -> str:
    joined: dict[int, dict[str, Any]] = {}
    for r in range(info.world_size):
        if store.check([f"launch/join/{r}"]):
            joined[r] = json.loads(store.get(f"launch/join/{r}"))
    missing = [r for r in range(info.world_size) if r not in joined]
    lines = [
        f"{len(missing)} of {info.world_size} ranks did not join the rendezvous at {info.master_addr}:"
        f"{info.master_port} within {timeout:.0f} s (watchdog.join_timeout): missing ranks {ranges(missing)}"
    ]
    if info.nodes and info.tasks_per_node:
        per_node: dict[int, int] = {}
        for facts in joined.values():
            per_node[facts["node_rank"]] = per_node.get(facts["node_rank"], 0) + 1
        short = [
            f"{node} ({per_node.get(i, 0)} of {expected} joined)"
            for i, (node, expected) in enumerate(zip(info.nodes, info.tasks_per_node, strict=True))
            if per_node.get(i, 0) < expected
        ]
        lines.append(f"nodes short of ranks: {', '.join(short)}")
    by_node: dict[str, list[int]] = {}
    for r, facts in joined.items():
        by_node.setdefault(facts["node"], []).append(r)
    lines.append(
        "joined: " + "; ".join(f"ranks {ranges(rs)} on {node}" for node, rs in sorted(by_node.items()))
        if by_node
        else "joined: none"
    )
    lines.append(
        "Look at the missing ranks' output (srun prefixes lines with the rank), and at whether their nodes are up"
    )
    return "\n  ".join(lines)


def join(info: LaunchInfo, timeout: float) -> Any:
    """Check in at rank 0's store; returns the store once every rank has, else raises LaunchError."""
    global _current
    check_address(info)
    store = _open_store(info, timeout)
    me = {"rank": info.rank, "node": info.node, "node_rank": info.node_rank, "pid": os.getpid()}
    store.set(f"launch/join/{info.rank}", json.dumps(me))
    store.add("launch/joined", 1)
    if info.rank == 0:
        deadline, pause = time.monotonic() + timeout, 0.01
        while store.add("launch/joined", 0) < info.world_size:
            if time.monotonic() > deadline:
                message = _missing_message(info, store, timeout)
                store.set("launch/result", message)
                # Keep the store up until the ranks that joined have read why (a few seconds at most).
                joined, until = store.add("launch/joined", 0) - 1, time.monotonic() + 10
                while store.add("launch/acks", 0) < joined and time.monotonic() < until:
                    time.sleep(0.05)
                raise LaunchError(message)
            time.sleep(pause)
            pause = min(0.5, pause * 1.5)
        store.set("launch/result", "ok")
    else:
        try:
            store.wait(["launch/result"], timedelta(seconds=timeout + 60))
            result = store.get("launch/result").decode()
            store.add("launch/acks", 1)
        except Exception as e:
            raise LaunchError(
                f"rank {info.rank} on {info.node} joined, but rank 0 ({info.master_addr}) did not complete the "
                f"rendezvous ({type(e).__name__}); rank 0 has probably died: see its output"
            ) from None
        if result != "ok":  # rank 0 prints the whole message
            raise LaunchError(
                f"rank {info.rank} on {info.node}: rank 0 stopped the rendezvous: {result.splitlines()[0]}"
            )
    _current = (info, store)
    return store


def init_process_group(info: LaunchInfo, store: Any, backend: str, timeout: timedelta | None = None) -> None:
    """torch.distributed's default group over the joined store (no second rendezvous)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(
        backend, store=dist.PrefixStore("pg", store), rank=info.rank, world_size=info.world_size, **kwargs
    )
