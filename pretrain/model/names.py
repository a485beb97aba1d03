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


LayerTensors = list[tuple[int, list[tuple[str, torch.Size]]]]


def layer_parameters(cfg: ModelConfig) -> LayerTensors:
    """(layer index, [(parameter name, unpadded shape), ...]) for every layer, in layer order; the
    tied output layer has no parameters of its own."""
    return _layer_tensors(cfg, buffers=False)


def layer_buffers(cfg: ModelConfig) -> LayerTensors:
    """(layer index, [(buffer name, shape), ...]) of the persistent buffers, state that is not
    trained by the optimizer but survives a restart (the MoE routers' balancing bias)."""
    return _layer_tensors(cfg, buffers=True)


def _layer_tensors(cfg: ModelConfig, buffers: bool) -> LayerTensors:
    out: LayerTensors = []
    with torch.device("meta"):
        for index in range(num_layers(cfg)):
            prefix = layer_name(cfg, index)
            if prefix == "head" and cfg.tie_embeddings:
                out.append((index, []))
                continue
            layer = build_layer(cfg, index, cfg.vocab_size, seed=0)
            params = dict(layer.named_parameters())
            tensors = (
                [(n, t) for n, t in layer.state_dict().items() if n not in params]
                if buffers
                else params.items()
            )
            out.append((index, [(f"{prefix}.{name}", t.shape) for name, t in tensors]))
    return out


def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter's name and unpadded shape, in layer order."""
    return {name: shape for _, params in layer_parameters(cfg) for name, shape in params}


def buffer_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every persistent buffer's name and shape, in layer order (none in a dense model)."""
    return {name: shape for _, buffers in layer_buffers(cfg) for name, shape in buffers}


def stored_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """What consolidated weights hold: each layer's parameters, then its persistent buffers."""
    params, buffers = layer_parameters(cfg), dict(layer_buffers(cfg))
    return {name: shape for index, ps in params for name, shape in [*ps, *buffers[index]]}


def is_routed_expert(name: str) -> bool:
    """Whether `name` is a stacked routed-expert weight (experts, out, in), which expert parallelism
    splits along its first dimension."""
    return ".mlp.experts." in name
