"""Activation recomputation (activation checkpointing), applied to decoder blocks from outside.

`full` keeps only a block's input and recomputes the rest in the backward pass; `selective` keeps
matrix-product and attention outputs and recomputes the elementwise work around them (norms,
rotary, SwiGLU's activation, residual adds), which is cheap to redo and memory-hungry to keep.
The block's forward is replaced on the instance, so its parameter names, state dict and
checkpoints stay the plain block's (a wrapper module would rename every parameter).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def selective_recompute_keeps(op: object) -> bool:
    """Whether selective recomputation keeps the output of `op` (an aten overload) instead of
    recomputing it; pretrain.plan sizes activations from this."""
    return op in _SAVED_OPS


def _selective_policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(block: nn.Module, mode: str) -> nn.Module:
    """Make `block` recompute its activations in the backward pass (`mode` full or selective; none
    leaves it as it is). Returns the block."""
    if mode == "none":
        return block
    plain_forward: Callable[..., torch.Tensor] = block.forward
    options: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    elif mode != "full":
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")

    @functools.wraps(plain_forward)
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute for
            return plain_forward(x)
        return checkpoint(plain_forward, x, **options)

    block.forward = forward
    return block
