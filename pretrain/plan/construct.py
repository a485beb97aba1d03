"""Proof that a layout builds: every rank's layers and tensor-parallel shards, on the meta device.

For each pipeline stage and tensor-parallel rank this runs the trainer's own construction
(`pretrain.parallel.parallelize`: `parallelize_model` for one stage, its `build_rank_layers` under a
pipeline, whose DeepSpeed `PipelineModule` needs a process group) under `torch.device("meta")`: shapes
only, no memory, no process group. Then it checks what was built against the plain model and against
the planner's arithmetic:
  - each parameter's shards, concatenated over the tensor-parallel ranks along the dimension the plan
    names, have the plain parameter's shape, and each replicated parameter is whole on every rank;
  - every plain parameter is built by exactly one stage (a tied output layer: a copy on the last stage);
  - each rank's parameter count equals `pretrain.plan.counts.rank_parameters`, so the counts sum over
    the ranks to the model's (padded) size plus the replicated norms and the tied copy.
Data-parallel ranks build the same layers as their data-parallel rank 0 and are not repeated.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from pretrain.config import Config
from pretrain.model.names import layer_name
from pretrain.model.transformer import build_layer, num_layers
from pretrain.parallel.parallelize import build_rank_layers, parallelize_model
from pretrain.parallel.topology import ParallelContext
from pretrain.parallel.tp_plan import partition_dim
from pretrain.plan.counts import rank_parameters

META = torch.device("meta")


@dataclass
class ConstructionProof:
    ranks: int = 0  # (stage, tensor-parallel rank) pairs built
    rank_parameters: dict[tuple[int, int], int] = field(default_factory=dict)  # (stage, tp rank) -> count
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total(self) -> int:
        """Parameters built over one data-parallel replica (every stage and tensor-parallel rank)."""
        return sum(self.rank_parameters.values())


def meta_context(cfg: Config, stage: int, tp_rank: int) -> ParallelContext:
    """The place of one rank in the layout, with no process groups (nothing is communicated while
    layers are built)."""
    par = cfg.parallel
    return ParallelContext(
        tp=par.tp,
        pp=par.pp,
        dp=1,
        tp_rank=tp_rank,
        pp_rank=stage,
        dp_rank=0,
        sequence_parallel=par.sequence_parallel and par.tp > 1,
    )


def build_rank_on_meta(cfg: Config, stage: int, tp_rank: int) -> dict[str, torch.Size]:
    """Shapes of the parameters this rank builds, by their name in the plain model (unique tensors)."""
    ctx = meta_context(cfg, stage, tp_rank)
    with torch.device("meta"):
        if cfg.parallel.pp == 1:
            model = parallelize_model(cfg, ctx, META)
            return {name: p.shape for name, p in model.named_parameters()}
        layers = build_rank_layers(cfg, ctx, META)
    return {
        f"{layer_name(cfg.model, index)}.{name}": p.shape
        for index, layer in layers.items()
        for name, p in layer.named_parameters()
    }


def plain_shapes(cfg: Config) -> dict[str, torch.Size]:
    """Every parameter of the plain (one-process) layer list, with the layout's padded vocabulary."""
    shapes = {}
    with torch.device("meta"):
        for index in range(num_layers(cfg.model)):
            layer: nn.Module = build_layer(cfg.model, index, cfg.padded_vocab_size, cfg.seed)
            for name, p in layer.named_parameters():
                shapes[f"{layer_name(cfg.model, index)}.{name}"] = p.shape
    if cfg.model.tie_embeddings and cfg.parallel.pp == 1:
        del shapes["head.weight"]  # the embedding's matrix
    return shapes


def prove_construction(cfg: Config) -> ConstructionProof:
    """Build every (stage, tensor-parallel rank) of `cfg`'s layout on the meta device and check it."""
    par, proof = cfg.parallel, ConstructionProof()
    expected = rank_parameters(cfg)
    shards: dict[str, dict[int, torch.Size]] = defaultdict(dict)  # name -> tp rank -> shape
    stages_of: dict[str, set[int]] = defaultdict(set)
    for stage in range(par.pp):
        for tp_rank in range(par.tp):
            built = build_rank_on_meta(cfg, stage, tp_rank)
            count = sum(shape.numel() for shape in built.values())
            proof.rank_parameters[(stage, tp_rank)] = count
            proof.ranks += 1
            if count != expected[stage]:
                proof.problems.append(
                    f"stage {stage} tp rank {tp_rank}: built {count:,} parameters, planner counts "
                    f"{expected[stage]:,}"
                )
            for name, shape in built.items():
                shards[name][tp_rank] = shape
                stages_of[name].add(stage)
    _check_shards(cfg, plain_shapes(cfg), shards, stages_of, proof)
    return proof


def _check_shards(
    cfg: Config,
    plain: dict[str, torch.Size],
    shards: dict[str, dict[int, torch.Size]],
    stages_of: dict[str, set[int]],
    proof: ConstructionProof,
) -> None:
    tp = cfg.parallel.tp
    if set(shards) != set(plain):
        missing, extra = sorted(set(plain) - set(shards)), sorted(set(shards) - set(plain))
        proof.problems.append(
            f"built parameters differ from the plain model: missing {missing}, extra {extra}"
        )
    for name in sorted(set(plain) & set(shards)):
        if len(stages_of[name]) != 1:
            proof.problems.append(f"{name} is built by stages {sorted(stages_of[name])}, not one")
        if set(shards[name]) != set(range(tp)):
            proof.problems.append(f"{name} is built on tensor-parallel ranks {sorted(shards[name])}")
            continue
        dim = partition_dim(name)
        pieces = [shards[name][r] for r in range(tp)]
        if dim is None:
            joined = pieces[0] if all(p == pieces[0] for p in pieces) else None
        else:
            rest = {tuple(p[:dim]) + tuple(p[dim + 1 :]) for p in pieces}
            joined = None
            if len(rest) == 1:
                sizes = list(pieces[0])
                sizes[dim] = sum(p[dim] for p in pieces)
                joined = torch.Size(sizes)
        if joined != plain[name]:
            proof.problems.append(
                f"{name}: shards {[tuple(p) for p in pieces]} do not make {tuple(plain[name])}"
            )
