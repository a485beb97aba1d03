"""Tensor-parallel layers against their plain counterparts, run on every rank of a gloo group
(importable by the processes `run_distributed` spawns). Each function returns the largest
differences it saw, so the test can assert them and print them when they are too large."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.model import build_layer
from pretrain.model.transformer import IGNORE_INDEX
from pretrain.parallel.tensor_parallel import VocabParallelCausalLMLoss
from pretrain.parallel.topology import ParallelContext
from pretrain.parallel.tp_plan import apply_tensor_parallel, partition_dim

# The layouts the 3D-parallelism issue names: name -> (processes, layout overrides, model overrides
# shared with the single-process reference). tests/test_parallel_layouts.py adds more.
ISSUE_LAYOUTS: dict[str, tuple[int, list[str], list[str]]] = {
    "tp2": (2, ["parallel.tp=2"], []),
    "pp2": (2, ["parallel.pp=2"], []),
    "tp2-pp2": (4, ["parallel.tp=2", "parallel.pp=2"], []),
    "dp2-pp2": (4, ["parallel.pp=2"], []),
    "dp2-tp2-zero1": (4, ["parallel.tp=2", "parallel.zero_stage=1"], []),
    "tied-pp2": (2, ["parallel.pp=2"], ["model.tie_embeddings=true"]),
    # 321 rows: 161 on each TP rank, the last one padding that must never be predicted.
    "vocab321-tp2": (2, ["parallel.tp=2"], ["model.vocab_size=321", "model.vocab_pad_multiple=1"]),
}

MODEL = ModelConfig(
    vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48
)


def _context(sequence_parallel: bool) -> ParallelContext:
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(world)))
    return ParallelContext(world, 1, 1, rank, 0, 0, sequence_parallel, tp_group=group)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _shard_of(full: torch.Tensor, name: str, ctx: ParallelContext) -> torch.Tensor:
    dim = partition_dim(name)
    if dim is None:
        return full
    size = full.shape[dim] // ctx.tp
    return full.narrow(dim, ctx.tp_rank * size, size)


def vocab_parallel_loss(padded_vocab: int) -> dict[str, float]:
    """Loss and logit gradients from vocabulary shards vs F.cross_entropy on the whole real vocabulary.
    Padded columns hold large random values: if they leaked into the softmax the loss would move."""
    ctx = _context(False)
    gen = torch.Generator().manual_seed(0)
    vocab = MODEL.vocab_size
    full = torch.randn(3, 7, padded_vocab, generator=gen) * 4
    full[..., vocab:] = 50.0  # would dominate the softmax if not masked
    labels = torch.randint(0, vocab, (3, 7), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    reference_logits = full[..., :vocab].clone().requires_grad_(True)
    reference = F.cross_entropy(
        reference_logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    reference.backward()

    rows = padded_vocab // ctx.tp
    local = full[..., ctx.tp_rank * rows : (ctx.tp_rank + 1) * rows].clone().requires_grad_(True)
    loss_fn = VocabParallelCausalLMLoss(vocab, ctx.tp_rank * rows, ctx.tp_group)
    loss = loss_fn(local, labels)
    loss.backward()
    expected_grad = torch.zeros(3, 7, padded_vocab)
    expected_grad[..., :vocab] = reference_logits.grad
    expected_local = expected_grad[..., ctx.tp_rank * rows : (ctx.tp_rank + 1) * rows]
    gathered = loss_fn.logits(local.detach())
    return {
        "loss": abs(loss.item() - reference.item()),
        "grad": _max_diff(local.grad, expected_local),
        "logits": _max_diff(gathered, full[..., :vocab]),
        "logits_shape_ok": float(gathered.shape == (3, 7, vocab)),
    }


# Qwen3-style attention: heads wider than hidden / heads (12 against 8) and a norm over each head's
# query and key, whose replicated weight sees only this rank's heads.
QK_NORM_MODEL = dataclasses.replace(MODEL, head_dim=12, qk_norm=True)


def layer_parity(index: int, sequence_parallel: bool, model: ModelConfig = MODEL) -> dict[str, Any]:
    """Layer `index` of the list, whole vs tensor-parallel: output, input gradient, and every
    parameter's gradient against the matching shard of the whole layer's (R5.2)."""
    ctx = _context(sequence_parallel)
    padded = model.padded_vocab_size(ctx.tp)
    whole = build_layer(model, index, padded, seed=11)
    parallel = apply_tensor_parallel(build_layer(model, index, padded, seed=11), _name(index), ctx)
    gen = torch.Generator().manual_seed(5)
    seq = 8
    if index == 0:
        inputs = torch.randint(0, model.vocab_size, (2, seq), generator=gen)
        local_in = inputs
    else:
        inputs = torch.randn(2, seq, model.hidden_size, generator=gen).requires_grad_(True)
        local_in = _seq_slice(inputs, ctx).detach().requires_grad_(True)
    out = whole(inputs)
    local_out = parallel(local_in)

    # The whole layer's output as the parallel one holds it: sliced by sequence where the layer
    # leaves a sequence-parallel region, by vocabulary for the output layer.
    def as_held(x: torch.Tensor) -> torch.Tensor:
        if index == model.num_layers + 2:
            rows = padded // ctx.tp
            return x[..., ctx.tp_rank * rows : (ctx.tp_rank + 1) * rows]
        return _seq_slice(x, ctx)

    upstream = torch.randn(out.shape, generator=gen)
    out.backward(upstream)
    local_out.backward(as_held(upstream))
    expected = as_held(out)
    result: dict[str, Any] = {"output": _max_diff(local_out, expected)}
    if index != 0:
        result["input_grad"] = _max_diff(local_in.grad, _seq_slice(inputs.grad, ctx))
    whole_params = dict(whole.named_parameters())
    for name, param in parallel.named_parameters():
        full_name = f"{_name(index)}.{name}"
        result[f"grad {full_name}"] = _max_diff(
            param.grad, _shard_of(whole_params[name].grad, full_name, ctx)
        )
        result[f"value {full_name}"] = _max_diff(
            param.data, _shard_of(whole_params[name].data, full_name, ctx)
        )
    return result


def _seq_slice(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    if not ctx.sequence_parallel:
        return x
    size = x.shape[1] // ctx.tp
    return x[:, ctx.tp_rank * size : (ctx.tp_rank + 1) * size]


def _name(index: int) -> str:
    if index == 0:
        return "embedding"
    if index <= MODEL.num_layers:
        return f"blocks.{index - 1}"
    return "norm" if index == MODEL.num_layers + 1 else "head"


def zero_partitioning(overrides: list[str], run_dir: str) -> dict[str, Any]:
    """Build the real trainer and report how DeepSpeed's ZeRO optimizer split its state: over how
    many ranks, and whether those are this rank's data-parallel group."""
    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer
    from training_runs import REPO, SMALL

    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [*SMALL, *overrides, f"run.dir={run_dir}"], dist.get_world_size()
    )
    trainer = build_trainer(cfg, init_distributed())
    optimizer = trainer.engine.ds.optimizer
    grid = trainer.engine.ctx.grid
    return {
        "partition_count": list(optimizer.partition_count),
        "dp_group_ranks": sorted(dist.get_process_group_ranks(optimizer.dp_process_group)),
        "expected_dp_ranks": sorted(grid.get_data_parallel_group_ranks()),
    }


