"""Process-group setup and the few collectives the training loop needs."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# World-size variables of the launchers we read, in order: torch/deepspeed, Open MPI, MPICH/Intel MPI (PMI).
_WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def env_world_size() -> int:
    for var in _WORLD_SIZE_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 1


def launched_by_mpi() -> bool:
    return "RANK" not in os.environ and any(var in os.environ for var in _WORLD_SIZE_VARS[1:])


def set_env_from_mpi() -> None:
    """Under `mpirun`, derive the torch.distributed environment through mpi4py (imported only here).
    The rendezvous is rank 0's host (MASTER_ADDR overrides it) on MASTER_PORT or 29500."""
    import socket

    from mpi4py import MPI

    world = MPI.COMM_WORLD
    local_rank = world.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    local_size = world.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    master = os.environ.get("MASTER_ADDR") or world.bcast(socket.getfqdn() if world.Get_rank() == 0 else None)
    os.environ.update(
        RANK=str(world.Get_rank()),
        WORLD_SIZE=str(world.Get_size()),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_size),
        MASTER_ADDR=master,
        MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
    )


def init_distributed() -> DistInfo:
    """Join the process group described by the launcher's environment (deepspeed, torchrun, mpirun);
    a plain `python pretrain/main.py` becomes a world of one on loopback."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if launched_by_mpi():
        set_env_from_mpi()
    elif "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Several CPU ranks on one machine: give each its share of the cores instead of oversubscribing.
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    # DeepSpeed still calls torch.distributed functions that torch has renamed; those warnings are theirs.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False
        )
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def all_reduce_mean(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over the ranks of `group` (default: all), returned as a new tensor."""
    out = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        out /= dist.get_world_size(group)
    return out


class PeerFailure(RuntimeError):
    """Raised on ranks that succeeded when another rank failed the same collective step."""


def all_ranks_succeed(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank and agree on the outcome (one all-reduce): if any rank raised, every
    rank raises (the failing ones their own error, the others PeerFailure), instead of the healthy
    ranks hanging in the next collective until a timeout hides the real error."""
    error: BaseException | None = None
    result: T | None = None
    try:
        result = fn()
    except Exception as e:
        error = e
    flag = torch.tensor([1.0 if error else 0.0], device=_collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise PeerFailure("another rank failed (its error is printed by that rank); stopping here too")
    return result  # type: ignore[return-value]


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
