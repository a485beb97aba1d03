"""Exact parameter counts, from the model built on the meta device (shapes only, no memory).

Each layer of the plain layer list is built by the trainer's own `build_layer` under
`torch.device("meta")`; each parameter is classed as split by tensor parallelism or replicated by the
trainer's own plan (`pretrain.parallel.tp_plan.partition_dim`), and pipeline stages come from the trainer's
own `partition_layers`. So the per-rank counts are those of the code that runs, not of a formula.
The routed experts of a mixture-of-experts block (the parameters of its `RoutedExperts`) are a third
kind: whole on every tensor-parallel rank and split over the `parallel.ep` expert-parallel ranks (rank
r holds experts [r E/ep, (r+1) E/ep), pretrain.parallel.expert_parallel), so a rank holds 1/ep of them.
`pretrain.plan.construct` builds every rank's shards the way the trainer does and checks them against
these numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from pretrain.config import Config, ModelConfig
from pretrain.model.flops import count_parameters
from pretrain.model.moe import RoutedExperts
from pretrain.model.names import layer_name
from pretrain.model.transformer import build_layer, num_layers
from pretrain.parallel.partition import partition_layers
from pretrain.parallel.tp_plan import partition_dim


@dataclass(frozen=True)
class LayerCount:
    """Parameters of one plain layer (padded vocabulary rows included: they are stored and trained)."""

    sharded: int  # split over the tensor-parallel ranks
    replicated: int  # held whole by every tensor-parallel rank (the norms, the MoE router)
    largest: int  # elements of the layer's largest tensor
    experts: int = 0  # routed experts: whole on every tensor-parallel rank, split over the EP ranks

    @property
    def total(self) -> int:
        return self.sharded + self.replicated + self.experts

    def per_rank(self, tp: int, ep: int = 1) -> int:
        return self.sharded // tp + self.replicated + self.experts // ep


def layer_counts(cfg: Config) -> tuple[LayerCount, ...]:
    """Every layer of the list (embedding, blocks..., norm, head), built on the meta device."""
    # Cached by value: the search asks for the same shapes many times.
    fields = tuple(getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model))
    return _layer_counts(fields, cfg.padded_vocab_size)


@functools.lru_cache(maxsize=64)
def _layer_counts(model_fields: tuple, padded_vocab_size: int) -> tuple[LayerCount, ...]:
    key = Config(model=ModelConfig(*model_fields))
    counts = []
    with torch.device("meta"):
        for index in range(num_layers(key.model)):
            layer = build_layer(key.model, index, padded_vocab_size, seed=0)
            sharded = replicated = largest = 0
            routed = {id(p) for m in layer.modules() if isinstance(m, RoutedExperts) for p in m.parameters()}
            experts = sum(p.numel() for p in layer.parameters() if id(p) in routed)
            for name, param in layer.named_parameters():
                largest = max(largest, param.numel())
                if id(param) in routed:
                    continue
                if partition_dim(f"{layer_name(key.model, index)}.{name}") is None:
                    replicated += param.numel()
                else:
                    sharded += param.numel()
            counts.append(LayerCount(sharded, replicated, largest, experts))
    return tuple(counts)


def parameter_count(cfg: Config) -> int:
    """Unique trained parameters (tied embeddings once, vocabulary padding left out): the number the
    trainer prints, checked against the closed formula of pretrain/model/flops.py."""
    counts = layer_counts(cfg)
    total = sum(c.total for c in counts)
    if cfg.model.tie_embeddings:
        total -= counts[-1].total  # the head is the embedding's matrix
    padding = (cfg.padded_vocab_size - cfg.model.vocab_size) * cfg.model.hidden_size
    total -= padding * (1 if cfg.model.tie_embeddings else 2)
    formula = count_parameters(cfg.model)
    assert total == formula, f"meta-device count {total:,} != formula {formula:,}"
    return total


def stage_layers(cfg: Config) -> list[list[int]]:
    """Layer-list indices held by each pipeline stage (the trainer's split)."""
    parts = partition_layers(cfg) if cfg.parallel.pp > 1 else [0, num_layers(cfg.model)]
    return [list(range(parts[s], parts[s + 1])) for s in range(len(parts) - 1)]


def rank_parameters(cfg: Config) -> list[int]:
    """Parameters stored by one rank of each pipeline stage (its tensor-parallel shard and its 1/ep of
    the routed experts, padding included). A tied output layer is free with one stage (it is the
    embedding) and a full copy of the embedding on the last stage of a pipeline."""
    counts, tp, ep, last = layer_counts(cfg), cfg.parallel.tp, cfg.parallel.ep, num_layers(cfg.model) - 1
    per_stage = []
    for indices in stage_layers(cfg):
        total = 0
        for index in indices:
            source = index
            if index == last and cfg.model.tie_embeddings:
                if cfg.parallel.pp == 1:
                    continue
                source = 0
            total += counts[source].per_rank(tp, ep)
        per_stage.append(total)
    return per_stage


def rank_expert_parameters(cfg: Config) -> list[int]:
    """Of `rank_parameters`, the routed experts' (E/ep experts of each MoE block of the stage): what
    DeepSpeed's ZeRO partitions over the dp/ep expert-data-parallel ranks instead of all dp ranks."""
    counts, ep = layer_counts(cfg), cfg.parallel.ep
    return [sum(counts[i].experts // ep for i in indices) for indices in stage_layers(cfg)]
