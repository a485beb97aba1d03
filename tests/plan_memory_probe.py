"""Peak memory of real training steps, for tests/test_plan_memory.py (run as a fresh process).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/plan_memory_probe.py '[["model.hidden_size=768", ...], ...]' STEPS

For each list of config overrides (applied to configs/tiny.yaml, or to the preset a first item
'config=configs/NAME.yaml' names, e.g. configs/tiny-moe.yaml), one after the other in this process,
prints in one JSON line the growth of the process's peak resident set (VmHWM) over its resident set
before that model was built, while the trainer's engine runs STEPS optimizer steps.

What is measured, and why it is comparable to pretrain.plan's estimate:
  - One process, DeepSpeed's CPU accelerator, fp32: the model built by `parallelize_model` and wrapped
    by `build_engine`, stepped through `TrainingEngine.train_step` (exactly what the trainer's loop
    calls), on random tokens, so the loader's memory maps are not part of it.
  - glibc serves allocations of 64 KiB and more with their own mmap when MALLOC_MMAP_THRESHOLD_ is
    set (which also stops glibc from raising that threshold), so freed tensors leave the resident set
    at once and the resident set follows live tensor bytes (page-rounded), as allocated GPU memory does.
  - A miniature model (a mixture of experts too, when a case is one) runs one step first in every
    recomputation mode and ZeRO stage measured, so the
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

MINIATURE_EXPERTS = ["model.moe.num_experts=2", "model.moe.top_k=1", "model.moe.num_shared_experts=1"]
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


def _steps(engine, cfg, steps: int, world: int = 1) -> None:  # type: ignore[no-untyped-def]
    import torch

    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        micro_batches = []
        for _ in range(cfg.grad_accum_steps(world)):
            tokens = torch.randint(
                0,
                cfg.model.vocab_size,
                (cfg.train.micro_batch_size, cfg.train.seq_len + 1),
                generator=generator,
            )
            micro_batches.append((tokens[:, :-1], tokens[:, 1:]))
        engine.train_step(micro_batches)


def _engine(cfg, dist, rank: int = 0, world: int = 1):  # type: ignore[no-untyped-def]
    from pretrain.parallel import build_engine, build_parallel_context, parallelize_model

    ctx = build_parallel_context(cfg, rank, world)
    engine, _ = build_engine(cfg, parallelize_model(cfg, ctx, dist.device), world, "fp32", ctx)
    return engine


def load_case(overrides: list[str], world: int = 1):  # type: ignore[no-untyped-def]
    """The config of one case: configs/tiny.yaml, or the preset a first 'config=PATH' item names, with
    the overrides, in fp32 on `world` processes."""
    from pretrain.config import load_config

    path = REPO / "configs" / "tiny.yaml"
    if overrides and overrides[0].startswith("config="):
        path, overrides = REPO / overrides[0].removeprefix("config="), overrides[1:]
    return load_config(path, [*overrides, "train.precision=fp32"], world_size=world)


def main() -> None:
    cases, steps = json.loads(sys.argv[1]), int(sys.argv[2])
    from pretrain.config import load_config
    from pretrain.parallel import init_distributed

    tiny = REPO / "configs" / "tiny.yaml"
    configs = [load_case(overrides) for overrides in cases]
    dist = init_distributed()
    kinds = {
        (c.parallel.activation_checkpointing, c.parallel.zero_stage, c.model.moe.enabled) for c in configs
    }
    for mode, zero, experts in sorted(kinds):
        layout = [f"parallel.activation_checkpointing={mode}", f"parallel.zero_stage={zero}"]
        warm = load_config(tiny, [*MINIATURE, *layout, *(MINIATURE_EXPERTS if experts else [])], world_size=1)
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


def expert_parallel_rank(overrides: list[str], steps: int) -> dict[str, object]:
    """On each rank of a run_distributed world: this rank's
    engine for `overrides` (as `load_case`), what its DeepSpeed ZeRO optimizer partitioned (per
    parameter group: MoE or not, over how many ranks, the fp32 partition's elements), its module's
    parameters, and the growth of its peak resident set while it runs STEPS steps, measured as `main`
    measures it (a miniature MoE of the same expert-parallel degree steps first)."""
    import ctypes

    import torch.distributed as torch_dist

    from pretrain.config import load_config
    from pretrain.parallel import init_distributed

    # As MALLOC_MMAP_THRESHOLD_ does at a process's start; the ranks are forked from a server whose
    # environment is that of the first test that started it (in the suite, not this one's).
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    dist = init_distributed()
    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    cfg = load_case(overrides, world)
    warm_overrides = [*MINIATURE, *MINIATURE_EXPERTS, f"train.global_batch_size={world}"]
    warm_overrides += [f"parallel.ep={cfg.parallel.ep}", f"parallel.zero_stage={cfg.parallel.zero_stage}"]
    warm = load_config(REPO / "configs" / "tiny.yaml", warm_overrides, world_size=world)
    _steps(_engine(warm, dist, rank, world), warm, 1, world)
    _release_free_memory()
    baseline = _status_bytes("VmRSS")
    engine = _engine(cfg, dist, rank, world)
    optimizer = engine.ds.optimizer
    groups = [
        {
            "moe": bool(group.get("moe", False)),
            "partition_count": int(optimizer.partition_count[i]),
            "fp32_partition": int(optimizer.single_partition_of_fp32_groups[i].numel()),
            "parameters": sum(p.numel() for p in optimizer.bit16_groups[i]),
        }
        for i, group in enumerate(optimizer.optimizer.param_groups)
    ]
    Path("/proc/self/clear_refs").write_text("5")
    _steps(engine, cfg, steps, world)
    growth = _status_bytes("VmHWM") - baseline
    return {
        "groups": groups,
        "parameters": sum(p.numel() for p in engine.ds.module.parameters()),
        "peak_growth_bytes": growth,
        "block": _expert_parallel_block_saved(cfg, engine.ctx),
    }


def _expert_parallel_block_saved(cfg, ctx) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """What autograd keeps for one MoE decoder block's forward on this rank with the trainer's expert
    parallelism (every saved tensor's storage once, weights and rotary tables left out), and how many
    (token, slot) rows the rank's experts received from the group."""
    import torch
    import torch.distributed as torch_dist

    from pretrain.model.layers import DecoderBlock, rotary_tables
    from pretrain.parallel.expert_parallel import apply_expert_parallel

    m = cfg.model
    torch.manual_seed(ctx.dp_rank)  # other tokens on each rank
    block = DecoderBlock(m, True)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.02)
    block = apply_expert_parallel(block, ctx.ep, ctx.ep_rank, ctx.ep_group)
    batch, seq = cfg.train.micro_batch_size, cfg.train.seq_len
    x = torch.randn(batch, seq, m.hidden_size, requires_grad=True)
    with torch.no_grad():
        routing, _, _ = block.mlp.router(block.mlp_norm(x + block.attn(block.attn_norm(x))).flatten(0, 1))
    saved = block_saved_bytes(block, x, rotary_tables(m.head_size, seq, m.rope_theta, x.device))
    counts = torch.bincount(routing.experts.flatten(), minlength=m.moe.num_experts)
    torch_dist.all_reduce(counts, group=ctx.ep_group)
    local = m.moe.num_experts // ctx.ep
    received = int(counts[ctx.ep_rank * local : (ctx.ep_rank + 1) * local].sum())
    return {"saved_bytes": saved, "rows_received": received, "tokens": batch * seq}


def block_saved_bytes(block: torch.nn.Module, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct storages autograd saves for backward in `block(x)`, leaving out the
    parameters and the (cached) rotary tables, which are not activations."""
    import torch

    excluded = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *tables)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in excluded:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(saved.values())
