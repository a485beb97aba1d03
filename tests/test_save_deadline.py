"""A long checkpoint save is not a hang: the training thread's time in saves does not count against
watchdog.step_timeout, and saves have their own deadline (checkpoint.save_timeout, exit 5)."""

import json
import sys
import threading
import time
import types

import pytest

from conftest import REPO
from pretrain.checkpoint.save_clock import SaveClock
from pretrain.errors import ExitCode
from training_runs import SMALL, start_ranks, tensorboard_steps

TINY = REPO / "configs" / "tiny.yaml"


def watch(tmp_path, clock, **timeouts):
    """A watchdog of a world of one, exiting into `exits` instead of the process; this test's frame
    plays Trainer.fit (the watchdog stops watching once fit has returned)."""
    from pretrain.train.watchdog import Watchdog

    exits: list[int] = []
    dog = Watchdog(tmp_path, 0, 1, "n", exit=exits.append, saves=clock, **timeouts)
    dog.on_train_start(types.SimpleNamespace(state=types.SimpleNamespace(step=0)))
    dog._fit_code = sys._getframe(1).f_code
    return dog, exits


def wait_for(exits, seconds):
    deadline = time.monotonic() + seconds
    while not exits and time.monotonic() < deadline:
        time.sleep(0.02)


def test_time_in_a_save_is_not_a_hang_but_time_outside_it_is(tmp_path):
    clock = SaveClock()
    dog, exits = watch(tmp_path, clock, step_timeout=0.6, first_step_timeout=0.6, save_timeout=0)
    with clock.training_thread():
        time.sleep(1.5)  # a save: 2.5 step timeouts
    assert not exits and dog.stalled(time.monotonic()) < 0.3
    wait_for(exits, 5)  # now nothing happens: a hang
    assert exits == [ExitCode.HANG]
    (incident,) = (tmp_path / "hang").iterdir()
    assert "hang: no training step completed for" in (incident / "report.txt").read_text()


def test_a_save_past_its_deadline_is_reported_as_such_and_exits_5(tmp_path):
    clock = SaveClock()
    _, exits = watch(tmp_path, clock, step_timeout=0, first_step_timeout=0, save_timeout=0.5)
    clock.started(7)  # the writer thread's save of step 7 never commits
    wait_for(exits, 5)
    assert exits == [ExitCode.CHECKPOINT]
    (incident,) = (tmp_path / "hang").iterdir()
    report = (incident / "report.txt").read_text()
    assert "checkpoint save timeout: the save of step 7 has taken" in report
    assert "more than checkpoint.save_timeout=0.5" in report


def test_a_save_within_its_deadline_changes_nothing(tmp_path):
    clock = SaveClock()
    dog, exits = watch(tmp_path, clock, step_timeout=0, first_step_timeout=0, save_timeout=1.0)
    for step in range(3):
        clock.started(step)
        time.sleep(0.5)
        clock.finished()
    dog.stop()
    assert not exits


def test_nested_waits_count_once():
    clock = SaveClock()
    with clock.training_thread(), clock.training_thread():
        time.sleep(0.2)
    assert 0.2 <= clock.training_thread_seconds() < 0.35
    done = threading.Event()
    threading.Thread(target=lambda: (clock.started(1), done.set())).start()
    done.wait(5)
    assert clock.overdue(0.0) is None and clock.overdue(10.0) is None  # 0 disables; not overdue yet


def start_slow_saver(run_dir, extra, slow_write_s):
    """Two ranks of the tiny model whose rank 1 writes each checkpoint file `slow_write_s` late."""
    run_dir.mkdir(parents=True)
    return start_ranks([
        sys.executable, "tests/slurm/hang_train.py", "--sleep-rank", "1", "--sleep-after-step", "-1",
        "--slow-write-s", str(slow_write_s), "--config", str(TINY), *SMALL, f"run.dir={run_dir}", *extra,
    ])  # fmt: skip


@pytest.mark.slow
def test_a_run_whose_saves_outlast_step_timeout_finishes_and_one_past_save_timeout_exits_5(tmp_path):
    """Synchronous saves that take 3x watchdog.step_timeout: the run finishes. A save that never ends:
    both ranks exit 5 after checkpoint.save_timeout, and the report names the save, not a hang."""
    slow = start_slow_saver(
        tmp_path / "slow",
        ["train.steps=4", "checkpoint.interval=2", "checkpoint.async_save=false", "watchdog.step_timeout=2",
         "watchdog.first_step_timeout=60", "checkpoint.save_timeout=60"],
        slow_write_s=1.5,  # rank 1 writes several files per save: 6 s or more per save
    )  # fmt: skip
    outs = [p.communicate(timeout=300) for p in slow]
    assert [p.returncode for p in slow] == [0, 0], outs
    assert sorted(p.name for p in (tmp_path / "slow" / "checkpoints").glob("step*")) == [
        "step00000002",
        "step00000004",
    ]
    stuck = start_slow_saver(
        tmp_path / "stuck",
        [
            "train.steps=4",
            "checkpoint.interval=2",
            "watchdog.step_timeout=600",
            "checkpoint.save_timeout=4",
            "logging.tensorboard=true",
        ],
        slow_write_s=3600,
    )
    outs = [p.communicate(timeout=300) for p in stuck]
    assert [p.returncode for p in stuck] == [ExitCode.CHECKPOINT] * 2, outs
    (incident,) = (tmp_path / "stuck" / "hang").iterdir()
    report = (incident / "report.txt").read_text()
    assert "checkpoint save timeout: the save of step 2 has taken" in report, report
    assert 'Thread "checkpoint-writer"' in (incident / "rank-00001.txt").read_text()
    assert not list((tmp_path / "stuck" / "checkpoints").glob("step00000002"))  # never committed
    logged = [
        r["step"] for r in map(json.loads, (tmp_path / "stuck" / "metrics.jsonl").open()) if "loss" in r
    ]
    assert (
        logged == [1, 2, 3, 4] and tensorboard_steps(tmp_path / "stuck", "loss") == logged
    )  # despite os._exit
