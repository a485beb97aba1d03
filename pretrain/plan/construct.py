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
Data-parallel ranks build the same layers as their data-parallel rank 0 and are not repeated, but for
the routed experts of a mixture of experts, which `parallel.ep` data-parallel ranks split: each
(stage, tensor-parallel rank) is built whole as expert-parallel rank 0, and every expert-parallel rank's
slice of every MoE block is built by the trainer's `ExpertParallelExperts` (on the meta device, and once
more on a stand-in whose experts are numbered, so the experts each rank takes are seen, not computed):
  - each expert tensor has the same shape on every tensor-parallel rank;
  - the slices, concatenated over the EP ranks in rank order, have the plain stacked shape (experts,
    out, in), and the numbered stand-in shows rank r holding experts [r E/ep, (r+1) E/ep), so together
    they are the plain tensor, each expert once and in order;
  - each EP rank's experts on a stage number `pretrain.plan.counts.rank_expert_parameters`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from pretrain.config import Config
from pretrain.model.moe import RoutedExperts
from pretrain.model.names import layer_name
from pretrain.model.transformer import build_layer, num_layers
from pretrain.parallel.expert_parallel import ExpertParallelExperts
from pretrain.parallel.parallelize import build_rank_layers, parallelize_model
from pretrain.parallel.topology import ParallelContext
from pretrain.parallel.tp_plan import partition_dim
from pretrain.plan.counts import rank_expert_parameters, rank_parameters, stage_layers
from pretrain.plan.experts import block_kinds

META = torch.device("meta")


@dataclass
class ConstructionProof:
    ranks: int = 0  # (stage, tensor-parallel rank) pairs built
    expert_ranks: int = 0  # expert-parallel ranks whose expert slices were built (1 without MoE)
    rank_parameters: dict[tuple[int, int], int] = field(default_factory=dict)  # (stage, tp rank) -> count
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total(self) -> int:
        """Parameters built over one data-parallel replica (every stage and tensor-parallel rank)."""
        return sum(self.rank_parameters.values())


def meta_context(cfg: Config, stage: int, tp_rank: int, ep_rank: int = 0) -> ParallelContext:
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
        ep=par.ep,
        ep_rank=ep_rank,
    )


def build_rank_on_meta(cfg: Config, stage: int, tp_rank: int, ep_rank: int = 0) -> dict[str, torch.Size]:
    """Shapes of the parameters this rank builds, by their name in the plain model (unique tensors)."""
    ctx = meta_context(cfg, stage, tp_rank, ep_rank)
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


def plain_shapes(cfg: Config) -> tuple[dict[str, torch.Size], set[str]]:
    """Every parameter of the plain (one-process) layer list, with the layout's padded vocabulary, and
    the names of the routed experts' (the parameters of each block's `RoutedExperts`)."""
    shapes, routed = {}, set()
    with torch.device("meta"):
        for index in range(num_layers(cfg.model)):
            layer: nn.Module = build_layer(cfg.model, index, cfg.padded_vocab_size, cfg.seed)
            for module_name, module in layer.named_modules():
                if isinstance(module, RoutedExperts):
                    prefix = f"{layer_name(cfg.model, index)}.{module_name}"
                    routed |= {f"{prefix}.{name}" for name, _ in module.named_parameters()}
            for name, p in layer.named_parameters():
                shapes[f"{layer_name(cfg.model, index)}.{name}"] = p.shape
    if cfg.model.tie_embeddings and cfg.parallel.pp == 1:
        del shapes["head.weight"]  # the embedding's matrix
    return shapes, routed


def expert_slices(cfg: Config, ep_rank: int) -> tuple[list[int], dict[str, torch.Size]]:
    """What the trainer's `ExpertParallelExperts` keeps on expert-parallel rank `ep_rank`: the experts
    it takes from a numbered stand-in (expert e's weights hold e), and the shapes of its slices of
    the real experts (`{gate,up,down}_proj`), built on the meta device."""
    m = cfg.model
    numbered = RoutedExperts(m.moe.num_experts, 1, 1)
    with torch.no_grad():
        for param in numbered.parameters():
            param.copy_(torch.arange(m.moe.num_experts, dtype=param.dtype).view(-1, 1, 1))
    held = ExpertParallelExperts(numbered, cfg.parallel.ep, ep_rank, None)
    taken = [int(v) for v in held.gate_proj.detach().flatten()]
    with torch.device("meta"):
        full = RoutedExperts(m.moe.num_experts, m.hidden_size, m.expert_ffn_size)
        sliced = ExpertParallelExperts(full, cfg.parallel.ep, ep_rank, None)
    return taken, {name: p.shape for name, p in sliced.named_parameters()}


def prove_construction(cfg: Config) -> ConstructionProof:
    """Build every (stage, tensor-parallel rank) of `cfg`'s layout on the meta device and check it."""
    par, proof = cfg.parallel, ConstructionProof()
    expected = rank_parameters(cfg)
    plain, routed = plain_shapes(cfg)
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
    _check_shards(cfg, plain, routed, shards, stages_of, proof)
    if routed:
        _check_expert_slices(cfg, plain, routed, proof)
    return proof


def _check_expert_slices(
    cfg: Config, plain: dict[str, torch.Size], routed: set[str], proof: ConstructionProof
) -> None:
    """Every expert-parallel rank's slices against the plain stacked experts and the planner's counts
    (see the module docstring)."""
    ep, experts = cfg.parallel.ep, cfg.model.moe.num_experts
    slices = [expert_slices(cfg, r) for r in range(ep)]
    proof.expert_ranks = ep
    order = [e for taken, _ in slices for e in taken]
    if order != list(range(experts)):
        proof.problems.append(f"EP ranks 0..{ep - 1} hold experts {order}, not 0..{experts - 1} once each")
    for name in sorted(routed):
        pieces = [shapes[name.rsplit(".", 1)[1]] for _, shapes in slices]
        joined = torch.Size([sum(p[0] for p in pieces), *pieces[0][1:]])
        if any(p[1:] != pieces[0][1:] for p in pieces) or joined != plain[name]:
            proof.problems.append(
                f"{name}: EP slices {[tuple(p) for p in pieces]} do not make {tuple(plain[name])}"
            )
    expected = rank_expert_parameters(cfg)
    for stage, indices in enumerate(stage_layers(cfg)):
        moe_blocks = block_kinds(cfg, indices)[1]
        for r, (_, shapes) in enumerate(slices):
            held = moe_blocks * sum(shape.numel() for shape in shapes.values())
            if held != expected[stage]:
                proof.problems.append(
                    f"stage {stage} EP rank {r}: holds {held:,} expert parameters, planner counts {expected[stage]:,}"
                )


def _ep_slice(shape: torch.Size, ep: int) -> torch.Size:
    """A routed expert tensor's shape on one expert-parallel rank: E / ep of its experts."""
    return torch.Size([shape[0] // ep, *shape[1:]])


def _check_shards(
    cfg: Config,
    plain: dict[str, torch.Size],
    routed: set[str],
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
        # Routed experts: whole on every tensor-parallel rank, EP rank 0's slice of the experts.
        target = _ep_slice(plain[name], cfg.parallel.ep) if name in routed else plain[name]
        if joined != target:
            proof.problems.append(f"{name}: shards {[tuple(p) for p in pieces]} do not make {tuple(target)}")
