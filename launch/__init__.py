"""Turning a scheduler's environment into ranks and a rendezvous: SLURM (srun), Open MPI and MPICH
(mpirun, or mpi4py), torchrun and the deepspeed launcher, plus the pre-flight check and the
DeepSpeed hostfile. `python -m launch --help` for the command line."""

from launch.env import LaunchError, LaunchInfo, batch_shell_warning, env_world_size, resolve, slurm_port
from launch.hostlist import compress, expand, expand_counts
from launch.rendezvous import current, init_process_group, join

__all__ = [
    "LaunchError",
    "LaunchInfo",
    "batch_shell_warning",
    "compress",
    "current",
    "env_world_size",
    "expand",
    "expand_counts",
    "init_process_group",
    "join",
    "resolve",
    "slurm_port",
]