def replica_check_after_drift(
    overrides: list[str], run_dir: str, drift_rank: int, param: str, drift_step: int = 3
) -> list[dict]:
    """Train 4 steps checking replicas every 2; after step `drift_step` (before that step's check)
    nudge the replicated parameter `param` on `drift_rank` only. Returns rank 0's replica records."""
    import json
    from pathlib import Path

    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer
    from pretrain.train.callbacks import Callback
    from training_runs import REPO, SMALL

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*SMALL, *overrides, "train.steps=4", "parallel.check_replicas_interval=2", f"run.dir={run_dir}"],
        dist.get_world_size(),
    )
    trainer = build_trainer(cfg, init_distributed())

    class Drift(Callback):
        def on_step_end(self, trainer: Any) -> None:
            if trainer.state.step == drift_step and dist.get_rank() == drift_rank:
                with torch.no_grad():
                    trainer.engine.module.get_parameter(param)[0] += 1e-3

    trainer.callbacks.insert(0, Drift())
    trainer.fit()
    if dist.get_rank() != 0:
        return []
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "replica_divergence" in r]


def replicas_before_and_after_a_nudge(nudged_rank: int) -> dict[str, Any]:
    """check_replicas over the data-parallel world on a model built alike on every rank, then again
    after one element of the final norm moved by 1e-6 on `nudged_rank` only; and where the
    fingerprints were sent from (the group's backend decides)."""
    from pretrain.model import Transformer
    from pretrain.parallel.distributed import collective_device
    from pretrain.parallel.replicas import check_replicas

    world = dist.get_world_size()
    ctx = ParallelContext(1, 1, world, 0, 0, dist.get_rank(), False)
    model = Transformer(MODEL, seed=0)
    before = check_replicas(model, ctx)
    if dist.get_rank() == nudged_rank:
        with torch.no_grad():
            model.norm.weight[3] += 1e-6
    return {
        "before": before,
        "after": check_replicas(model, ctx),
        "device": str(collective_device(ctx.dp_group)),
    }
