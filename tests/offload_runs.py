"""Training runs of tests/test_offload.py (importable by spawned processes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training_runs import REPO, SMALL, small_trainer


def train_and_describe_optimizer(overrides: list[str], run_dir: str) -> dict[str, Any]:
    """Fit the real trainer (configs/tiny.yaml + SMALL + overrides); return rank 0's metrics records
    and what DeepSpeed built: the torch-level optimizer's class and the device its Adam moments are on."""
    import torch.distributed as dist

    from pretrain import deepspeed_compat as compat

    trainer = small_trainer(overrides, run_dir)
    trainer.fit()
    base = compat.base_optimizer(trainer.engine.ds.optimizer)
    moments = [state["exp_avg"].device.type for state in base.state.values() if "exp_avg" in state]
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if dist.get_rank() == 0 else []
    return {
        "records": records,
        "optimizer": type(base).__name__,
        "moment_devices": sorted(set(moments)),
    }


def accumulated_gradients(runs: list[list[str]], micro_batches: int) -> list[Any]:
    """For each override list: a fresh engine sums the gradients of `micro_batches` micro-batches of
    one sequence (the same ones for every run) and returns them as one float64 vector, read with
    DeepSpeed's public safe_get_full_grad at the accumulation boundary (after the last backward,
    before the update, when the gradient is complete)."""
    import numpy as np
    import torch
    from deepspeed.utils import safe_get_full_grad

    from pretrain.config import load_config
    from pretrain.data import load_training_data
    from pretrain.model import Transformer
    from pretrain.parallel import build_engine

    out = []
    for overrides in runs:
        cfg = load_config(
            REPO / "configs" / "tiny.yaml",
            [*SMALL, f"train.global_batch_size={micro_batches}", "train.micro_batch_size=1", *overrides],
            world_size=1,
        )
        samples = load_training_data(cfg.data, cfg.train.seq_len).train[0]
        rows = torch.from_numpy(np.stack([samples[i] for i in range(micro_batches)]).astype(np.int64))
        precision = cfg.train.precision
        engine, _ = build_engine(cfg, Transformer(cfg.model, seed=0), world_size=1, precision=precision)
        ds = engine.ds
        for index in range(micro_batches):
            ds.backward(ds(rows[index : index + 1, :-1], rows[index : index + 1, 1:]))
            if index < micro_batches - 1:
                ds.step()  # not a boundary: DeepSpeed only accumulates
        grads = [safe_get_full_grad(p) for p in ds.module.parameters()]
        out.append(torch.cat([g.detach().double().flatten() for g in grads]).numpy())
    return out
