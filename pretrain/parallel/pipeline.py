"""Pipeline parallelism through DeepSpeed's `PipelineModule` (1F1B schedule).

The model's layer list (embedding, blocks..., norm, head) is split into contiguous stages by
`pretrain.parallel.partition`; each rank builds only its own stage's layers (see
`pretrain.parallel.parallelize`) and hands them to DeepSpeed already built, so no rank ever holds
the whole model. Tied input and
output embeddings become a `TiedLayerSpec` on the first and last stage: DeepSpeed keeps the two
copies equal (broadcast at start, gradients all-reduced between the two stages every step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from pretrain.config import Config
from pretrain.model.transformer import num_layers

TIED_EMBEDDING_KEY = "embedding"


class _BuiltTiedLayer(TiedLayerSpec):
    """A TiedLayerSpec whose module we built (and sliced for tensor parallelism) ourselves."""

    def __init__(self, module: nn.Module | None, forward_fn: Callable[..., Any] | None = None):
        super().__init__(TIED_EMBEDDING_KEY, nn.Module, forward_fn=forward_fn, tied_weight_attr=["weight"])
        self.module = module

    def build(self, log: bool = False) -> nn.Module:
        assert self.module is not None, "DeepSpeed asked for a tied layer of another stage"
        return self.module


class _PresetPartitionPipeline(PipelineModule):
    """PipelineModule with the stage boundaries we computed (DeepSpeed's own methods would build
    every layer on every rank just to count parameters)."""

    def __init__(self, layers: list[Any], parts: list[int], **kwargs: Any):
        object.__setattr__(self, "_preset_parts", parts)
        super().__init__(layers, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        self.parts = self._preset_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


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
            specs.append(_BuiltTiedLayer(module))
        elif tie and index == total - 1:
            specs.append(_BuiltTiedLayer(module, forward_fn=_tied_output))
        else:
            specs.append(module if module is not None else LayerSpec(nn.Identity))
    return _PresetPartitionPipeline(specs, parts, topology=topology, loss_fn=loss_fn)
