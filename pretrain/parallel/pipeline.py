"""Pipeline parallelism through DeepSpeed's `PipelineModule` (1F1B schedule).

The model's layer list (embedding, blocks..., norm, head) is split into contiguous stages by
`pretrain.parallel.partition`; each rank builds only its own stage's layers (see
`pretrain.parallel.parallelize`) and hands them to DeepSpeed already built, so no rank ever holds
the whole model. Tied input and
output embeddings become a `TiedLayerSpec` on the first and last stage: DeepSpeed keeps the two
copies equal (broadcast at start, gradients all-reduced between the two stages every step).
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from pretrain.config import Config, ModelConfig
from pretrain.deepspeed_compat import PrebuiltTiedLayer, PresetPartitionPipeline
from pretrain.model.names import layer_name, layer_parameters
from pretrain.model.transformer import num_layers

TIED_EMBEDDING_KEY = "embedding"


def _tied_output(embedding: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return embedding.project(x)  # type: ignore[operator]


def build_pipeline(
    cfg: Config,
    local_layers: dict[int, nn.Module],
    parts: list[int],
    loss_fn: nn.Module,
    topology: Any,
) -> PipelineModule:
    """Assemble this rank's built layers (index in the layer list -> module) into DeepSpeed's
    PipelineModule; layers of other stages appear as specs DeepSpeed never builds."""
    total, tie = num_layers(cfg.model), cfg.model.tie_embeddings
    specs: list[Any] = []
    for index in range(total):
        module = local_layers.get(index)
        if tie and index == 0:
            specs.append(PrebuiltTiedLayer(TIED_EMBEDDING_KEY, module))
        elif tie and index == total - 1:
            specs.append(PrebuiltTiedLayer(TIED_EMBEDDING_KEY, module, forward_fn=_tied_output))
        else:
            specs.append(module if module is not None else LayerSpec(nn.Identity))
    return PresetPartitionPipeline(specs, parts, topology=topology, loss_fn=loss_fn)


def plain_parameter_name(cfg: ModelConfig, module_name: str, pipelined: bool) -> str:
    """The plain model's name of a parameter as DeepSpeed's engine module names it. A pipeline
    (PipelineModule) names layers by their index in the layer list ('3.attn.q_proj.weight') and the
    tied embedding 'tied_modules.embedding.weight' on both stages that hold it."""
    if not pipelined:
        return module_name
    head, _, rest = module_name.partition(".")
    if head == "tied_modules":
        key, _, rest = rest.partition(".")
        return f"{key}.{rest}"
    return f"{layer_name(cfg, int(head))}.{rest}"


def engine_parameter_names(cfg: Config, pipelined: bool) -> dict[str, str]:
    """Plain name -> the name DeepSpeed's engine module gives that parameter (the inverse of
    `plain_parameter_name`)."""
    names = {}
    for index, params in layer_parameters(cfg.model):
        prefix = layer_name(cfg.model, index)
        for name, _ in params:
            if not pipelined:
                names[name] = name
            elif cfg.model.tie_embeddings and name == "embedding.weight":
                names[name] = f"tied_modules.{TIED_EMBEDDING_KEY}.weight"
            else:
                names[name] = f"{index}{name.removeprefix(prefix)}"
    return names
