"""One error hierarchy: each error raised on purpose carries its exit code, `main` maps them once,
and an OSError is reported for what it is (not as unusable data)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY
from pretrain.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    DataError,
    ExitCode,
    InvalidCheckpoint,
    LaunchError,
    NonFiniteLossError,
    OutOfMemory,
    OutputError,
    PeerFailure,
    Preempted,
    PretrainError,
    exit_code_of,
)

SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=128", "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
         "train.eval_interval=0", "logging.tensorboard=false", "logging.plot=false"]  # fmt: skip


def test_each_error_carries_the_exit_code_the_readme_documents():
    cases = [
        (ConfigError(["x"]), 2),
        (OutOfMemory(1, "training step 3", MemoryError(), "train.micro_batch_size=4"), 2),
        (NonFiniteLossError(3, float("nan")), 3),
        (DataError("x"), 4),
        (CheckpointError("x"), 5),
        (InvalidCheckpoint(Path("c"), "x"), 5),
        (OutputError("metrics", OSError(errno.ENOSPC, "No space left on device")), 5),
        (LaunchError("x"), 7),
        (Preempted("SIGTERM", 4, None), 75),
        (ConversionError("x"), 1),
        (PeerFailure(4), 4),  # the failed rank's code, not one of its own
        (RuntimeError("a bug"), 1),
    ]
    for error, code in cases:
        assert exit_code_of(error) == code, error
    # Every framework error is a PretrainError; the subclasses keep the builtin bases callers catch.
    assert all(isinstance(e, PretrainError) for e, _ in cases[:-1])
    assert isinstance(DataError("x"), ValueError) and isinstance(ConfigError(["x"]), ValueError)
    from launch.hostlist import HostlistError
    from pretrain.data.indexed import ShardError
    from pretrain.data.remote import RemoteDataError

    assert exit_code_of(HostlistError("x")) == ExitCode.LAUNCH and isinstance(HostlistError("x"), ValueError)
    assert exit_code_of(ShardError("x")) == exit_code_of(RemoteDataError("x")) == ExitCode.DATA


def test_who_reports_an_error():
    # The same on every rank (they agreed on it): rank 0 says it once.
    assert ConfigError(["bad"]).report(0).startswith("error: invalid configuration")
    assert ConfigError(["bad"]).report(3) is None
    assert CheckpointError("x").report(1) is None
    # Found by one rank, possibly alone: every rank says what it found, with its rank.
    assert DataError("shard 7 is corrupt").report(3) == "error (rank 3): shard 7 is corrupt"
    out_of_memory = OutOfMemory(3, "training step 1", MemoryError(), "")
    assert out_of_memory.report(3).startswith("error (rank 3): invalid configuration")
    # The ranks that only heard of another rank's failure stay quiet.
    assert PeerFailure(4).report(0) is None


def test_a_full_disk_while_writing_metrics_is_an_output_error_naming_the_fix(tmp_path):
    from pretrain.train.callbacks.sinks import JsonlWriter

    writer = JsonlWriter(Path("/dev/full"))  # every write fails with ENOSPC, as on a full disk
    writer.on_train_start(None)  # type: ignore[arg-type]
    with pytest.raises(OutputError) as error:
        writer.on_log(None, {"step": 3, "loss": 1.0})  # type: ignore[arg-type]
    message = str(error.value)
    assert "step 3" in message and "No space left on device" in message and "free space there" in message
    assert exit_code_of(error.value) == ExitCode.CHECKPOINT


def test_an_unexpected_os_error_in_main_is_named_with_its_traceback_and_exit_code_1(capsys):
    from pretrain.main import report

    try:
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/file")
    except PermissionError as e:
        code = report(e)
    err = capsys.readouterr().err
    assert code == 1
    assert (
        "error (rank 0): unexpected PermissionError: [Errno 13] Permission denied: '/somewhere/file'" in err
    )
    assert "Traceback" in err


def test_a_peer_that_went_away_is_named_as_such_without_a_traceback(capsys):
    """What a healthy rank meets when another rank died in the middle of a collective (gloo's words)."""
    from pretrain.main import report

    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6057"
    )
    assert report(gloo) == ExitCode.PEER_LOST == 8  # not 1, a bug: the SLURM script tells them apart
    err = capsys.readouterr().err
    assert "error (rank 0): lost the connection to another rank during a collective" in err
    assert "its own message is above or in its log" in err and "Traceback" not in err
    try:
        raise RuntimeError("CUDA error: an illegal memory access")
    except RuntimeError as e:
        assert report(e) == 1
    assert "Traceback" in capsys.readouterr().err  # a real error keeps its traceback


