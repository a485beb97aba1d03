import pytest

from parallel_checks import replicas_before_and_after_a_nudge
from pretrain.testing import run_distributed
from training_runs import fail_on_rank, shm_buffer_after_init, threads_after_close

pytestmark = pytest.mark.slow


def test_a_failure_on_one_rank_stops_every_rank_without_a_hang():
    assert run_distributed(fail_on_rank, 3, 1, timeout=120) == [
        "peer failure",
        "own error: shard-00003.bin is missing",
        "peer failure",
    ]
    assert run_distributed(fail_on_rank, 2, -1, timeout=120) == ["ok", "ok"]


def test_cpu_runs_leave_no_shared_memory_buffer_behind(monkeypatch):
    """DeepSpeed's CPU all-reduce buffer (69 MB per rank in /dev/shm) was never unlinked: each run
    leaked one per rank until the machine ran out of memory. Its name goes once every rank has it mapped."""
    monkeypatch.setenv("LOCAL_SIZE", "2")
    for state in run_distributed(shm_buffer_after_init, 2, timeout=120):
        assert state == {"mapped": True, "named": False, "sum_ok": True}


def test_orphaned_shared_memory_buffers_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    import mmap
    import os
    import time

    from pretrain import deepspeed_compat as compat

    monkeypatch.setattr(compat.shm, "SHM_DIRECTORY", str(tmp_path))
    prefix = f"{compat.shm.SHM_ALLREDUCE_PREFIX}_{os.getuid()}_127.0.0.1_"
    orphan, live, young, other = (tmp_path / f"{prefix}{n}_0" for n in (1, 2, 3, 4))
    for path in (orphan, live, young):
        path.write_bytes(b"\0" * 4096)
    (tmp_path / "unrelated").write_bytes(b"x")
    old = time.time() - 3600
    for path in (orphan, live, tmp_path / "unrelated"):
        os.utime(path, (old, old))
    with live.open("r+b") as f, mmap.mmap(f.fileno(), 4096):  # a process (this one) maps it
        assert compat.remove_orphaned_shm_buffers() == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, young.name, "unrelated"])
    assert not other.exists()


def test_closing_the_trainer_joins_every_thread_it_started(tmp_path):
    """A thread still running while the process groups and the interpreter are torn down is how a
    finished run can die with SIGABRT at exit; close() stops them in order before the process exits."""
    overrides = ["checkpoint.interval=3", "watchdog.step_timeout=600"]
    for state in run_distributed(threads_after_close, 2, overrides, str(tmp_path), timeout=180):
        # Alive after fit() until closed (the watchdog's thread may or may not have noticed its stop yet).
        assert any(n.startswith("checkpoint-writer") for n in state["before"]), state
        assert any(n.startswith("prefetch") for n in state["before"]), state
        ours = ("checkpoint-writer", "prefetch", "pretrain-watchdog")
        assert [n for n in state["after"] if n.startswith(ours)] == [], state


def test_replica_check_names_the_one_parameter_nudged_on_one_rank():
    """Without a trainer: identical replicas give no problem; 1e-6 on one element of one rank's norm
    weight is found (float64 fingerprints) and named on every rank. Over gloo the fingerprints are
    sent from host memory."""
    for state in run_distributed(replicas_before_and_after_a_nudge, 2, 1, timeout=120):
        assert state["before"] == []
        (problem,) = state["after"]
        assert problem.startswith("norm.weight: data-parallel copies differ"), problem
        assert state["device"] == "cpu"


def test_a_group_on_nccl_sends_from_the_current_cuda_device(monkeypatch):
    """The backend of the group named decides, not the world's: NCCL cannot send host memory."""
    import torch
    import torch.distributed as dist

    from pretrain.parallel.distributed import collective_device

    backends = {"nccl-group": "nccl", "gloo-group": "gloo"}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backends[group])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device("nccl-group") == torch.device("cuda", 3)
    assert collective_device("gloo-group") == torch.device("cpu")


def test_gpus_bound_per_task_are_device_0_and_too_few_gpus_are_refused(monkeypatch):
    """One task per GPU with the node's GPUs visible: local rank r is GPU r. `srun --gpus-per-task=1`
    (or cgroups) shows each task only its own: GPU 0 whatever the local rank, where DeepSpeed's
    LOCAL_RANK-as-device-index would fail. Fewer GPUs than ranks to share them: no device (an error)."""
    from pretrain.parallel.distributed import device_index

    monkeypatch.delenv("SLURM_GPUS_PER_TASK", raising=False)
    assert [device_index(r, 8, visible=8) for r in range(8)] == list(range(8))
    assert [device_index(r, 8, visible=1) for r in range(8)] == [0] * 8
    assert device_index(5, 8, visible=4) is None
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "2")  # two GPUs per task: the first is this rank's
    assert device_index(5, 8, visible=2) == 0
