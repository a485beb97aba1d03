"""One description of this process's place in the job, from whatever started it.

`resolve()` reads, in this order of precedence:

1. torch-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) as set by `torchrun`, the
   `deepspeed` launcher, or by hand;
2. MPI: Open MPI's OMPI_COMM_WORLD_* or MPICH / Intel MPI's PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
   (`mpirun`/`mpiexec`, also under SLURM, where Hydra's proxies are themselves srun tasks);
   rank 0's address and a free port come from mpi4py when MASTER_ADDR/MASTER_PORT are not set;
3. SLURM: an `srun` task (SLURM_STEP_ID set): SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS,
   SLURM_STEP_TASKS_PER_NODE, the first host of SLURM_STEP_NODELIST as MASTER_ADDR and a port derived
   from the job and step id. The batch shell itself (no step) is a world of one;
4. nothing: a world of one on loopback.

MASTER_ADDR and MASTER_PORT set in the environment always win. Values that contradict the
scheduler (a WORLD_SIZE exported in a batch script and thus the same on every task, ...) are an
error that names both and the fix, instead of a hang at the rendezvous.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from launch.hostlist import HostlistError, expand, expand_counts
from pretrain.errors import LaunchError

# Ports derived from a SLURM job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's ephemeral
# range (32768-60999), so they never collide with a port some process was handed by the kernel.
PORT_BASE = 20000
PORT_SPAN = 10000
DEFAULT_PORT = 29500  # torch's and DeepSpeed's default, for MPI launches without mpi4py


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int  # this node's index among the job's nodes
    num_nodes: int
    master_addr: str
    master_port: int
    node: str  # the scheduler's name for this node (SLURMD_NODENAME), else the hostname
    source: str  # slurm, openmpi, mpich, torchrun, deepspeed, env, single
    job_id: str | None = None  # SLURM job (and step) or None
    nodes: tuple[str, ...] = ()  # the step's nodes (SLURM), for error messages about missing ranks
    tasks_per_node: tuple[int, ...] = ()  # how many tasks each of `nodes` runs (SLURM)

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed, DeepSpeed and our code read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def export(self, environ: os._Environ[str] | dict[str, str] | None = None) -> None:
        (os.environ if environ is None else environ).update(self.torch_env())

    def describe(self) -> str:
        where = {
            "slurm": f"srun (SLURM job {self.job_id})",
            "openmpi": "mpirun (Open MPI)",
            "mpich": "mpiexec (MPICH/PMI)",
            "torchrun": "torchrun",
            "deepspeed": "the deepspeed launcher",
            "env": "RANK/WORLD_SIZE from the environment",
            "single": "a single process",
        }[self.source]
        return (
            f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) on "
            f"{self.node}, node {self.node_rank + 1}/{self.num_nodes}, started by {where}; "
            f"rendezvous {self.master_addr}:{self.master_port}"
        )

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def _port(env: Mapping[str, str], default: int) -> int:
    if "MASTER_PORT" not in env:
        return default
    port = _int(env, "MASTER_PORT")
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


def _hostname() -> str:
    return socket.gethostname().split(".")[0]


def slurm_port(job_id: str, step_id: str = "0") -> int:
    """A port every task of a step derives alike from the job and step id. Two steps of one job
    running at the same time get different ports; so do jobs whose ids differ by less than 10000."""
    try:
        job, step = int(job_id.split("_")[0]), int(step_id) if step_id.isdigit() else 0
    except ValueError:
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not a job number; set MASTER_PORT") from None
    return PORT_BASE + (job + 7919 * step) % PORT_SPAN


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def _mpi_flavour(env: Mapping[str, str]) -> str | None:
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        return "openmpi"
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return "mpich"
    return None


def env_world_size(environ: Mapping[str, str] | None = None) -> int:
    """The world size, from variables alone (no MPI calls): for reading the config before joining."""
    env = os.environ if environ is None else environ
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in env:
            return _int(env, name)
    if _in_slurm_step(env):
        return _int(env, "SLURM_STEP_NUM_TASKS")
    return 1


def _slurm_layout(env: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not nodelist:
        raise LaunchError(
            "in an srun step but SLURM_STEP_NODELIST, SLURM_JOB_NODELIST and SLURM_NODELIST are all unset; "
            "set MASTER_ADDR to the host of task 0"
        )
    try:
        nodes = tuple(expand(nodelist))
        counts = tuple(expand_counts(per_node)) if per_node else ()
    except HostlistError as e:
        raise LaunchError(
            f"cannot read the SLURM allocation: {e}; set MASTER_ADDR to the host of task 0"
        ) from e
    if counts and len(counts) != len(nodes):
        counts = ()  # a layout we cannot pair up; only used for messages and LOCAL_WORLD_SIZE
    return nodes, counts


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    nodes, counts = _slurm_layout(env)
    node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    local_world = counts[node_rank] if counts and node_rank < len(counts) else 1
    job, step = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID", "0"), env.get("SLURM_STEP_ID", "0")
    if counts and sum(counts) != world:
        raise LaunchError(
            f"the SLURM step has {world} tasks (SLURM_STEP_NUM_TASKS) but its nodes run "
            f"{'+'.join(map(str, counts))} = {sum(counts)} (SLURM_STEP_TASKS_PER_NODE); "
            f"this is a broken environment, not a setting: launch the tasks with plain srun"
        )
    return LaunchInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=len(nodes) or 1,
        master_addr=env.get("MASTER_ADDR") or nodes[0],
        master_port=_port(env, slurm_port(job, step)),
        node=env.get("SLURMD_NODENAME") or _hostname(),
        source="slurm",
        job_id=f"{job}.{step}",
        nodes=nodes,
        tasks_per_node=counts,
    )


def _from_mpi(env: Mapping[str, str], flavour: str, use_mpi4py: bool) -> LaunchInfo:
    if flavour == "openmpi":
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else None
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else None
        node_rank = _int(env, "OMPI_COMM_WORLD_NODE_RANK") if "OMPI_COMM_WORLD_NODE_RANK" in env else None
    else:
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_rank = _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else None
        local_world = _int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else None
        node_rank = None
        if local_rank is None and _in_slurm_step(env):  # srun --mpi=pmi2: tasks are ranks
            local_rank = _int(env, "SLURM_LOCALID")
            node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else None
            _, counts = _slurm_layout(env)
            if counts and node_rank is not None and node_rank < len(counts):
                local_world = counts[node_rank]
    node = env.get("SLURMD_NODENAME") or env.get("PMI_HOSTNAME") or _hostname()
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    num_nodes = None
    if use_mpi4py and world > 1 and (local_rank is None or addr is None or port is None or node_rank is None):
        try:
            from mpi4py import MPI
        except ImportError:
            pass  # what is still unknown below is an error that says to install it
        else:
            comm = MPI.COMM_WORLD
            if comm.Get_size() != world or comm.Get_rank() != rank:
                raise LaunchError(
                    f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()} but the environment says rank {rank} "
                    f"of {world}: mpi4py was built for another MPI than the one that started this process. "
                    f"Use the mpiexec of the same MPI (pip's `mpich` next to mpi4py, or set MPI4PY_MPIABI)"
                )
            shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
            local_rank, local_world = shared.Get_rank(), shared.Get_size()
            leaders = comm.Split(0 if local_rank == 0 else 1, rank)
            # The node's index: its leader's rank among the leaders, shared with the node's other ranks.
            index = leaders.Get_rank() if local_rank == 0 else None
            node_rank = shared.bcast(index, root=0)
            num_nodes = comm.allreduce(1 if local_rank == 0 else 0)
            if addr is None:
                addr = comm.bcast(socket.getfqdn() if rank == 0 else None, root=0)
            if port is None:
                port = str(comm.bcast(_free_port() if rank == 0 else None, root=0))
    if local_rank is None or local_world is None:
        raise LaunchError(
            f"started by {flavour} MPI without a local rank in the environment, and mpi4py is not installed "
            f"to find it; pip install mpi4py (the project's `mpi` extra)"
        )
    if addr is None:
        if local_world != world:
            raise LaunchError(
                "started by mpirun across several hosts without MASTER_ADDR, and mpi4py is not installed to "
                "share rank 0's address; pip install mpi4py (the `mpi` extra) or export MASTER_ADDR=<rank 0's host>"
            )
        addr = "127.0.0.1"
    if num_nodes is None:
        num_nodes = max(1, world // max(1, local_world))
    return LaunchInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank if node_rank is not None else rank // max(1, local_world),
        num_nodes=num_nodes,
        master_addr=addr,
        master_port=_port({"MASTER_PORT": port} if port is not None else {}, DEFAULT_PORT),
        node=node,
        source=flavour,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _from_torch_env(env: Mapping[str, str]) -> LaunchInfo:
    missing = [name for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in env]
    if missing:
        raise LaunchError(
            f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; set all of RANK, "
            f"WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK), or none and let a launcher or srun set them"
        )
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" in env or ("GROUP_RANK" in env and "ROLE_RANK" in env):
        source = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        source = "deepspeed"
    else:
        source = "env"
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    if "LOCAL_WORLD_SIZE" in env:
        local_world = _int(env, "LOCAL_WORLD_SIZE")
    elif "LOCAL_SIZE" in env:
        local_world = _int(env, "LOCAL_SIZE")
    else:
        local_world = world if "LOCAL_RANK" not in env else max(local_rank + 1, 1)
    node_rank = next((_int(env, n) for n in ("GROUP_RANK", "CROSS_RANK", "NODE_RANK") if n in env), 0)
    num_nodes = next(
        (_int(env, n) for n in ("GROUP_WORLD_SIZE", "CROSS_SIZE") if n in env),
        max(1, world // max(1, local_world)),
    )
    if _in_slurm_step(env) and source == "env":
        _check_against_slurm(env, rank, world)
    if _in_slurm_step(env) and source == "torchrun" and _int(env, "SLURM_STEP_NUM_TASKS") > num_nodes:
        raise LaunchError(
            f"torchrun in an srun step of {env['SLURM_STEP_NUM_TASKS']} tasks with only {num_nodes} node(s) in its "
            f"rendezvous: run one torchrun per node (srun --ntasks-per-node=1 torchrun --nproc-per-node=...)"
        )
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    if not 0 <= local_rank < max(local_world, 1):
        raise LaunchError(
            f"LOCAL_RANK={local_rank} is outside 0..LOCAL_WORLD_SIZE-1 (LOCAL_WORLD_SIZE={local_world})"
        )
    return LaunchInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=env["MASTER_ADDR"],
        master_port=_port(env, DEFAULT_PORT),
        node=env.get("SLURMD_NODENAME") or _hostname(),
        source=source,
        job_id=env.get("SLURM_JOB_ID"),
    )


def _check_against_slurm(env: Mapping[str, str], rank: int, world: int) -> None:
    """RANK/WORLD_SIZE given by hand inside an srun step must agree with the step (a launcher that
    runs several ranks per task, torchrun or deepspeed, sets its own markers and is not checked)."""
    task, tasks = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
    if tasks == 1:
        return  # one srun task running a world of its own making (e.g. tests); nothing to compare
    if world != tasks or rank != task:
        raise LaunchError(
            f"WORLD_SIZE={world} and RANK={rank} are set in the environment, but this is task {task} of the "
            f"{tasks} tasks srun started (SLURM_PROCID, SLURM_STEP_NUM_TASKS); values exported in a batch script "
            f"are the same on every task. Unset RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (the "
            f"framework derives them from SLURM) or start {world} tasks"
        )


def resolve(environ: Mapping[str, str] | None = None, use_mpi4py: bool = True) -> LaunchInfo:
    """This process's rank, world and rendezvous, from the environment (see the module docstring).
    `use_mpi4py=False` never calls MPI (what is unknown without it is an error)."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env:
        return _from_torch_env(env)
    if "WORLD_SIZE" in env and not (_mpi_flavour(env) or _in_slurm_step(env)):
        raise LaunchError(
            "WORLD_SIZE is set but RANK is not; set both (and MASTER_ADDR, MASTER_PORT) or neither"
        )
    flavour = _mpi_flavour(env)
    if flavour:
        info = _from_mpi(env, flavour, use_mpi4py)
    elif _in_slurm_step(env):
        info = _from_slurm(env)
    else:
        info = LaunchInfo(
            rank=0,
            world_size=1,
            local_rank=0,
            local_world_size=1,
            node_rank=0,
            num_nodes=1,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_port(env, 0),  # 0: any free port (a world of one)
            node=env.get("SLURMD_NODENAME") or _hostname(),
            source="single",
            job_id=env.get("SLURM_JOB_ID"),
        )
    if "WORLD_SIZE" in env and _int(env, "WORLD_SIZE") != info.world_size:
        raise LaunchError(
            f"WORLD_SIZE={env['WORLD_SIZE']} is set in the environment but {info.describe()}, a world of "
            f"{info.world_size}; unset WORLD_SIZE, or start {env['WORLD_SIZE']} processes"
        )
    return info


def batch_shell_warning(environ: Mapping[str, str] | None = None) -> str | None:
    """A note when a training process runs in a SLURM batch shell of several tasks, outside srun."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env and "RANK" not in env and not _mpi_flavour(env):
        tasks = env.get("SLURM_NTASKS", "1")
        if tasks.isdigit() and int(tasks) > 1:
            return (
                f"running as one process in the batch shell of SLURM job {env['SLURM_JOB_ID']}, which has {tasks} "
                f"tasks; start one process per GPU with `srun python pretrain/main.py ...` (slurm/train.sbatch does)"
            )
    return None
