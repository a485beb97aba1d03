"""AdamW over two parameter groups (matrices decay, vectors do not), built once per rank: torch's, or
DeepSpeed's CPU Adam (in AdamW mode) when the optimizer states are offloaded to host memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain import deepspeed_compat as compat
from pretrain.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); leave vectors (norm scales, biases) alone.
    Always these two groups, in this order (checkpoint conversion and resuming rely on it); under
    expert parallelism a third one, the expert matrices (partitioned over other ranks by ZeRO)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    experts: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if compat.is_expert_parameter(param):
            experts.append(param)
        else:
            # The full shape: a ZeRO-3 partitioned parameter's own `.data` is empty.
            (decay if len(compat.full_shape(param)) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if experts:
        groups.append(compat.expert_parameter_group(experts, weight_decay))
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, offload: bool = False) -> torch.optim.Optimizer:
    """torch's AdamW over `parameter_groups`: one fused kernel per step on GPU, foreach elsewhere.
    With `offload`, DeepSpeed's CPU Adam: ZeRO-Offload refuses any other optimizer (torch's would step
    the host copies element by element), and computes the same AdamW update with SIMD on the host."""
    if offload:
        return _cpu_adamw(model, cfg)
    on_gpu = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=on_gpu or None,
        foreach=None if on_gpu else True,
    )


def _cpu_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # Imported here: building its C++ op (a JIT compile on first use, cached) is for offloaded runs only.
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        adamw_mode=True,  # decoupled weight decay, as torch's AdamW
        bias_correction=True,
    )


def apply_hyperparameters(groups: list[dict[str, Any]], cfg: OptimConfig) -> None:
    """Set optim.* on the groups of `parameter_groups` (a resumed run's config wins over the
    checkpoint's: the loaded optimizer state brings its old betas, eps and weight decay)."""
    for index, group in enumerate(groups):
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        # Matrices, then vectors, then (expert parallelism) expert matrices.
        group["weight_decay"] = cfg.weight_decay if index != 1 else 0.0
