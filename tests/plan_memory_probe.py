"""Peak memory of real training steps, for tests/test_plan_memory.py (run as a fresh process).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/plan_memory_probe.py '[["model.hidden_size=768", ...], ...]' STEPS

For each list of config overrides (applied to configs/tiny.yaml), one after the other in this process,
prints in one JSON line the growth of the process's peak resident set (VmHWM) over its resident set
before that model was built, while the trainer's engine runs STEPS optimizer steps.

What is measured, and why it is comparable to pretrain.plan's estimate:
  - One process, DeepSpeed's CPU accelerator, fp32: the model built by `parallelize_model` and wrapped
    by `build_engine`, stepped through `TrainingEngine.train_step` (exactly what the trainer's loop
    calls), on random tokens, so the loader's memory maps are not part of it.
  - glibc serves allocations of 64 KiB and more with their own mmap when MALLOC_MMAP_THRESHOLD_ is
    set (which also stops glibc from raising that threshold), so freed tensors leave the resident set
    at once and the resident set follows live tensor bytes (page-rounded), as allocated GPU memory does.
  - A miniature model runs one step first in every recomputation mode and ZeRO stage measured, so the
    code pages of torch, DeepSpeed and their kernels that a step touches are resident before the
    baseline; they would otherwise appear as growth (a few MiB, more with recomputation, which runs
    other code). The previous case's engine is deleted before the next baseline, and glibc's
    malloc_trim(0) hands the free pages inside its heap back to the kernel, so a later case that reuses
    them counts them as growth as a fresh process would.
  - The peak is reset (writing 5 to /proc/self/clear_refs) after the engine is built, so what is kept
    is the steady state of training, not DeepSpeed's one-off copies while it flattens the weights;
    the baseline is the resident set before the model exists, so weights, master copies, optimizer
    state, gradients, activations and every temporary count.
  - A tensor that is allocated but never written (DeepSpeed's 2 GB gradient buckets) is not resident
    on a CPU, which the estimate knows (pretrain.plan.memory.CPU).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

MINIATURE = [
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.ffn_hidden_size=32",
    "train.seq_len=16",
    "train.micro_batch_size=1",
    "train.global_batch_size=1",
]


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    raise KeyError(key)


def _release_free_memory() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _steps(engine, cfg, steps: int) -> None:  # type: ignore[no-untyped-def]
    import torch

    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        micro_batches = []
        for _ in range(cfg.grad_accum_steps(1)):
            tokens = torch.randint(
                0,
                cfg.model.vocab_size,
                (cfg.train.micro_batch_size, cfg.train.seq_len + 1),
                generator=generator,
            )
            micro_batches.append((tokens[:, :-1], tokens[:, 1:]))
        engine.train_step(micro_batches)


def _engine(cfg, dist):  # type: ignore[no-untyped-def]
    from pretrain.parallel import build_engine, build_parallel_context, parallelize_model

    ctx = build_parallel_context(cfg, 0, 1)
    engine, _ = build_engine(cfg, parallelize_model(cfg, ctx, dist.device), 1, "fp32", ctx)
    return engine


def main() -> None:
    cases, steps = json.loads(sys.argv[1]), int(sys.argv[2])
    from pretrain.config import load_config
    from pretrain.parallel import init_distributed

    tiny = REPO / "configs" / "tiny.yaml"
    configs = [load_config(tiny, [*overrides, "train.precision=fp32"], world_size=1) for overrides in cases]
    dist = init_distributed()
    for mode, zero in sorted({(c.parallel.activation_checkpointing, c.parallel.zero_stage) for c in configs}):
        layout = [f"parallel.activation_checkpointing={mode}", f"parallel.zero_stage={zero}"]
        warm = load_config(tiny, [*MINIATURE, *layout], world_size=1)
        _steps(_engine(warm, dist), warm, 1)

    growth = []
    for cfg in configs:
        _release_free_memory()
        baseline = _status_bytes("VmRSS")
        engine = _engine(cfg, dist)
        Path("/proc/self/clear_refs").write_text("5")  # peak := now
        _steps(engine, cfg, steps)
        growth.append(_status_bytes("VmHWM") - baseline)
        del engine
    print(json.dumps({"peak_growth_bytes": growth}))


if __name__ == "__main__":
    main()
