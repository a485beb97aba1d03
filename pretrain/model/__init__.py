"""The plain model: builds and runs in one process with no distributed setup."""

from pretrain.model.flops import active_parameters, count_parameters, flops_per_token
from pretrain.model.transformer import IGNORE_INDEX, Transformer, build_layer, causal_lm_loss, num_layers

__all__ = [
    "IGNORE_INDEX",
    "Transformer",
    "active_parameters",
    "build_layer",
    "causal_lm_loss",
    "count_parameters",
    "flops_per_token",
    "num_layers",
]