def run_main(*args, env=None):
    return subprocess.run(
        [sys.executable, str(REPO / "pretrain" / "main.py"), "--config", str(TINY), *SMALL, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_a_config_file_that_cannot_be_read_is_a_config_error():
    from pretrain.config import load_config

    with pytest.raises(ConfigError, match=r"config file '/proc/self/mem' cannot be read \(\[Errno 5\]"):
        load_config("/proc/self/mem")  # a file that every read fails on (EIO), even for root


def test_a_run_dir_that_cannot_be_created_is_a_config_error_not_a_data_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_main(f"run.dir={blocker / 'run'}", "train.steps=1")
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert f"run.dir '{blocker / 'run'}' cannot be used" in result.stderr
    assert "Not a directory" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_disk_too_full_for_the_next_save_exits_5_and_keeps_the_earlier_checkpoint(tmp_path):
    """A 4 MiB tmpfs holds the run files and the first checkpoint (2.0 MB), not a second one beside it: the
    run stops at the second save (refused before writing, or ENOSPC while writing) with exit 5."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(disk)], check=True)
    try:
        result = run_main(
            f"run.dir={disk / 'run'}", "train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=0",
            "checkpoint.async_save=false",
        )  # fmt: skip
        complete = sorted(p.name for p in (disk / "run" / "checkpoints").iterdir() if p.is_dir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert result.returncode == ExitCode.CHECKPOINT, result.stderr[-3000:]
    assert "could not be written" in result.stderr or "not enough free disk space" in result.stderr
    assert "Traceback" not in result.stderr
    assert complete == ["step00000002"]


def test_a_dataset_that_cannot_be_read_is_a_data_error(tmp_path):
    from pretrain.config import DataConfig
    from pretrain.data import load_training_data

    (tmp_path / "manifest.json").symlink_to("/proc/self/mem")  # exists; every read fails (EIO)
    with pytest.raises(DataError, match=r"cannot be read \(\[Errno 5\] Input/output error\)"):
        load_training_data(DataConfig(paths=[str(tmp_path)]), 32)


def tree(folder):
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def test_a_config_error_after_the_process_group_is_joined_leaves_the_run_dir_as_it_was(tmp_path):
    """model.vocab_size below the data's vocabulary is found once the data is opened, after the join and
    the pre-flight check (which writes launch.json): the start is refused and undoes what it wrote."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "launch.json").write_text('{"from": "an earlier start"}\n')
    (existing / "notes.txt").write_text("mine\n")
    before = tree(existing)
    result = run_main(f"run.dir={existing}", "model.vocab_size=200", "train.steps=5")
    assert result.returncode == ExitCode.CONFIG, result.stderr[-3000:]
    assert "set model.vocab_size >= 257" in result.stderr and "Traceback" not in result.stderr
    assert "launch: 1 rank" in result.stdout  # refused after the pre-flight check, not before
    # The start got as far as its warnings, which come once the rank is known.
    assert "warning: schedule.warmup_steps (10) is longer than train.steps (5)" in result.stderr
    assert tree(existing) == before

    fresh = tmp_path / "new" / "run"
    result = run_main(f"run.dir={fresh}", "model.vocab_size=200")
    assert result.returncode == ExitCode.CONFIG, result.stderr[-3000:]
    assert not (tmp_path / "new").exists()  # neither run.dir nor the parent this start created


def limit_address_space():
    """16 GiB of address space: far above what these runs need, far below what the allocations below
    ask for, so those fail in the allocator on any machine, whatever its memory and overcommit policy,
    before a page of them is touched."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = 16 << 30 if hard == resource.RLIM_INFINITY else min(hard, 16 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        # A real allocation failure, not a mock: the logits of 16 x 1024 tokens over 524,288 rows (32 GiB)...
        (["model.vocab_size=524288", "train.seq_len=1024", "train.micro_batch_size=16",
          "train.global_batch_size=16"], "while training step 1"),
        # ... and an embedding of 1,048,576 x 8192 (32 GiB) while the model is built.
        (["model.vocab_size=1048576", "model.hidden_size=8192"], "while starting (data, model, engine, resume)"),
    ],
)  # fmt: skip
def test_running_out_of_memory_is_a_config_error_naming_the_settings_to_change(tmp_path, overrides, where):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "pretrain" / "main.py"), "--config", str(TINY), *SMALL, "train.steps=1",
         f"run.dir={run_dir}", *overrides],
        capture_output=True, text=True, timeout=300, cwd=REPO, preexec_fn=limit_address_space,
    )  # fmt: skip
    assert result.returncode == ExitCode.CONFIG, result.stderr[-3000:]
    assert (
        f"error (rank 0): invalid configuration (1 problem):\n  - out of memory on rank 0 {where}"
        in result.stderr
    )
    assert (
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 34359738368 bytes" in result.stderr
    )
    for fix in (
        "lower train.micro_batch_size",
        "parallel.activation_checkpointing=full",
        "python -m pretrain.plan",
    ):
        assert fix in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # nothing was trained: the start left no run directory behind


def test_undoing_a_refused_start_removes_only_what_it_created(tmp_path):
    from pretrain.train.run_dir import RunDirBefore

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step00000100").mkdir(parents=True)
    (run_dir / "checkpoints" / "step00000100" / "state.json").write_text("{}")
    (run_dir / "launch.json").write_text("earlier")
    (run_dir / "metrics.jsonl").write_text('{"step": 100}\n')
    before_tree = tree(run_dir)
    before = RunDirBefore.take(run_dir)
    # What a start writes before its first step is done, over what was there.
    (run_dir / "launch.json").write_text("this start")
    (run_dir / "config.yaml").write_text("x")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events.out").write_text("")
    (run_dir / "someone-elses.txt").write_text("kept: not a file a start writes")
    before.restore()
    assert tree(run_dir) == {**before_tree, "someone-elses.txt": b"kept: not a file a start writes"}

    fresh = tmp_path / "a" / "b"
    before = RunDirBefore.take(fresh)
    (fresh / "checkpoints").mkdir(parents=True)
    (fresh / "checkpoints" / "step00000001").mkdir()  # not empty: never removed, nor the folders above it
    before.restore()
    assert (fresh / "checkpoints" / "step00000001").is_dir()
    (fresh / "checkpoints" / "step00000001").rmdir()
    before.restore()
    assert not (tmp_path / "a").exists()


def test_a_start_refused_for_another_runs_lock_leaves_that_runs_new_files(tmp_path):
    """The refused start took its snapshot before the live run wrote its first files; what appeared
    since is that run's, so only the (empty) folders the refused start created may go."""
    from pretrain.train.run_dir import RunDirBefore

    run_dir = tmp_path / "new" / "run"
    before = RunDirBefore.take(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "launch.json").write_text("the live run's")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    before.restore(outputs=False)
    assert tree(run_dir) == {"launch.json": b"the live run's", "metrics.jsonl": b'{"step": 1}\n'}
    empty = tmp_path / "empty" / "run"
    before = RunDirBefore.take(empty)
    empty.mkdir(parents=True)
    before.restore(outputs=False)
    assert not (tmp_path / "empty").exists()
