"""Entry point: `deepspeed pretrain/main.py --config configs/tiny.yaml [key=value ...]`.

Parse the config, join the process group, build (resuming from the newest complete checkpoint), fit.
Every error raised on purpose carries its exit code (`pretrain.errors`): 0 done; 2 invalid
configuration; 3 non-finite loss; 4 unusable data; 5 a checkpoint (or the run directory) could not be
written, or the one named cannot be resumed; 6 hang (the watchdog, pretrain/train/watchdog.py, found
no step completing in time); 7 the launch failed; 8 a collective lost another rank (that rank's own
code says why; on every rank: the network); 75 stopped by SIGTERM, SIGUSR1 or SIGINT after
saving a complete checkpoint: run the same command again to continue; 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script (as the deepspeed launcher does): make `pretrain` importable from the repository
    # and keep this directory's modules (config/, data/, ...) from shadowing top-level packages.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from pretrain.config import Config, describe_fields, load_config
from pretrain.errors import ExitCode, OutOfMemory, Preempted, PretrainError, exit_code_of

if TYPE_CHECKING:
    from pretrain.train.trainer import Trainer

# The exit codes under the names scripts and docs use; defined once, in pretrain.errors.ExitCode.
EXIT_CONFIG_ERROR = ExitCode.CONFIG
EXIT_NON_FINITE = ExitCode.NON_FINITE
EXIT_DATA_ERROR = ExitCode.DATA
EXIT_CHECKPOINT_ERROR = ExitCode.CHECKPOINT
EXIT_HANG = ExitCode.HANG  # exited by the watchdog thread, not returned from here
EXIT_LAUNCH_ERROR = ExitCode.LAUNCH
EXIT_REQUEUE = ExitCode.REQUEUE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deepspeed pretrain/main.py",
        description="Pretrain a Llama-style decoder. Settings come from --config and dotted key=value overrides.",
    )
    parser.add_argument("--config", help="YAML preset, e.g. configs/tiny.yaml (default: built-in defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=3e-4 parallel.zero_stage=2"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and the data's metadata, print the resolved config, the DeepSpeed config, "
        "parameter count and FLOPs per token, then exit",
    )
    parser.add_argument(
        "--world-size", type=int, help="world size assumed by --dry-run (default: $WORLD_SIZE or 1)"
    )
    parser.add_argument(
        "--help-config", action="store_true", help="list every config key with its type and default"
    )
    # The deepspeed launcher appends --local_rank=N; we read LOCAL_RANK from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def current_rank() -> int:
    """This process's rank as the launcher (or, once joined, `launch`) exported it."""
    return int(os.environ.get("RANK", "0"))


def dry_run(cfg: Config, world_size: int) -> None:
    import torch

    from pretrain.data.checks import check_from_metadata
    from pretrain.parallel import build_deepspeed_config, resolve_precision
    from pretrain.train import run_summary

    check_from_metadata(cfg)  # what the real run refuses about its data, from the manifests alone
    warn_about(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.train.precision, device)
    summary = run_summary(cfg, world_size, precision)
    print("# resolved config\n" + cfg.to_yaml())
    print("# DeepSpeed config\n" + json.dumps(build_deepspeed_config(cfg, world_size, precision), indent=2))
    print("\n# derived\n" + json.dumps(summary, indent=2))
    print(f"\nparameters: {summary['parameters']:,}")
    print(f"FLOPs per token (training, seq_len {cfg.train.seq_len}): {summary['flops_per_token']:,}")


def warn_about(cfg: Config) -> None:
    from pretrain.logs import get_logger

    for warning in cfg.warnings():
        get_logger("main").warning(warning)


def train(args: argparse.Namespace) -> None:
    from pretrain.logs import setup_logging
    from pretrain.parallel.distributed import env_world_size

    setup_logging(current_rank())  # the launcher's RANK if it set one; again once the group is joined

    world_size = args.world_size or env_world_size()
    cfg = load_config(args.config, args.overrides, world_size=world_size)
    # The split into pipeline stages needs the model (and DeepSpeed): not for --help-config's sake.
    from pretrain.parallel.layout import check_layout

    check_layout(cfg, world_size)
    if args.dry_run:
        if current_rank() == 0:
            dry_run(cfg, world_size)
        return
    from pretrain.train.run_dir import RunDirBefore
    from pretrain.train.run_lock import holds_lock

    before = RunDirBefore.take(Path(cfg.run.dir))
    trainer, first_step, undone = None, None, False
    # Unwound after the handler below: the trainer's threads are joined, then run.dir's lock released,
    # then (registered first, so run last) the folders an undone start created are removed if empty.
    with ExitStack() as cleanup:
        cleanup.callback(lambda: before.remove_created_folders() if undone else None)
        try:
            trainer = start(cfg, cleanup)
            first_step = trainer.state.step
            trainer.fit()
        except Exception as error:
            refusal = out_of_memory(error, cfg, trainer) or error
            trained = trainer is not None and trainer.state.step != first_step
            refused = isinstance(refusal, PretrainError) and not isinstance(refusal, Preempted)
            if refused and not trained and current_rank() == 0:
                # Nothing was trained: leave run.dir as this start found it (the README's promise for a
                # config error; and a next start with resume=none is not refused for the empty
                # checkpoints/ or metrics.jsonl this one would leave). Its files only if it holds the
                # lock: a start refused for another run's lock must not touch that run's new files.
                if holds_lock(Path(cfg.run.dir)):
                    before.restore_outputs()
                undone = True
            if refusal is error:
                raise
            raise refusal from error


