"""Process-group setup and the few collectives the training loop needs."""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pretrain.errors import PeerFailure, exit_code_of
from pretrain.logs import EVERY_RANK, get_logger
from pretrain.parallel.host_group import HostGroup

log = get_logger(__name__)

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


def env_world_size() -> int:
    """The world size the launcher (srun, mpirun, torchrun, deepspeed) gives, from its variables alone."""
    from launch import env_world_size as from_env

    return from_env()


def _join_timeout() -> float:
    return float(os.environ.get("PRETRAIN_JOIN_TIMEOUT", "300"))


def init_distributed(join_timeout: float | None = None, collective_timeout: float | None = None) -> DistInfo:
    """Join the process group described by the launcher's environment: srun (SLURM_*), mpirun
    (Open MPI, MPICH), torchrun or deepspeed (RANK, WORLD_SIZE, ...); a plain `python pretrain/main.py`
    becomes a world of one on loopback. `launch` resolves the variables (errors name the problem and
    the fix) and every rank checks in at rank 0 within `join_timeout` seconds (default
    $PRETRAIN_JOIN_TIMEOUT or 300), so a missing rank is named instead of waited for. Every group,
    DeepSpeed's included, gives up on a collective after `collective_timeout` seconds (default torch's:
    10 minutes on NCCL, 30 on gloo); `watchdog.collective_timeout` says why it must outlast the
    watchdog's deadlines. Idempotent."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from launch import LaunchError, batch_shell_warning, init_process_group, join, resolve
    from pretrain import deepspeed_compat as compat

    accelerator = get_accelerator()
    if not dist.is_initialized():
        note = batch_shell_warning()
        if note:
            log.warning(note, extra=EVERY_RANK)
        info = resolve()
        if info.master_port == 0:
            info = dataclasses.replace(info, master_port=free_port())
        info.export()
        if (
            accelerator.device_name() == "cuda"
            and device_index(info.local_rank, info.local_world_size) is None
        ):
            raise LaunchError(
                f"rank {info.rank} has LOCAL_RANK {info.local_rank} of {info.local_world_size} but {info.node} "
                f"shows it {torch.cuda.device_count()} GPUs (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                f"start one task per GPU (--ntasks-per-node equal to --gpus-per-node, or --gpus-per-task=1)"
            )
        store = join(info, _join_timeout() if join_timeout is None else join_timeout)
        device = _set_device(accelerator, info.local_rank, info.local_world_size)
        if device.type == "cuda" and device.index != info.local_rank:
            # GPUs bound per task: DeepSpeed takes LOCAL_RANK for the device index (its engine,
            # zero.Init), which is this task's only GPU. The node-local rank stays in launch's info.
            os.environ["LOCAL_RANK"] = str(device.index)
        # DeepSpeed still calls torch.distributed functions that torch has renamed; those warnings are theirs.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
        timeout = None if collective_timeout is None else timedelta(seconds=collective_timeout)
        if timeout is not None:
            _default_subgroup_timeout(timeout)
        init_process_group(info, store, accelerator.communication_backend_name(), timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _set_device(accelerator, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cpu = accelerator.device_name() == "cpu"
    if cpu and local_rank == 0:
        for path in compat.remove_orphaned_shm_buffers():
            log.info(f"removed {path}, left by a killed CPU run (no process maps it)")
    # Wraps the existing group (no second rendezvous) so DeepSpeed's comm layer knows about it.
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False
    )
    if cpu:  # every rank has mapped its peers' shared-memory buffers once all have left the init
        dist.barrier()
        compat.unlink_shm_allreduce_buffer(dist.get_rank())
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _default_subgroup_timeout(timeout: timedelta) -> None:
    """Make `timeout` the default of every group made later: torch's `new_group` without a timeout
    (DeepSpeed's data-, tensor-, pipeline- and expert-parallel groups) takes its module's defaults,
    not the world group's, so they would abort after 10 minutes whatever init_process_group was told."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def device_index(local_rank: int, local_world: int, visible: int | None = None) -> int | None:
    """This rank's GPU among those it sees: its local rank where the node's GPUs are all visible (one
    task per GPU), 0 where the scheduler bound GPUs to tasks (`srun --gpus-per-task=1`, or cgroups
    showing each task only its own), None where there are fewer GPUs than ranks to share them."""
    visible = torch.cuda.device_count() if visible is None else visible
    if local_rank < visible and visible >= local_world:
        return local_rank
    if visible == 1 or (visible > 1 and os.environ.get("SLURM_GPUS_PER_TASK")):
        return 0
    return None


def _set_device(accelerator: Any, local_rank: int, local_world: int) -> torch.device:
    if accelerator.device_name() == "cuda":
        index = device_index(local_rank, local_world)
        index = local_rank if index is None else index
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    # Several CPU ranks on one machine: give each its share of the cores instead of oversubscribing.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return torch.device("cpu")


def shutdown_distributed() -> None:
    """Destroy every process group; call only where all ranks are known to be alive and done with them."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over the ranks of `group` (default: all), returned as a new tensor."""
    out = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        out /= dist.get_world_size(group)
    return out


# Side-channel agreements wait this long for a rank that works alone (verifying data checksums, rank 0
# writing a resharding cache): far longer than a collective on the device may take.
SIDE_CHANNEL_TIMEOUT = timedelta(hours=2)
_side_channel: tuple[Any, HostGroup] | None = None


def side_channel() -> HostGroup | None:
    """The training thread's host-side group over every rank (None in a world of one); made on first
    use, which every rank reaches at the same point. Other threads make their own."""
    global _side_channel
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    world = dist.group.WORLD
    if _side_channel is None or _side_channel[0] is not world:  # made again after a new init
        _side_channel = (world, HostGroup(SIDE_CHANNEL_TIMEOUT))
    return _side_channel[1]


def side_channel_barrier() -> None:
    """Wait for every rank on the side channel: where one rank may work alone for long (rank 0
    deleting a run's old outputs), which must not meet the device groups' collective timeout."""
    group = side_channel()
    if group is not None:
        group.barrier()


def all_ranks_succeed(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank and agree on the outcome (on the side channel, whose timeout outlasts
    long work on one rank): if any rank raised, every rank raises (the failing ones their own error,
    the others PeerFailure carrying the failed ranks' highest exit code), instead of the healthy ranks
    hanging in the next collective until a timeout hides the real error."""
    error: BaseException | None = None
    result: T | None = None
    try:
        result = fn()
    except Exception as e:
        error = e
    code = exit_code_of(error) if error else 0
    group = side_channel()
    if group is not None:
        code = group.max([int(code)])[0]
    if error is not None:
        raise error
    if code > 0:
        raise PeerFailure(int(code))
    return result  # type: ignore[return-value]


def collective_device(group: Any = None) -> torch.device:
    """Where a tensor sent over `group` (default: the world) must live: NCCL moves only CUDA memory
    (a CPU tensor fails with "No backend type associated with device type cpu"), gloo host memory."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
