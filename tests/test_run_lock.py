"""One run per run.dir: the lock file, its stale-lock rules, and two real starts on one run.dir."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from pretrain.errors import ConfigError
from pretrain.train import run_lock
from pretrain.train.run_lock import LOCK_FILE, Holder, RunLock
from training_runs import SMALL

STALE_AFTER = 600.0


def write_lock(run_dir, age_s=0.0, **fields):
    """A lock file as another run would have left it, `age_s` seconds since its last heartbeat."""
    holder = {**Holder.this_process().__dict__, **fields}
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(holder))
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return holder


@pytest.fixture
def live_process():
    """Another process on this host, alive for the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_lock_is_taken_written_and_released(tmp_path):
    lock = RunLock(tmp_path, STALE_AFTER)
    lock.acquire()
    recorded = json.loads((tmp_path / LOCK_FILE).read_text())
    assert recorded["pid"] == os.getpid() and recorded["host"] == os.uname().nodename
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    again = RunLock(tmp_path, STALE_AFTER)
    again.acquire()
    again.release()


def test_a_live_holder_on_this_host_is_refused_with_its_name(tmp_path, live_process):
    write_lock(tmp_path, pid=live_process.pid, pid_started=run_lock._process_start(live_process.pid),
               job_id="4242")  # fmt: skip
    before = (tmp_path / LOCK_FILE).read_bytes()
    with pytest.raises(ConfigError) as error:
        RunLock(tmp_path, STALE_AFTER).acquire()
    assert error.value.exit_code == 2
    message = str(error.value)
    assert f"pid {live_process.pid} on {os.uname().nodename}, SLURM job 4242" in message
    assert "is in use by another run" in message and "nothing was changed" in message
    assert (tmp_path / LOCK_FILE).read_bytes() == before


def test_a_holder_whose_process_is_gone_or_whose_pid_was_reused_is_taken_over(tmp_path, live_process, caplog):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    write_lock(tmp_path, pid=int(finished.stdout), pid_started="1")
    lock = RunLock(tmp_path, STALE_AFTER)
    lock.acquire()
    assert "took over the stale lock" in caplog.text and "is gone" in caplog.text
    lock.release()
    write_lock(tmp_path, pid=live_process.pid, pid_started="1")  # the pid is alive, but not that process
    RunLock(tmp_path, STALE_AFTER).acquire()


def test_another_host_counts_by_heartbeat_age(tmp_path):
    write_lock(tmp_path, host="node-17", age_s=30)
    with pytest.raises(ConfigError, match="node-17"):
        RunLock(tmp_path, STALE_AFTER).acquire()
    write_lock(tmp_path, host="node-17", age_s=STALE_AFTER + 60)
    lock = RunLock(tmp_path, STALE_AFTER)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.holder.token


def test_a_requeued_slurm_job_takes_over_its_own_earlier_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path, host="node-3", job_id="777", restart_count=1)  # same incarnation, elsewhere
    with pytest.raises(ConfigError, match="SLURM job 777"):
        RunLock(tmp_path, STALE_AFTER).acquire()
    write_lock(tmp_path, host="node-3", job_id="777", restart_count=0)  # the one SLURM requeued
    RunLock(tmp_path, STALE_AFTER).acquire()
    write_lock(tmp_path, host="node-3", job_id="778", restart_count=0)  # another job
    with pytest.raises(ConfigError, match="SLURM job 778"):
        RunLock(tmp_path, STALE_AFTER).acquire()