def start(cfg: Config, cleanup: ExitStack) -> Trainer:
    """Check the run directory, join the process group, take run.dir's lock, run the pre-flight check
    and build the trainer (resumed from the newest complete checkpoint when there is one). What must be
    released on the way out (the lock, the trainer's threads) is pushed onto `cleanup`."""
    from pretrain.train import check_run_dir

    check_run_dir(cfg)
    # Stop signals only raise a flag from here on (before the slow imports, distributed start-up and
    # resume), so even an early one ends in ExitCode.REQUEUE rather than a kill.
    from pretrain.checkpoint.signals import StopSignals

    stop_signals = StopSignals(rank=current_rank())
    stop_signals.install()

    from launch import current
    from launch.preflight import preflight
    from pretrain.logs import quiet_libraries, setup_logging
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer
    from pretrain.train.run_lock import run_dir_lock

    quiet_libraries()
    dist = init_distributed(cfg.watchdog.join_timeout, cfg.watchdog.resolved_collective_timeout())
    setup_logging(dist.rank)  # the rank a launcher like srun gives only now
    cleanup.enter_context(run_dir_lock(Path(cfg.run.dir), cfg.run.lock_stale_after, dist.rank))
    warn_about(cfg)
    preflight(current()[0], cfg.to_yaml(), Path(cfg.run.dir))  # type: ignore[index]
    trainer = build_trainer(cfg, dist, stop_signals)
    cleanup.callback(trainer.close)  # before the lock is released: the unwinding runs in reverse
    return trainer


# How torch's CPU allocator words a failed allocation (a plain RuntimeError; on CUDA and other devices
# torch raises torch.OutOfMemoryError): on Linux and macOS, and on Windows.
_CPU_ALLOCATION_FAILED = (
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)


def out_of_memory(error: BaseException, cfg: Config, trainer: Trainer | None) -> OutOfMemory | None:
    """`error` as the config change it needs, if it is a genuine allocation failure (else None)."""
    torch = sys.modules.get("torch")  # not imported yet: torch cannot have raised it
    device = torch is not None and isinstance(error, torch.OutOfMemoryError)
    cpu = isinstance(error, RuntimeError) and any(text in str(error) for text in _CPU_ALLOCATION_FAILED)
    if not (device or cpu or isinstance(error, MemoryError)):
        return None
    t, par = cfg.train, cfg.parallel
    settings = (
        f"train.micro_batch_size={t.micro_batch_size}, train.seq_len={t.seq_len}, "
        f"parallel.activation_checkpointing={par.activation_checkpointing}, parallel.zero_stage="
        f"{par.zero_stage}, parallel.tp={par.tp}, parallel.pp={par.pp}"
    )
    where = (
        "starting (data, model, engine, resume)"
        if trainer is None
        else f"training step {trainer.state.step + 1}"
    )
    return OutOfMemory(current_rank(), where, error, settings)


def report(error: BaseException) -> int:
    """Print what `error` means on this rank (once per job where the ranks agree) and return the exit code."""
    rank = current_rank()
    if isinstance(error, PretrainError):
        message = error.report(rank)
    elif lost_peer(error):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = (
            f"error (rank {rank}): lost the connection to another rank during a collective ({first_line[:300]}): "
            f"that rank failed or was killed, and its own message is above or in its log; stopping here too"
        )
    else:  # not raised on purpose: a bug, or the environment failing in a way nobody checked for
        message = f"error (rank {rank}): unexpected {type(error).__name__}: {error}\n" + "".join(
            traceback.format_exception(error)
        )
    if message:
        print(message, file=sys.stderr, flush=True)
    if lost_peer(error) and not isinstance(error, PretrainError):
        return ExitCode.PEER_LOST
    if int(exit_code_of(error)) == ExitCode.REQUEUE:
        # Python restores the default action of handled signals while it shuts down, so a late
        # signal would still kill the process and replace this exit code: ignore them from here on.
        from pretrain.checkpoint.signals import STOP_SIGNALS

        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
    return exit_code_of(error)


# What gloo and NCCL say when a peer process is gone: a consequence on this rank, not its own error.
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL communicator was aborted",
    "remote process exited or there was a network error",
)


def lost_peer(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _PEER_GONE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        for key, tname, default, doc in describe_fields():
            print(f"{key} ({tname}, default {default}): {doc}")
        return ExitCode.OK
    try:
        train(args)
    except Exception as error:  # every way out goes through report() and then exit_process()
        return report(error)
    return ExitCode.OK


def exit_process(code: int) -> NoReturn:
    """Exit with `code` in a fixed order: the process groups (only where every rank got here together:
    a finished or preempted run), Python's exit handlers, logs, then the process itself, without the
    interpreter's teardown. That teardown destroys torch's C++ objects in no defined order while their
    threads may still run; it once turned a finished run's 0 into a SIGABRT ("terminate called without
    an active exception") and the launcher's 250."""
    import atexit
    import logging

    if code in (ExitCode.OK, ExitCode.REQUEUE):
        from pretrain.parallel.distributed import shutdown_distributed

        shutdown_distributed()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
