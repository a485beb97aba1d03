"""Training runs for the conversion tests (importable by spawned processes): each trains the small
model in some layout, saves a checkpoint, and returns what the consolidated weights must equal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from training_runs import REPO, SMALL


def plain_name(module_name: str, num_blocks: int, pipelined: bool) -> str:
    """The plain model's name for a parameter of a rank's module (a Transformer, or DeepSpeed's
    PipelineModule, which names layers by their index in the layer list)."""
    if not pipelined:
        return module_name
    head, _, rest = module_name.partition(".")
    if head == "tied_modules":  # tied_modules.embedding.weight
        return "embedding." + rest.partition(".")[2]
    index = int(head)
    layer = {0: "embedding", num_blocks + 1: "norm", num_blocks + 2: "head"}.get(index, f"blocks.{index - 1}")
    return f"{layer}.{rest}"


def train_and_capture_masters(overrides: list[str], run_dir: str) -> dict[str, Any]:
    """Train, save, then gather every parameter's fp32 master as this rank holds it (full over data-
    parallel ranks, this rank's tensor-parallel shard) straight from the optimizer in memory."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.config import load_config
    from pretrain.parallel import build_parallel_context, init_distributed
    from pretrain.train import build_trainer

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*SMALL, "train.steps=2", "checkpoint.save_final=true", *overrides, f"run.dir={run_dir}"],
        world_size=dist.get_world_size(),
    )
    trainer = build_trainer(cfg, init_distributed())
    trainer.fit()
    ctx = build_parallel_context(cfg, dist.get_rank(), dist.get_world_size())
    optimizer = trainer.engine.ds.optimizer
    fp16_masters = {}
    if cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp16":
        # DeepSpeed's fp16 optimizer (no ZeRO) pairs each live parameter with its fp32 master.
        for params, group_masters in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            fp16_masters.update({id(p): m for p, m in zip(params, group_masters, strict=True)})
    masters = {}
    for name, param in trainer.engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # a collective under ZeRO: every rank, same order
        value = full if full is not None else fp16_masters.get(id(param), param).detach()
        # numpy, not torch: tensors would cross the result queue as shared memory of a process that exits
        masters[plain_name(name, cfg.model.num_layers, cfg.parallel.pp > 1)] = value.float().numpy().copy()
    return {"tp_rank": ctx.tp_rank, "dp_rank": ctx.dp_rank, "masters": masters}


def run_convert_cli(*args: Any, transformers_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m pretrain.convert ARGS` in a subprocess, as a user runs it; `transformers_dir` first
    on PYTHONPATH shadows the venv's transformers (the lowest version the pyproject allows)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    if transformers_dir is not None:
        env["TRANSFORMERS_VERBOSITY"] = "error"
        env["PYTHONPATH"] = os.pathsep.join([str(transformers_dir), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pretrain.convert", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
