"""slurm/*.sbatch on a real SLURM cluster: two emulated nodes on this machine (tests/slurm/cluster.sh),
real slurmctld, slurmd, sbatch, srun, scancel, scontrol; the real trainer over gloo on CPU.

The independent jobs are all submitted at once when the module starts (the cluster runs them side
by side), and each test then waits for its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from slurm.cluster import Cluster, json_objects, start_cluster
from training_runs import SMALL

pytestmark = pytest.mark.slow

CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the scripts' per-node defaults are for GPU nodes
STEPS = 60
TRAIN = ["configs/tiny.yaml", *SMALL, f"train.steps={STEPS}", "checkpoint.interval=30"]


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
[[ $1 == -m ]] && exec {python} "$@"
echo "stub trainer: exit $STUB_EXIT on restart ${{SLURM_RESTART_COUNT:-0}}"
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


@pytest.fixture(scope="module")
def jobs(slurm_cluster: Cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    from pretrain.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("slurm")
    submitted: dict[str, Any] = {"root": root}

    def train(
        name: str, *sbatch: str, overrides: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        run_dir = root / name
        job = slurm_cluster.sbatch(
            *CPU, f"--output={root / name}.out", *sbatch, "slurm/train.sbatch", *TRAIN, f"run.dir={run_dir}",
            *overrides, env=env,
        )  # fmt: skip
        submitted[name] = (job, run_dir)

    # The preempted run first: its test signals it as soon as it trains.
    train("preempted", "--ntasks-per-node=2")
    train("reference", "--ntasks-per-node=2")
    train("two_nodes", "--nodes=2", "--ntasks-per-node=1")
    ref_job = submitted["reference"][0]
    hf = root / "hf"
    submitted["convert"] = (
        slurm_cluster.sbatch(
            f"--dependency=afterok:{ref_job}", f"--output={root}/convert.out", "--cpus-per-task=1",
            "slurm/convert.sbatch", str(submitted["reference"][1]), str(hf),
        ),
        hf,
    )  # fmt: skip
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = f"{mpiexec} -n 2 {sys.executable} -u pretrain/main.py --config {' '.join(TRAIN)} run.dir={root / 'mpi'}"
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
    submitted["deepspeed"] = slurm_cluster.sbatch(
        "--nodes=2", "--ntasks-per-node=1", f"--output={root}/deepspeed.out", f"--wrap={command}"
    )
    # srun --mpi=pmi2 (no MPI launcher): PMI variables from SLURM's plugin.
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