def test_an_unreadable_lock_is_refused_until_it_is_stale(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"host": "no')  # its writer died mid-write
    with pytest.raises(ConfigError, match="whose lock file cannot be read"):
        RunLock(tmp_path, STALE_AFTER).acquire()
    then = time.time() - STALE_AFTER - 1
    os.utime(tmp_path / LOCK_FILE, (then, then))
    RunLock(tmp_path, STALE_AFTER).acquire()


def _racing_start(run_dir, barrier, outcomes):
    lock = RunLock(run_dir, STALE_AFTER)
    barrier.wait()
    try:
        lock.acquire()
        outcomes.append(lock.holder.token)
    except ConfigError:
        outcomes.append(None)


def test_of_two_starts_racing_for_one_stale_lock_exactly_one_wins(tmp_path):
    for _ in range(20):
        write_lock(tmp_path, host="node-9", age_s=STALE_AFTER + 60)
        outcomes, barrier = [], threading.Barrier(2)
        threads = [
            threading.Thread(target=_racing_start, args=(tmp_path, barrier, outcomes)) for _ in range(2)
        ]
        [t.start() for t in threads]
        [t.join() for t in threads]
        winners = [o for o in outcomes if o]
        assert len(winners) == 1, outcomes
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == winners[0]


def test_a_lock_that_vanished_while_being_judged_is_not_removed_after_another_start_took_it(
    tmp_path, monkeypatch
):
    """The interleaving that let two racing starts both win (seen once in a full suite run): start B
    finds the stale lock gone (start A renamed it away), A then creates its own lock, and B, having
    judged "it vanished", renamed A's new lock away unchecked and created its own."""
    write_lock(tmp_path, host="node-9", age_s=STALE_AFTER + 60)
    a, b = RunLock(tmp_path, STALE_AFTER), RunLock(tmp_path, STALE_AFTER)
    create, age = RunLock._create, RunLock._heartbeat_age
    first = {"create": True, "age": True}

    def b_create(self):
        if self is b and first["create"]:
            first["create"] = False
            (tmp_path / LOCK_FILE).unlink()  # A renames the stale lock away as B looks
            return False
        return create(self)

    def b_age(self):
        if self is b and first["age"]:
            first["age"] = False
            a.acquire()  # A creates its lock between B's look and B's removal
            return None
        return age(self)

    monkeypatch.setattr(RunLock, "_create", b_create)
    monkeypatch.setattr(RunLock, "_heartbeat_age", b_age)
    holders = []
    for lock in (b, a):
        try:
            if lock not in run_lock._held:
                lock.acquire()
        except ConfigError:
            continue
        holders.append(lock)
    assert len(holders) == 1
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == holders[0].holder.token
    holders[0].release()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path, STALE_AFTER)
    lock.acquire()
    then = time.time() - 1000
    os.utime(tmp_path / LOCK_FILE, (then, then))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 10
    lock.release()


def test_a_hard_exit_during_the_main_threads_release_still_finds_the_lock_gone(tmp_path):
    """The watchdog releases the held locks before os._exit while the main thread may be releasing
    the same lock (joining its heartbeat): release_held_locks must return only once the file is gone."""
    lock = RunLock(tmp_path, STALE_AFTER)
    lock.acquire()
    lock._stop.set()
    lock._thread.join()
    lock._thread = threading.Thread(target=time.sleep, args=(1.0,))  # a heartbeat slow to stop
    lock._thread.start()
    main_release = threading.Thread(target=lock.release)
    main_release.start()
    time.sleep(0.2)  # the main thread is now inside release, joining the heartbeat
    run_lock.release_held_locks()  # what the watchdog does right before os._exit
    assert not (tmp_path / LOCK_FILE).exists()
    main_release.join()


@pytest.mark.slow
def test_a_second_start_on_a_running_run_dir_is_refused_and_changes_nothing(tmp_path):
    """Two real starts of `python pretrain/main.py` on one run.dir, the second while the first trains."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "pretrain/main.py", "--config", "configs/tiny.yaml", *SMALL, "train.steps=100000",
               f"run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline, (
                first.stderr.read() if first.stderr else ""
            )
            time.sleep(0.2)
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        before = {
            p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name not in ("metrics.jsonl", LOCK_FILE)
        }
        second = subprocess.run([*command, "optim.lr=1e-4"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run (pid {holder['pid']} on {holder['host']}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # untouched, still training
        assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.exists())
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 75
    assert not (run_dir / LOCK_FILE).exists()  # released on the way out
