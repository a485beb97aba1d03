"""slurm/*.sbatch on a real SLURM cluster: two emulated nodes on this machine (tests/slurm/cluster.sh),
real slurmctld, slurmd, sbatch, srun, scancel, scontrol; the real trainer over gloo on CPU.

The independent jobs are all submitted at once when the module starts (the cluster runs them side
by side), and each test then waits for its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from slurm.cluster import Cluster, json_objects, start_cluster
from training_runs import SMALL

pytestmark = pytest.mark.slow

# The scripts' per-node defaults are for 8-GPU nodes (8 CPUs a task); --mem=0 (all of a node's memory)
# is fine here, where memory is not a consumable resource (SelectTypeParameters=CR_Core).
CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]
STEPS = 60
TRAIN = ["configs/tiny.yaml", *SMALL, f"train.steps={STEPS}", "checkpoint.interval=30"]


def kill_rank_1_once_checkpointed(cluster: Cluster, job: str, run_dir: Path, result: dict[str, Any]) -> None:
    """SIGKILL rank 1 of a run once it has trained 2 steps past a complete checkpoint (in a thread
    started with the jobs, so whatever test runs first, the kill comes mid-run); `result` gets the
    victim (its launch.json entry) and the newest complete checkpoint when the first run ended."""
    try:
        latest, deadline = run_dir / "checkpoints" / "latest", time.monotonic() + 600

        def two_steps_past_a_checkpoint() -> bool:
            try:
                return latest.exists() and max(losses(run_dir), default=0) >= int(latest.read_text()[4:]) + 2
            except ValueError:  # a metrics line being written
                return False

        while not two_steps_past_a_checkpoint():
            state = cluster.jobs(job)[0]["JobState"]
            if time.monotonic() > deadline or state not in ("PENDING", "RUNNING"):
                result["error"] = f"no checkpoint to kill after (job {state})"
                return
            time.sleep(0.2)
        (victim,) = [r for r in json.loads((run_dir / "launch.json").read_text())["ranks"] if r["rank"] == 1]
        assert str(run_dir) in Path(f"/proc/{victim['pid']}/cmdline").read_text()  # that run's rank 1
        os.kill(victim["pid"], signal.SIGKILL)
        result["victim"] = victim
        while "requeueing: restart 1" not in job_log(run_dir, job):  # the first run is over
            if time.monotonic() > deadline:
                result["error"] = "not requeued"
                return
            time.sleep(0.2)
        result["newest"] = latest.read_text()
    except Exception as error:  # reported by the test
        result["error"] = repr(error)


def records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; the last record of a step wins (a resumed run may log a step again)."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.log"
    return path.read_text() if path.exists() else ""


STUB = """#!/bin/bash
# Stands in for python in train.sbatch: `-m launch ...` goes to the real one, the trainer exits $STUB_EXIT.
# STUB_EXIT=SIGKILL (SIGABRT, ...): task $STUB_TASK (default 0) kills itself with that signal after
# $STUB_DELAY s, the other tasks exit $STUB_OTHERS (default 8, as a rank that lost its peer) after $STUB_WAIT s.
[[ $1 == -m ]] && exec {python} "$@"
echo "stub trainer: exit $STUB_EXIT on restart ${{SLURM_RESTART_COUNT:-0}}"
echo "stub trainer: interfaces nccl=${{NCCL_SOCKET_IFNAME:-}} gloo=${{GLOO_SOCKET_IFNAME:-}}"
echo "stub trainer: local rank $SLURM_LOCALID sees CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}}"
if [[ $STUB_EXIT == SIG* ]]; then
    if [[ $SLURM_PROCID == ${{STUB_TASK:-0}} ]]; then
        sleep ${{STUB_DELAY:-0}}
        kill -s ${{STUB_EXIT#SIG}} $$
    fi
    sleep ${{STUB_WAIT:-2}}
    exit ${{STUB_OTHERS:-8}}
fi
exit $STUB_EXIT
"""


def test_cluster_script_never_signals_a_process_that_only_reuses_a_stale_pid_file(tmp_path):
    """A pid file left by an earlier boot (a machine restored from an image) can name a pid that is
    now another process: once it was pytest itself, killed by `cluster.sh start` in CI. Stop and
    start must take only processes that are this cluster's daemons for theirs."""
    if os.geteuid() != 0:
        pytest.skip("tests/slurm/cluster.sh needs root")
    (tmp_path / "run").mkdir()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        for daemon in ("slurmctld", "slurmd-n1", "slurmd-n2"):
            (tmp_path / "run" / f"{daemon}.pid").write_text(f"{bystander.pid}\n")
        out = subprocess.run(
            [str(Path(REPO) / "tests/slurm/cluster.sh"), "stop"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PRETRAIN_TEST_SLURM_DIR": str(tmp_path)},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert bystander.poll() is None, "cluster.sh stop signalled a process that is not its daemon"
        assert not list((tmp_path / "run").glob("*.pid"))  # the stale files are gone
    finally:
        bystander.kill()
        bystander.wait()


@pytest.fixture(scope="session")
def slurm_cluster() -> Cluster:
    return start_cluster()


# Which tests wait for each job: a job none of the selected tests needs is not submitted
# (`pytest tests/test_slurm.py -k requeue` runs only the stub jobs).
USED_BY = {
    "preempted": ("test_preemption_",),
    "killed": ("test_a_task_killed_mid_run_",),
    "reference": ("test_preemption_", "test_a_task_killed_mid_run_", "test_train_sbatch_runs_", "test_sbatch_nodes_2_",
                  "test_mpiexec_", "test_convert_sbatch_"),
    "two_nodes": ("test_sbatch_nodes_2_",),
    "convert": ("test_convert_sbatch_",),
    "mpi": ("test_mpiexec_",),
    "deepspeed": ("test_hostfile_",),
    "pmi2": ("test_srun_mpi_pmi2_",),
    "stub75": ("test_requeue_only_on_exit_75",),
    "stub4": ("test_requeue_only_on_exit_75",),
    "stub_kill": ("test_a_signal_requeues_",),
    "stub_abort": ("test_a_signal_requeues_",),
    "stub_first4": ("test_a_final_exit_",),
    "stub_gpu_per_task": ("test_gpus_bound_per_task_",),
    "stub_gpus_2_per_task": ("test_gpus_bound_per_task_",),
    "stub_gpus_per_node": ("test_gpus_bound_per_task_",),
    "prepare": ("test_prepare_array_job_",),
}  # fmt: skip


@pytest.fixture(scope="module")
def jobs(slurm_cluster: Cluster, tmp_path_factory, request) -> Iterator[dict[str, Any]]:
    from pretrain.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("slurm")
    submitted: dict[str, Any] = {"root": root}
    selected = [item.name for item in request.session.items]

    def wanted(name: str) -> bool:
        return any(test.startswith(prefix) for test in selected for prefix in USED_BY[name])

    def train(
        name: str, *sbatch: str, overrides: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        if not wanted(name):
            return
        run_dir = root / name
        job = slurm_cluster.sbatch(
            *CPU, f"--output={root / name}.out", *sbatch, "slurm/train.sbatch", *TRAIN, f"run.dir={run_dir}",
            *overrides, env=env,
        )  # fmt: skip
        submitted[name] = (job, run_dir)

    # The preempted run first: its test signals it as soon as it trains.
    train("preempted", "--ntasks-per-node=2")
    # Then the run whose rank 1 is killed once a checkpoint is complete (interval 10, not 30: earlier).
    # gloo and NCCL on the interface PRETRAIN_SOCKET_IFNAME names (lo: all "nodes" are this machine).
    train(
        "killed",
        "--ntasks-per-node=2",
        overrides=("checkpoint.interval=10",),
        env={"PRETRAIN_SOCKET_IFNAME": "lo"},
    )
    if wanted("killed"):
        killed: dict[str, Any] = {}
        killer = threading.Thread(
            target=kill_rank_1_once_checkpointed,
            args=(slurm_cluster, *submitted["killed"], killed),
            daemon=True,
        )
        killer.start()
        submitted["killer"] = (killer, killed)
    train("reference", "--ntasks-per-node=2")
    train("two_nodes", "--nodes=2", "--ntasks-per-node=1")
    hf = root / "hf"
    if wanted("convert"):
        submitted["convert"] = (
            slurm_cluster.sbatch(
                f"--dependency=afterok:{submitted['reference'][0]}", f"--output={root}/convert.out",
                "--cpus-per-task=1", "--mem=2G",  # the script asks for 64G, more than a node here has
                "slurm/convert.sbatch", str(submitted["reference"][1]), str(hf),
            ),
            hf,
        )  # fmt: skip
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = f"{mpiexec} -n 2 {sys.executable} -u pretrain/main.py --config {' '.join(TRAIN)} run.dir={root / 'mpi'}"
    if wanted("mpi"):
        submitted["mpi"] = (
            slurm_cluster.sbatch(
                "--nodes=2", "--ntasks-per-node=1", f"--output={root}/mpi.out", f"--wrap={command}"
            ),
            root / "mpi",
        )  # fmt: skip
    # A DeepSpeed hostfile written from the allocation, used by the deepspeed launcher's slurm mode
    # (which runs srun and sets no RANK or MASTER_ADDR); the tasks print what launch/ resolves.
    hosts, bin_dir = root / "hosts", Path(sys.executable).parent
    command = (
        f"PATH={bin_dir}:$PATH; python -m launch hostfile --output {hosts} && deepspeed --hostfile {hosts} "
        f"--launcher slurm --no_ssh_check --master_addr n1 launch/__main__.py env --json"
    )
    if wanted("deepspeed"):
        submitted["deepspeed"] = slurm_cluster.sbatch(
            "--nodes=2", "--ntasks-per-node=1", f"--output={root}/deepspeed.out", f"--wrap={command}"
        )
    # srun --mpi=pmi2 (no MPI launcher): PMI variables from SLURM's plugin.
    if wanted("pmi2"):
        submitted["pmi2"] = slurm_cluster.sbatch(
            "--nodes=2", "--ntasks-per-node=1", f"--output={root}/pmi2.out",
            f"--wrap=srun --mpi=pmi2 {sys.executable} -m launch env --json",
        )  # fmt: skip

    # The requeue policy with a stand-in trainer (instant): 75 is requeued up to the cap, 4 never.
    stub = root / "stub-python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    for name, code, cap in (("stub75", "75", "1"), ("stub4", "4", "5")):
        train(
            name,
            "--ntasks-per-node=1",
            env={"PRETRAIN_PYTHON": str(stub), "STUB_EXIT": code, "PRETRAIN_MAX_RESTARTS": cap},
        )
    # GPUs (the test cluster's 2 fake ones per node): bound per task, and two ratios that warn.
    for name, gpus in (
        ("stub_gpu_per_task", ("--ntasks-per-node=2", "--gpus-per-node=2", "--gpus-per-task=1")),
        ("stub_gpus_2_per_task", ("--ntasks-per-node=1", "--gpus-per-node=2", "--gpus-per-task=2")),
        ("stub_gpus_per_node", ("--ntasks-per-node=1", "--gpus-per-node=2")),
    ):
        train(name, *gpus, env={"PRETRAIN_PYTHON": str(stub), "STUB_EXIT": "0"})
    # Signals: a kill -9 on a one-node job (requeued, that node excluded, up to the cap); an abort
    # (an NCCL abort's SIGABRT) on one task of a two-node job (requeued, nothing excluded: the
    # cluster has no third node); a task that exits 4 before another is killed (final: the first
    # failure decides).
    stub_env = {"PRETRAIN_PYTHON": str(stub), "PRETRAIN_MAX_RESTARTS": "1"}
    train(
        "stub_kill",
        "--ntasks-per-node=1",
        # A second's delay: output just written by a task that is then killed can be lost.
        env={**stub_env, "STUB_EXIT": "SIGKILL", "STUB_DELAY": "1", "PRETRAIN_SOCKET_IFNAME": "lo"},
    )
    train(
        "stub_abort",
        "--nodes=2",
        "--ntasks-per-node=1",
        env={**stub_env, "STUB_EXIT": "SIGABRT", "STUB_TASK": "1"},
    )
    train("stub_first4", "--ntasks-per-node=2", env={
        **stub_env, "PRETRAIN_MAX_RESTARTS": "5", "STUB_EXIT": "SIGKILL", "STUB_TASK": "1", "STUB_DELAY": "3",
        "STUB_WAIT": "0", "STUB_OTHERS": "4",
    })  # fmt: skip

    # An array job over four input files, two tasks.
    texts = [f"def function_{i}(x):\n    return x * {i}  # doc {i}\n" * (1 + i % 5) for i in range(200)]
    corpus = root / "corpus"
    corpus.mkdir()
    for part in range(4):
        with (corpus / f"part{part}.jsonl").open("w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts[part::4])
    train_tokenizer(texts, 400, root / "tok")
    prepare_args = (
        "--input", f"{corpus}/*.jsonl", "--tokenizer", str(root / "tok"), "--output", str(root / "shards"),
    )  # fmt: skip
    submitted["prepare_args"] = prepare_args
    if wanted("prepare"):
        submitted["prepare"] = slurm_cluster.sbatch(
            "--array=0-1",
            "--cpus-per-task=1",
            f"--output={root}/prepare-%a.out",
            "slurm/prepare.sbatch",
            *prepare_args,
        )
    yield submitted
    for value in submitted.values():
        job = value[0] if isinstance(value, tuple) else value
        if isinstance(job, str) and job.isdigit():
            slurm_cluster.run("scancel", job, check=False)


def test_preemption_saves_requeues_resumes_and_ends_with_the_uninterrupted_loss(slurm_cluster, jobs):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1@300 sends before the time limit) reaches
    only the batch shell; train.sbatch passes it to the tasks, the trainer saves and exits 75, the
    script requeues the job, which restarts with SLURM_RESTART_COUNT=1, resumes from the checkpoint
    and finishes with the same final loss as the run nobody interrupted."""
    job, run_dir = jobs["preempted"]
    deadline = time.monotonic() + 480
    while max(losses(run_dir), default=0) < 3:
        assert time.monotonic() < deadline, job_log(run_dir, job)[-3000:]
        state = slurm_cluster.jobs(job)[0]["JobState"]
        assert state in ("PENDING", "RUNNING"), (state, job_log(run_dir, job)[-3000:])
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    (info,) = slurm_cluster.wait(job, timeout=900, log=run_dir / "logs" / f"slurm-{job}.log")
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-4000:])
    assert "received SIGUSR1" in log and "(exit 75); requeueing: restart 1" in log, log[-4000:]
    assert f"job {job} restart 1 at" in log  # SLURM_RESTART_COUNT=1 in the requeued run
    assert log.rstrip().endswith("training finished (exit 0)")
    saved = sorted(int(p.name[4:]) for p in (run_dir / "checkpoints").glob("step*") if p.is_dir())
    interrupted = [s for s in saved if s not in (30, STEPS)]
    assert interrupted and 3 <= interrupted[0] < STEPS, saved  # the checkpoint written on the signal
    (_, reference_dir) = jobs["reference"]
    slurm_cluster.wait(jobs["reference"][0], log=reference_dir / "logs" / f"slurm-{jobs['reference'][0]}.log")
    assert losses(run_dir)[STEPS] == losses(reference_dir)[STEPS]


def test_a_task_killed_mid_run_requeues_without_its_node_and_ends_with_the_uninterrupted_loss(
    slurm_cluster, jobs
):
    """kill -9 of rank 1 (a node failure's stand-in) once a checkpoint is complete: srun reports
    `n1: task 1: Killed` and 137, train.sbatch requeues the job without that node (the other one can
    run it), the restart resumes from the newest complete checkpoint and ends with the same final
    loss as the run nobody interrupted."""
    job, run_dir = jobs["killed"]
    killer, killed = jobs["killer"]
    killer.join(timeout=900)
    assert "error" not in killed and "newest" in killed, (killed, job_log(run_dir, job)[-3000:])
    victim, newest = killed["victim"], killed["newest"]
    node, other = victim["node"], {"n1": "n2", "n2": "n1"}[victim["node"]]
    (info,) = slurm_cluster.wait(job, timeout=900, log=run_dir / "logs" / f"slurm-{job}.log")
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-4000:])
    assert f"srun: error: {node}: task 1: Killed" in log
    assert f"srun: error: {node}: task 0: Exited with exit code 8" in log  # lost its peer: not a bug's 1
    assert (
        f"a training task was killed by a signal on {node} (Killed, exit 137); requeueing: restart 1" in log
    )
    assert f"excluding {node} from the restart (ExcNodeList={node}): 1 other usable node(s)" in log
    assert info["ExcNodeList"] == node and info["NodeList"] == other
    assert re.search(rf"job {job} restart 1 at [^\n]*: 1 node\(s\) {other},", log), log[-4000:]
    resumed = re.findall(r"resumed from \S+ \(step (\d+),", log)
    assert resumed == [str(int(newest[4:]))], (resumed, newest)
    assert log.rstrip().endswith("training finished (exit 0)")
    (_, reference_dir) = jobs["reference"]
    slurm_cluster.wait(jobs["reference"][0], log=reference_dir / "logs" / f"slurm-{jobs['reference'][0]}.log")
    assert losses(run_dir)[STEPS] == losses(reference_dir)[STEPS]


def test_train_sbatch_runs_two_tasks_that_train_and_checkpoint(slurm_cluster, jobs):
    job, run_dir = jobs["reference"]
    (info,) = slurm_cluster.wait(job, log=run_dir / "logs" / f"slurm-{job}.log")
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    steps = losses(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1)) and steps[STEPS] < steps[1] - 0.5
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"
    assert (run_dir / "checkpoints" / "step00000030").is_dir()
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["launch"]["source"] == "slurm" and launch["launch"]["world_size"] == 2
    assert (
        launch["launch"]["master_addr"] == "n1"
        and launch["launch"]["master_port"] == 20000 + int(job) % 10000
    )
    assert [r["rank"] for r in launch["ranks"]] == [0, 1] and {r["node"] for r in launch["ranks"]} == {"n1"}
    assert "launch: 2 ranks on 1 node (2 per node), started by srun" in log
    assert "0: step 60/60 | loss" in log and "training finished (exit 0)" in log
    assert (Path(REPO) / f"slurm-{job}.out").exists() is False  # --output went where we asked


def test_sbatch_nodes_2_trains_across_both_nodes(slurm_cluster, jobs):
    job, run_dir = jobs["two_nodes"]
    (info,) = slurm_cluster.wait(job, log=run_dir / "logs" / f"slurm-{job}.log")
    assert info["JobState"] == "COMPLETED", (info, job_log(run_dir, job)[-3000:])
    assert info["NodeList"] == "n[1-2]"
    launch = json.loads((run_dir / "launch.json").read_text())
    assert [(r["rank"], r["node"]) for r in launch["ranks"]] == [(0, "n1"), (1, "n2")]
    assert launch["launch"]["master_addr"] == "n1" and launch["launch"]["num_nodes"] == 2
    slurm_cluster.wait(jobs["reference"][0])
    assert losses(run_dir) == losses(jobs["reference"][1])  # same world size, same numbers


def test_mpiexec_inside_an_allocation_trains_like_srun(slurm_cluster, jobs):
    """MPICH's mpiexec (from PyPI) in a two-node allocation starts its proxies through srun; the
    ranks read PMI_RANK/PMI_SIZE, mpi4py shares rank 0's address and a free port."""
    job, run_dir = jobs["mpi"]
    (info,) = slurm_cluster.wait(job)
    out = (jobs["root"] / "mpi.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, out[-3000:])
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["launch"]["source"] == "mpich"
    assert [(r["rank"], r["node"]) for r in launch["ranks"]] == [(0, "n1"), (1, "n2")]
    slurm_cluster.wait(jobs["reference"][0])
    assert losses(run_dir) == losses(jobs["reference"][1])


def resolved(out: str) -> list[dict[str, Any]]:
    """The `python -m launch env --json` lines of a job's output, by rank."""
    return sorted(json_objects(out), key=lambda i: i["rank"])


def test_hostfile_from_the_allocation_drives_the_deepspeed_launcher(slurm_cluster, jobs):
    """`python -m launch hostfile` in a two-node allocation, then `deepspeed --hostfile ...
    --launcher slurm`: its srun tasks get their ranks and rendezvous from SLURM, no ssh, no MPI."""
    (info,) = slurm_cluster.wait(jobs["deepspeed"], timeout=300)
    out = (jobs["root"] / "deepspeed.out").read_text()
    assert info["JobState"] == "COMPLETED", out[-3000:]
    assert (jobs["root"] / "hosts").read_text() == "n1 slots=1\nn2 slots=1\n"
    assert "cmd = srun -n 2" in out
    assert [
        (i["rank"], i["world_size"], i["node"], i["source"], i["master_addr"]) for i in resolved(out)
    ] == [
        (0, 2, "n1", "slurm", "n1"),
        (1, 2, "n2", "slurm", "n1"),
    ]


def test_srun_mpi_pmi2_tasks_resolve_from_pmi_and_slurm(slurm_cluster, jobs):
    (info,) = slurm_cluster.wait(jobs["pmi2"], timeout=300)
    out = (jobs["root"] / "pmi2.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    infos = resolved(out)
    assert [(i["rank"], i["world_size"], i["node"], i["source"]) for i in infos] == [
        (0, 2, "n1", "mpich"),
        (1, 2, "n2", "mpich"),
    ]
    assert (
        infos[0]["master_port"] == infos[1]["master_port"]
        and infos[0]["master_addr"] == infos[1]["master_addr"]
    )


def test_requeue_only_on_exit_75_and_at_most_max_restarts(slurm_cluster, jobs):
    job, run_dir = jobs["stub75"]
    (info,) = slurm_cluster.wait(job, timeout=300)
    log = job_log(run_dir, job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "1", "75:0"), (info, log)
    assert "stub trainer: exit 75 on restart 0" in log and "stub trainer: exit 75 on restart 1" in log
    assert "not requeued: PRETRAIN_MAX_RESTARTS=1 reached" in log
    job, run_dir = jobs["stub4"]
    (info,) = slurm_cluster.wait(job, timeout=300)
    log = job_log(run_dir, job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "0", "4:0"), (info, log)
    assert "training exited with 4 (unusable data); not requeued" in log


def test_prepare_array_job_writes_every_part_and_a_rerun_changes_nothing(slurm_cluster, jobs):
    root = jobs["root"]
    tasks = slurm_cluster.wait(jobs["prepare"], timeout=400)
    outputs = "".join(p.read_text() for p in root.glob("prepare-*.out"))
    assert [t["JobState"] for t in tasks] == ["COMPLETED", "COMPLETED"], outputs
    shards = root / "shards"
    assert json.loads((shards / "manifest.json").read_text())["num_documents"] == 200
    assert sorted(p.name for p in shards.glob("part-*")) == ["part-00000", "part-00001"]
    # Parts and shards are kept as they are (by mtime); the manifest is written again, the same bytes.
    before = {p: p.stat().st_mtime_ns for p in shards.glob("part-*/*")}
    manifest = (shards / "manifest.json").read_bytes()
    again = slurm_cluster.sbatch(
        "--array=0-1", "--cpus-per-task=1", f"--output={root}/prepare-again-%a.out", "slurm/prepare.sbatch",
        *jobs["prepare_args"],
    )  # fmt: skip
    tasks = slurm_cluster.wait(again, timeout=400)
    assert [t["JobState"] for t in tasks] == ["COMPLETED", "COMPLETED"]
    assert {p: p.stat().st_mtime_ns for p in shards.glob("part-*/*")} == before
    assert (shards / "manifest.json").read_bytes() == manifest
    inspect = subprocess.run(
        [sys.executable, "-m", "pretrain.data", "inspect", str(shards)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert inspect.returncode == 0 and "in 200 documents, 2 shards" in inspect.stdout, (
        inspect.stdout + inspect.stderr
    )


def test_convert_sbatch_exports_the_run_and_verifies_it(slurm_cluster, jobs):
    job, hf = jobs["convert"]
    (info,) = slurm_cluster.wait(job, timeout=600)
    out = (jobs["root"] / "convert.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, out[-3000:])
    assert "verification passed" in out
    assert (hf / "config.json").exists() and any(hf.glob("*.safetensors"))


def first_node(log: str, job: str, restart: int) -> str:
    """The node list of a (re)start, from train.sbatch's header line."""
    match = re.search(rf"job {job} restart {restart} at [^\n]*?: \d+ node\(s\) (\S+),", log)
    assert match, log
    return match.group(1)


def test_a_signal_requeues_without_the_node_where_the_partition_can_spare_it_at_most_max_restarts(
    slurm_cluster, jobs
):
    job, run_dir = jobs["stub_kill"]  # one node, kill -9, PRETRAIN_MAX_RESTARTS=1
    (info,) = slurm_cluster.wait(job, timeout=300)
    log = job_log(run_dir, job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "1", "137:0"), (info, log)
    node = first_node(log, job, 0)
    other = {"n1": "n2", "n2": "n1"}[node]
    assert (
        f"a training task was killed by a signal on {node} (Killed, exit 137); requeueing: restart 1 of at most 1"
        in log
    )
    assert f"excluding {node} from the restart (ExcNodeList={node})" in log
    assert first_node(log, job, 1) == other and info["ExcNodeList"] == node
    assert (
        f"a training task was killed by a signal on {other} (Killed, exit 137), not requeued: "
        "PRETRAIN_MAX_RESTARTS=1 reached" in log
    )
    assert "stub trainer: interfaces nccl=lo gloo=lo" in log  # PRETRAIN_SOCKET_IFNAME=lo set both
    job, run_dir = jobs["stub_abort"]  # two nodes, task 1 (on n2) aborts (SIGABRT, as NCCL does)
    (info,) = slurm_cluster.wait(job, timeout=300)
    log = job_log(run_dir, job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "1", "134:0"), (info, log)
    assert "a training task was killed by a signal on n2 (Aborted" in log and "requeueing: restart 1" in log
    assert (
        "n2 not excluded: the job needs 2 node(s) and partition debug has only 1 other usable one(s);"
        " excluding it would leave the job unschedulable" in log
    )
    assert info["ExcNodeList"] == "(null)" and first_node(log, job, 1) == "n[1-2]"
    assert "not requeued: PRETRAIN_MAX_RESTARTS=1 reached" in log


def test_a_final_exit_is_not_requeued_when_srun_reports_a_signal_after_it(slurm_cluster, jobs):
    """Task 0 exits 4 (data), then task 1 is killed: srun exits 137, the first failure decides."""
    job, run_dir = jobs["stub_first4"]
    (info,) = slurm_cluster.wait(job, timeout=300)
    log = job_log(run_dir, job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "0", "4:0"), (info, log)
    node = first_node(log, job, 0)
    assert (
        f"training exited with 4 (unusable data); not requeued (first failure: {node} task 0: Exited with exit code 4)"
        in log
    )
    messages = (run_dir / "logs" / f"srun-{job}.0.txt").read_text()
    assert f"srun: error: {node}: task 1: Killed" in messages and "stub trainer" not in messages


def test_gpus_bound_per_task_give_each_task_one_gpu_and_only_odd_ratios_warn(slurm_cluster, jobs):
    """--gpus-per-task=1 on the test cluster's fake GPUs (gres on /dev/tty0-1): srun, given
    --gpus-per-task by the script, shows each task one GPU (so the framework must take device 0,
    not its local rank); no warning. 2 GPUs per task, or 1 task on a node of 2 GPUs, warn."""
    job, run_dir = jobs["stub_gpu_per_task"]
    (info,) = slurm_cluster.wait(job, timeout=300)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", (info, log)
    assert "2 GPU(s) per node (1 bound to each task)" in log and "warning" not in log, log
    assert "0: stub trainer: local rank 0 sees CUDA_VISIBLE_DEVICES=0\n" in log
    assert "1: stub trainer: local rank 1 sees CUDA_VISIBLE_DEVICES=1\n" in log  # one entry each
    job, run_dir = jobs["stub_gpus_2_per_task"]
    slurm_cluster.wait(job, timeout=300)
    log = job_log(run_dir, job)
    assert (
        "warning: 2 GPUs bound to each task; one task per GPU is intended (sbatch --gpus-per-task=1)" in log
    ), log
    assert "0: stub trainer: local rank 0 sees CUDA_VISIBLE_DEVICES=0,1\n" in log
    job, run_dir = jobs["stub_gpus_per_node"]
    slurm_cluster.wait(job, timeout=300)
    log = job_log(run_dir, job)
    assert "warning: 1 tasks per node but 2 GPUs per node; one task per GPU is intended" in log, log


# What srun 22.05 printed on the test cluster; the node failure and OOM lines are not seen here,
# written from the formats in the installed Slurm 22.05 ("Node failure on %s" in srun, "%s: %s %s:
# Out Of Memory" in launch_slurm.so).
SRUN_LINES = {
    "lost peer first": "srun: error: n1: task 0: Exited with exit code 8\nsrun: error: n1: task 1: Killed\n",
    "killed on n2": "srun: error: n2: task 1: Killed\nsrun: error: n1: task 0: Exited with exit code 1\n",
    "data, then killed": "srun: error: n1: task 0: Exited with exit code 4\nsrun: error: n2: task 1: Killed\n",
    "bug, srun ends the rest": (
        "srun: error: n1: task 0: Exited with exit code 1\nsrun: First task exited 60s ago\n"
        "srun: StepId=7.0 task 1: running\nsrun: error: n1: task 1: Killed\n"
    ),
    "abort": "srun: error: n3: tasks 0-3: Aborted (core dumped)\n",
    "node failure": "srun: error: Node failure on n[4,6]\nsrun: Job step aborted: Waiting up to 32 seconds\n",
    "oom": "slurmstepd: error: Detected 1 oom-kill event(s) in StepId=5.0\nsrun: error: n1: task 0: Out Of Memory\n",
    "saved": "srun: error: n1: tasks 0-1: Exited with exit code 75\n",
    "network": "srun: error: n1: task 0: Exited with exit code 8\nsrun: error: n2: task 1: Exited with exit code 8\n",
    "peer of a bug": "srun: error: n2: task 1: Exited with exit code 8\nsrun: error: n1: task 0: Exited with exit code 1\n",
    "none": "",
}


@pytest.mark.parametrize(
    "rc, lines, signalled, verdict, code, node",
    [
        (137, "lost peer first", "", "requeue", 137, "n1"),
        (137, "killed on n2", "", "requeue", 137, "n2"),
        (137, "data, then killed", "", "final", 4, ""),
        (137, "bug, srun ends the rest", "", "final", 1, ""),
        (134, "abort", "", "requeue", 134, "n3"),
        (1, "node failure", "", "requeue", 1, "n[4,6]"),
        (137, "oom", "", "final", 137, ""),
        (75, "saved", "", "requeue", 75, ""),
        (8, "network", "", "requeue", 8, ""),  # every rank lost a peer, none failed itself
        (8, "peer of a bug", "", "final", 1, ""),  # the rank with the bug decides
        (0, "none", "", "finished", 0, ""),
        (143, "none", "TERM", "requeue", 143, ""),  # our signal, before the trainer's handler
        (139, "none", "", "requeue", 139, ""),
        (3, "none", "", "final", 3, ""),
        (1, "none", "", "final", 1, ""),
    ],
)
def test_classify_exit_requeues_what_is_not_the_runs_fault(
    tmp_path, rc, lines, signalled, verdict, code, node
):
    """slurm/requeue.sh's classify_exit on srun's messages: signals and node failures requeue (with
    the node to leave out), a final code on any task decides, the OOM killer is final."""
    messages = tmp_path / "srun.txt"
    messages.write_text(SRUN_LINES[lines])
    script = f'source slurm/requeue.sh; classify_exit {rc} {messages} "{signalled}"; echo "$VERDICT $CODE $FAILED_NODE"'
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == [verdict, str(code), *([node] if node else [])], out
