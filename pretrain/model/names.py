"""The plain model's names: each layer's module name and each parameter's name and unpadded shape.

These names are the framework's lingua franca: consolidated weights, the resharding cache, the
tensor-parallel plan and the Hugging Face mapping all key tensors by them, whatever layout trained.
"""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig
from pretrain.model.transformer import build_layer, layer_kind, num_layers

# Parameters with a row per vocabulary entry: padded for the layout in training, unpadded on disk.
VOCAB_PARAMETERS = ("embedding.weight", "head.weight")


def layer_name(cfg: ModelConfig, index: int) -> str:
    """Module name of layer `index` of the layer list in the plain Transformer."""
    kind = layer_kind(cfg, index)
    return f"blocks.{index - 1}" if kind == "block" else kind


def layer_parameters(cfg: ModelConfig) -> list[tuple[int, list[tuple[str, torch.Size]]]]:
    """(layer index, [(parameter name, unpadded shape), ...]) for every layer, in layer order; the
    tied output layer has no parameters of its own."""
    out: list[tuple[int, list[tuple[str, torch.Size]]]] = []
    with torch.device("meta"):
        for index in range(num_layers(cfg)):
            prefix = layer_name(cfg, index)
            if prefix == "head" and cfg.tie_embeddings:
                out.append((index, []))
                continue
            layer = build_layer(cfg, index, cfg.vocab_size, seed=0)
            out.append((index, [(f"{prefix}.{name}", p.shape) for name, p in layer.named_parameters()]))
    return out


def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every stored tensor's name and unpadded shape, in layer order."""
    return {name: shape for _, params in layer_parameters(cfg) for name, shape in params}
