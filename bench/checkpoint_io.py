"""Checkpoint speed against the disk it writes to (prints JSON).

    python bench/checkpoint_io.py [--hidden 1024] [--layers 8] [--vocab 32000] [--repeats 2]

1. Save bandwidth: a synchronous save of a real DeepSpeed engine's state (one process, ZeRO-1,
   fp32: module weights, fp32 masters and both Adam moments, after one optimizer step), from the
   call to the commit (manifest, rename, `latest`, all fsynced), against `dd` writing the same
   number of bytes to the same directory with `conv=fsync`, alternated in one run. Target >= 0.7.
2. Training stall of an asynchronous save: the time `save()` blocks the training thread (the copy
   to host memory) divided by the synchronous save time. Target <= 0.1.
3. Time to the first step: `python pretrain/main.py` from process start to the first step in
   metrics.jsonl, fresh and resumed from checkpoints of step 20 and step 200 (a resume must not
   replay data, so the time must not grow with the step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(run_dir: Path, args: argparse.Namespace, async_save: bool):
    """A trainer (the real builder) one optimizer step in, so every optimizer tensor exists."""
    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer

    overrides = [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.vocab_size={args.vocab}",
        "model.num_heads=16", "model.num_kv_heads=16", "model.ffn_hidden_size=null", "train.seq_len=64",
        "train.global_batch_size=1", "train.micro_batch_size=1", "train.eval_interval=0",
        f"checkpoint.async_save={str(async_save).lower()}", "checkpoint.keep_last=1", "logging.tensorboard=false",
        "logging.plot=false", "train.precision=fp32", f"run.dir={run_dir}", "run.overwrite=true",
    ]  # fmt: skip
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides, world_size=1)
    trainer = build_trainer(cfg, init_distributed())
    trainer.train_step(trainer.train_batches.next_step())
    trainer.state.step = 1
    return trainer


def dd_seconds(directory: Path, size: int) -> float:
    block = 16 << 20
    count = -(-size // block)
    target = directory / "dd.bin"
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", f"bs={block}", f"count={count}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds * size / (count * block)  # dd wrote whole blocks: scale to the same byte count


def save_numbers(args: argparse.Namespace, directory: Path) -> dict:
    from pretrain.checkpoint.store import CheckpointStore

    trainer = build(directory / "run", args, async_save=True)
    store: CheckpointStore = next(c.store for c in trainer.callbacks if hasattr(c, "store"))
    sync_s, async_stall_s, async_total_s, dd_s, sizes = [], [], [], [], []
    for repeat in range(args.repeats):
        trainer.state.step += 1
        store.cfg.checkpoint.async_save = False
        start = time.perf_counter()
        store.save(trainer.run_state, trainer.state.step)
        sync_s.append(time.perf_counter() - start)
        outcome = store.wait()
        assert outcome is not None and outcome.ok, outcome
        sizes.append(outcome.total_bytes)
        dd_s.append(dd_seconds(directory, outcome.total_bytes))

        trainer.state.step += 1
        store.cfg.checkpoint.async_save = True
        start = time.perf_counter()
        store.save(trainer.run_state, trainer.state.step)
        async_stall_s.append(time.perf_counter() - start)
        outcome = store.wait()
        async_total_s.append(time.perf_counter() - start)
        assert outcome is not None and outcome.ok, outcome
        print(f"repeat {repeat}: sync {sync_s[-1]:.2f}s, dd {dd_s[-1]:.2f}s, async stall {async_stall_s[-1]:.3f}s",
              file=sys.stderr, flush=True)  # fmt: skip
    size = statistics.median(sizes)
    sync, dd = statistics.median(sync_s), statistics.median(dd_s)
    stall = statistics.median(async_stall_s)
    return {
        "checkpoint_bytes": int(size),
        "sync_save_s": sync_s,
        "dd_s": dd_s,
        "async_stall_s": async_stall_s,
        "async_total_s": async_total_s,
        "save_GBps": size / sync / 1e9,
        "dd_GBps": size / dd / 1e9,
        "save_over_dd_bandwidth": dd / sync,
        "async_stall_over_sync_save": stall / sync,
    }


def first_step_seconds(run_dir: Path, steps: int, extra: list[str]) -> float:
    command = [sys.executable, "pretrain/main.py", "--config", "configs/tiny.yaml", f"train.steps={steps}",
               "logging.interval=1", "train.eval_interval=0", "logging.plot=false", "logging.tensorboard=false",
               f"run.dir={run_dir}", *extra]  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    seen = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    start = time.perf_counter()
    # A fresh process of its own: not the rendezvous this benchmark's own process group holds.
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**env, "DS_ACCELERATOR": "cpu"})  # fmt: skip
    first = None
    while proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if first is None and any('"loss"' in line for line in lines[min(seen, len(lines)) :]):
            first = time.perf_counter() - start
        time.sleep(0.02)
    assert proc.returncode == 0, command
    assert first is not None
    return first


def resume_numbers(directory: Path) -> dict:
    run = directory / "resume"
    fresh = first_step_seconds(directory / "fresh", 1, [])
    first_step_seconds(run, 20, ["checkpoint.interval=20"])
    at_20 = first_step_seconds(run, 21, ["checkpoint.interval=20"])
    first_step_seconds(run, 200, ["checkpoint.interval=200", "checkpoint.save_final=true"])
    at_200 = first_step_seconds(run, 201, ["checkpoint.interval=200"])
    return {
        "fresh_start_to_first_step_s": fresh,
        "resume_at_step_21_to_first_step_s": at_20,
        "resume_at_step_201_to_first_step_s": at_200,
        "resume_200_over_resume_20": at_200 / at_20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", help="where to write (default: a temporary folder under the system's)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        out = {"save": save_numbers(args, directory), "resume": resume_numbers(directory)}
    out["model"] = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
