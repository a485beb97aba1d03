"""A training run in which one rank stops making progress: the input of the watchdog tests.

    RANK=.. WORLD_SIZE=.. ... python tests/slurm/hang_train.py --sleep-rank 1 --sleep-after-step 2 \
        --config configs/tiny.yaml key=value ...

Rank --sleep-rank sleeps (for an hour) at the end of step --sleep-after-step (-1: never), in a
callback that runs before the watchdog's, so its last completed step stays one behind; the others go
on into the next step's collectives and wait there. With --slow-write-s S the same rank takes S
seconds longer to write each checkpoint file (a slow filesystem). Exits as main.py does (the
watchdog exits it with code 6, or 5 for a save past checkpoint.save_timeout).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.config import load_config
from pretrain.parallel import init_distributed
from pretrain.parallel.distributed import env_world_size
from pretrain.train import build_trainer
from pretrain.train.callbacks import Callback
from pretrain.train.run_lock import run_dir_lock


class SleepOnRank(Callback):
    def __init__(self, rank: int, after_step: int):
        self.rank, self.after_step = rank, after_step

    def on_step_end(self, trainer) -> None:
        if trainer.dist.rank == self.rank and trainer.state.step == self.after_step:
            time.sleep(3600)


def slow_down_checkpoint_writes(seconds: float) -> None:
    from pretrain.checkpoint import writer

    write = writer._write

    def slow_write(*args, **kwargs):
        time.sleep(seconds)
        return write(*args, **kwargs)

    writer._write = slow_write


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sleep-rank", type=int, required=True)
    parser.add_argument("--sleep-after-step", type=int, required=True)
    parser.add_argument("--slow-write-s", type=float, default=0.0)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides, world_size=env_world_size())
    dist = init_distributed()
    if args.slow_write_s and dist.rank == args.sleep_rank:
        slow_down_checkpoint_writes(args.slow_write_s)
    with run_dir_lock(Path(cfg.run.dir), cfg.run.lock_stale_after, dist.rank):  # as main.py holds it
        trainer = build_trainer(cfg, dist)
        trainer.callbacks.insert(0, SleepOnRank(args.sleep_rank, args.sleep_after_step))
        trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
