"""Entry point: `deepspeed pretrain/main.py --config configs/tiny.yaml [key=value ...]`.

Parse the config, join the process group, build (resuming from the newest complete checkpoint), fit.
Exit codes: 0 done; 2 invalid configuration; 3 non-finite loss; 4 unusable data (missing, corrupt
or mismatched datasets); 5 a checkpoint could not be written or resumed; 6 hang (the watchdog,
pretrain/train/watchdog.py, found no step completing in time); 7 the launch failed (inconsistent
launcher variables, a rank that did not join, a pre-flight mismatch between ranks); 75 stopped by
SIGTERM, SIGUSR1 or SIGINT after saving a complete checkpoint: run the same command again to continue.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script (as the deepspeed launcher does): make `pretrain` importable from the repository
    # and keep this directory's modules (config.py, data/, ...) from shadowing top-level packages.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from pretrain.config import Config, ConfigError, describe_fields, load_config

EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_DATA_ERROR = 4
EXIT_CHECKPOINT_ERROR = 5
EXIT_HANG = 6  # exited by the watchdog thread (pretrain.train.watchdog.EXIT_HANG), not returned from here
EXIT_LAUNCH_ERROR = 7
EXIT_REQUEUE = 75  # pretrain.checkpoint.signals.EXIT_REQUEUE (not imported here: it pulls in torch)


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
        help="print the resolved config, the DeepSpeed config, parameter count and FLOPs per token, then exit",
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


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def dry_run(cfg: Config, world_size: int) -> None:
    import torch

    from pretrain.parallel import build_deepspeed_config, resolve_precision
    from pretrain.train import run_summary

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.train.precision, device)
    summary = run_summary(cfg, world_size, precision)
    print("# resolved config\n" + cfg.to_yaml())
    print("# DeepSpeed config\n" + json.dumps(build_deepspeed_config(cfg, world_size, precision), indent=2))
    print("\n# derived\n" + json.dumps(summary, indent=2))
    print(f"\nparameters: {summary['parameters']:,}")
    print(f"FLOPs per token (training, seq_len {cfg.train.seq_len}): {summary['flops_per_token']:,}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        for key, tname, default, doc in describe_fields():
            print(f"{key} ({tname}, default {default}): {doc}")
        return 0

    from launch import LaunchError
    from pretrain.parallel.distributed import env_world_size

    try:
        world_size = args.world_size or env_world_size()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LAUNCH_ERROR
    try:
        cfg = load_config(args.config, args.overrides, world_size=world_size)
        from pretrain.parallel.layout import check_layout

        check_layout(cfg, world_size)
        if args.dry_run:
            if is_rank_zero():
                dry_run(cfg, world_size)
            return 0
        from pretrain.train import check_run_dir

        check_run_dir(cfg)
    except ConfigError as e:
        if is_rank_zero():
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    # Stop signals only raise a flag from here on (before the slow imports, distributed start-up and
    # resume), so even an early one ends in EXIT_REQUEUE rather than a kill.
    from pretrain.checkpoint.signals import STOP_SIGNALS, StopSignals

    stop_signals = StopSignals(rank=int(os.environ.get("RANK", "0")))
    stop_signals.install()

    from deepspeed.utils import logger as ds_logger

    from launch import current
    from launch.preflight import preflight
    from pretrain.checkpoint.errors import CheckpointError
    from pretrain.data import DataError
    from pretrain.parallel import init_distributed
    from pretrain.parallel.distributed import PeerFailure
    from pretrain.train import NonFiniteLossError, build_trainer
    from pretrain.train.checkpointing import Preempted

    ds_logger.setLevel(logging.WARNING)
    try:
        dist = init_distributed(join_timeout=cfg.watchdog.join_timeout)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LAUNCH_ERROR
    try:
        preflight(current()[0], cfg.to_yaml(), Path(cfg.run.dir))  # type: ignore[index]
    except LaunchError as e:  # the same on every rank
        if dist.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_LAUNCH_ERROR
    try:
        trainer = build_trainer(cfg, dist, stop_signals)
        trainer.fit()
    except Preempted as e:
        if dist.is_main:
            print(str(e), file=sys.stderr, flush=True)
        # Python restores the default action of handled signals while it shuts down, so a late
        # signal would still kill the process and replace this exit code: ignore them from here on.
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
        return EXIT_REQUEUE
    except ConfigError as e:
        if dist.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except NonFiniteLossError as e:
        if dist.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except CheckpointError as e:
        if dist.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT_ERROR
    except PeerFailure:
        return EXIT_DATA_ERROR
    except (DataError, OSError) as e:
        print(f"error (rank {dist.rank}): {e}", file=sys.stderr)
        return EXIT_DATA_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
