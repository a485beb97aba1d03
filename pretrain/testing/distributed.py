"""Run a function on N fresh CPU processes joined in a gloo process group.

Each process is forked from multiprocessing's fork server, a clean process that has only imported
torch, DeepSpeed and this package (so each rank starts without seconds of imports, and inherits no
state from the test runner). It gets the test runner's current environment plus what a launcher
would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT on loopback, DS_ACCELERATOR=cpu),
joins the group through DeepSpeed, runs `fn(*args)` and sends back its return value. A failure on
any rank is re-raised with that rank's traceback; a hang is cut off by `timeout`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

from pretrain.parallel.distributed import free_port

# Imported once by the fork server; a module that fails to import there is simply imported by each rank.
_PRELOAD = ["torch", "deepspeed", "pretrain.train", "pretrain.parallel", "pretrain.convert"]


class DistributedTestError(RuntimeError):
    pass


def _worker(
    rank: int,
    world_size: int,
    port: int,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    collective_timeout: float | None = None,
) -> None:
    os.environ.clear()  # the fork server's environment is that of its start, not the test's now
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    try:
        import torch.distributed as dist

        from pretrain.parallel.distributed import init_distributed

        init_distributed(collective_timeout=collective_timeout)
        value = fn(*args)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    collective_timeout: float | None = None,
) -> list[Any]:
    """`fn(*args)` on ranks 0..world_size-1; returns the values in rank order. `fn` must be importable
    by name (a module-level function): it is sent to the ranks by reference. `collective_timeout`:
    as watchdog.collective_timeout gives it to `init_distributed`."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, dict(os.environ), fn, args, results, collective_timeout),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise DistributedTestError(
                    f"{world_size - len(values) - len(failures)} of {world_size} ranks did not finish within "
                    f"{timeout:.0f}s (finished: {sorted(values)}, failed: {len(failures)})"
                ) from None
            if ok:
                values[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
                break  # the others are likely blocked in a collective waiting for this one
    finally:
        for proc in procs:
            proc.join(timeout=5 if not failures else 0.5)
            if proc.is_alive():
                proc.kill()
    if failures:
        raise DistributedTestError("a rank failed:\n" + "\n".join(failures))
    return [values[rank] for rank in range(world_size)]
