"""Stop signals through the user's own commands: `deepspeed pretrain/main.py` on 2 CPU processes and
`python pretrain/main.py`, signalled mid-run; the rerun of the same command must finish with the
uninterrupted run's final loss, bitwise (same layout, fp32, deterministic CPU kernels)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO
from pretrain.checkpoint.manifest import check_checksums, check_sizes, read_manifest
from pretrain.checkpoint.signals import EXIT_REQUEUE
from pretrain.parallel.distributed import free_port
from training_runs import SMALL, tensorboard_steps

pytestmark = pytest.mark.slow

STEPS = 50
OVERRIDES = [
    *SMALL,
    f"train.steps={STEPS}",
    "checkpoint.interval=20",
    "checkpoint.keep_last=0",
    "checkpoint.save_final=true",
]


def command(run_dir, launcher, *extra):
    main = ["pretrain/main.py", "--config", "configs/tiny.yaml", *OVERRIDES, f"run.dir={run_dir}", *extra]
    if launcher == "python":
        return [sys.executable, *main]
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), *main]


def start(run_dir, launcher="deepspeed", *extra):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen(
        command(run_dir, launcher, *extra),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def records(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in records(run_dir)):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def rank_processes(proc):
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "pretrain/main.py" in " ".join(p.cmdline())
            and "deepspeed.launcher" not in " ".join(p.cmdline())]  # fmt: skip


def final_loss(run_dir):
    losses = {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1)), "metrics.jsonl must read as one whole run"
    return losses[STEPS]


def newest_complete(run_dir):
    folders = sorted((run_dir / "checkpoints").glob("step*"))
    folder = folders[-1]
    manifest = read_manifest(folder)
    check_sizes(folder, manifest)
    check_checksums(folder, manifest, manifest.files)
    return manifest.step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = start(run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return final_loss(run_dir)


def test_sigterm_to_the_ranks_saves_exits_75_and_the_rerun_finishes_like_an_uninterrupted_run(
    uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_step(run_dir, 5, proc)
    for rank in rank_processes(proc):  # what SLURM's scancel or `pkill -f` reaches: every rank
        rank.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, out  # the launcher passes the ranks' code on
    stopped = newest_complete(run_dir)
    assert 5 <= stopped < STEPS and stopped % 20, "saved at the step the signal arrived, not a scheduled one"
    assert f"stopped by SIGTERM after step {stopped}" in out

    rerun = start(run_dir)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert f"resumed from {run_dir}/checkpoints/step{stopped:08d}" in out
    assert final_loss(run_dir) == uninterrupted


def test_killing_the_deepspeed_command_stops_its_ranks_with_a_checkpoint(tmp_path):
    """`kill <pid of deepspeed>`: DeepSpeed's launcher dies without telling its ranks; they notice."""
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_step(run_dir, 5, proc)
    ranks = rank_processes(proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(ranks, timeout=300)
    assert not alive and {p.returncode for p in gone} <= {EXIT_REQUEUE, None}
    stopped = newest_complete(run_dir)
    assert 5 <= stopped < STEPS and stopped % 20, "saved at the step the launcher died, not a scheduled one"


def test_more_signals_during_the_save_do_not_cut_it_short(tmp_path):
    """SIGTERM, then SIGINT and SIGUSR1 at once and every 20 ms until the process exits: some arrive
    while the checkpoint is written. The process still exits 75 with a complete checkpoint. (The
    first two come at once: a tiny model's save can be over before a 20 ms pause is.)"""
    run_dir = tmp_path / "run"
    proc = start(run_dir, launcher="python")
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    sent = 1
    while proc.poll() is None:
        time.sleep(0.02 if sent > 2 else 0.0)
        try:
            proc.send_signal((signal.SIGINT, signal.SIGUSR1)[sent % 2])
            sent += 1
        except ProcessLookupError:
            break
    out = proc.stdout.read()
    assert proc.returncode == EXIT_REQUEUE, out
    assert sent > 3 and "again: already stopping" in out
    assert newest_complete(run_dir) >= 3


def test_a_signal_during_start_up_also_ends_in_75_with_the_checkpoint_intact(tmp_path):
    """The handlers are installed as soon as the config is read: a signal while the run resumes
    (before its first step) ends in the requeue code too, not in a kill. The first run logs every 4
    steps: the steps since its last record are logged on the way out, and TensorBoard has them too."""
    run_dir = tmp_path / "run"
    first = start(run_dir, "python", "logging.interval=4", "logging.tensorboard=true")
    wait_for_step(run_dir, 3, first)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    saved = newest_complete(run_dir)
    logged = [r["step"] for r in records(run_dir) if "loss" in r]
    assert logged[-1] == saved and saved % 4, (logged, saved)  # not a scheduled record
    assert tensorboard_steps(run_dir, "loss") == logged

    again = start(run_dir, launcher="python")
    out = ""
    for line in again.stdout:  # the resume is done, the loop has not begun
        out += line
        if line.startswith("resumed from"):
            again.send_signal(signal.SIGUSR1)
            break
    out += again.communicate(timeout=300)[0]
    assert again.returncode == EXIT_REQUEUE, out
    assert "stopped by SIGUSR1" in out
    assert newest_complete(run_dir) >= saved
