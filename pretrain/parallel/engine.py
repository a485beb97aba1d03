"""DeepSpeed engine construction: optimizer, LR schedule, precision and ZeRO from the typed config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.config import Config
from pretrain.parallel.deepspeed_config import build_deepspeed_config
from pretrain.parallel.schedule import LRSchedule


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' means bf16 where the GPU computes it natively, else fp32 (CPUs, pre-Ampere GPUs)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); leave vectors (norm scales, biases) alone."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(
    cfg: Config, model: nn.Module, world_size: int, precision: str
) -> tuple[Any, dict[str, Any]]:
    """Wrap `model` in a DeepSpeed engine; returns the engine and the DeepSpeed config it was given."""
    import deepspeed

    ds_config = build_deepspeed_config(cfg, world_size, precision)
    device_type = next(model.parameters()).device.type
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        # One fused kernel per step on GPU; foreach (multi-tensor) elsewhere.
        fused=device_type == "cuda" or None,
        foreach=None if device_type == "cuda" else True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg.schedule, cfg.train.steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine, ds_config
