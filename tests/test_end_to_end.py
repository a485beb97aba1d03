"""The product as a user runs it: the deepspeed launcher, the run directory, errors and exit codes."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from pretrain.testing import run_distributed
from training_runs import overfit_one_batch, train_with_weights_poisoned_on_rank0

pytestmark = pytest.mark.slow


def launch(*args, timeout=600):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def deepspeed_launcher() -> str:
    return os.path.join(os.path.dirname(sys.executable), "deepspeed")


@pytest.fixture(scope="module")
def launched_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("launched") / "run"
    result = launch(
        deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(_port()), "pretrain/main.py",
        "--config", str(TINY), "train.steps=30", "logging.interval=5", "train.eval_interval=15",
        "checkpoint.interval=15", f"run.dir={run_dir}",
    )  # fmt: skip
    return result, run_dir


def _port() -> int:
    from pretrain.parallel.distributed import free_port

    return free_port()


def test_deepspeed_launcher_trains_two_cpu_processes(launched_run):
    result, run_dir = launched_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 5, 10, 15, 20, 25, 30]
    for record in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "tokens_seen"} <= record.keys()
        assert record["mfu"] is None  # no GPU: n/a, never a guess
        assert record["tokens_seen"] == record["step"] * 16 * 256
    assert train[-1]["loss"] < train[0]["loss"] - 1.5  # from ~ln(320) = 5.8 to below 4.3
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [15, 30] and val[1]["val_loss"] < val[0]["val_loss"]
    assert "MFU n/a" in result.stdout and "ETA" in result.stdout and "tok/s" in result.stdout


def test_run_directory_holds_config_deepspeed_config_events_plot_and_checkpoints(launched_run):
    result, run_dir = launched_run
    assert result.returncode == 0
    from pretrain.config import load_config

    saved = load_config(run_dir / "config.yaml")
    assert saved.train.steps == 30 and saved.run.dir == str(run_dir)
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds_config["train_batch_size"] == 16 and ds_config["gradient_accumulation_steps"] == 2
    assert ds_config["zero_optimization"]["stage"] == 1
    assert json.loads((run_dir / "run_summary.json").read_text())["parameters"] == 820_352
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step00000015", "step00000030"]
    assert (checkpoints / "latest").read_text() == "step00000030"
    files = {p.name for p in (checkpoints / "step00000030").iterdir()}
    assert "mp_rank_00_model_states.pt" in files
    assert (
        sum(name.endswith("optim_states.pt") for name in files) == 2
    )  # ZeRO-1: one optimizer shard per rank


def test_reusing_a_run_dir_continues_it_and_never_clobbers_it(launched_run):
    _, run_dir = launched_run
    before = (run_dir / "metrics.jsonl").read_bytes()
    same = ["--config", str(TINY), "train.steps=30", "logging.interval=5", "train.eval_interval=15",
            "checkpoint.interval=15", f"run.dir={run_dir}"]  # fmt: skip
    refused = launch(sys.executable, "pretrain/main.py", *same, "checkpoint.resume=none")
    assert refused.returncode == 2
    assert "already holds a run" in refused.stderr and "checkpoint.resume=auto" in refused.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    # The default (checkpoint.resume=auto): the same command continues the run. It is finished, so
    # nothing is trained again (here on one process: the 2-process checkpoint is resharded).
    again = launch(sys.executable, "pretrain/main.py", *same)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (
        f"resumed from {run_dir}/checkpoints/step00000030 (step 30, resharded from data-parallel 2"
        in again.stdout
    )
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_non_finite_loss_stops_every_rank_naming_the_step_and_saves_nothing_after(tmp_path):
    # Rank 0's weights go NaN after step 3; its step-4 loss is NaN, rank 1's is not. The loss is
    # averaged over ranks before the check, so both ranks stop at the same step, before the
    # step-4 checkpoint is written.
    results = run_distributed(train_with_weights_poisoned_on_rank0, 2, str(tmp_path), 3)
    for result in results:
        assert result["step"] == 4 and result["completed"] == 4
        # The guard sees the step's non-finite gradient norm first (it does not read the loss).
        assert re.match(r"the global gradient norm became (nan|inf) at step 4", result["message"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["step00000002"]


def test_overfitting_one_batch_drives_the_loss_down():
    (losses,) = run_distributed(overfit_one_batch, 1, 150)
    assert losses[0] > 5.0  # ~ln(320) at init
    assert losses[-1] < 0.5, losses[::10]


def test_plot_command_writes_a_png(launched_run, tmp_path):
    _, run_dir = launched_run
    result = launch(sys.executable, "-m", "pretrain.plot", str(run_dir), "--output", str(tmp_path / "p.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    missing = launch(sys.executable, "-m", "pretrain.plot", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "metrics.jsonl does not exist" in missing.stderr


def test_mpirun_launch_matches_the_deepspeed_launcher(launched_run, tmp_path):
    """`mpirun -np 2 python pretrain/main.py` (mpi4py path) trains the same numbers as the deepspeed
    launcher: steps 1-10 lie in the warmup, which does not depend on train.steps."""
    pytest.importorskip("mpi4py")
    _, reference_dir = launched_run
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    env_port = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port())}
    result = subprocess.run(
        [mpirun, "-np", "2", sys.executable, "pretrain/main.py", "--config", str(TINY), "train.steps=10",
         "logging.interval=5", "checkpoint.save_final=false", f"run.dir={tmp_path}"],
        cwd=REPO, env={**os.environ, **env_port, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "x data-parallel 2" in result.stdout

    def losses(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r and r["step"] <= 10}

    assert losses(tmp_path) == losses(reference_dir)
