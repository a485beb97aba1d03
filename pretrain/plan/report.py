"""The planner's output: a plain-text report for people, the same numbers as JSON for programs."""

from __future__ import annotations

import dataclasses
from typing import Any

from pretrain.parallel.topology import describe_layout
from pretrain.plan.hardware import Cluster, GiB
from pretrain.plan.planner import Plan, plan_layout
from pretrain.plan.search import SearchResult


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:8.2f}"


def _describe_layout(plan: Plan) -> str:
    lay = plan.layout()
    sp = ", sequence parallel" if lay["sequence_parallel"] else ""
    return (
        f"{describe_layout(lay['dp'], lay['tp'], lay['pp'], lay['zero_stage'], ep=lay['ep'])}, "
        f"micro-batch {lay['micro_batch_size']} x accumulation "
        f"{lay['grad_accum_steps']}, recomputation {lay['activation_checkpointing']}{sp}, {lay['precision']}"
    )


def _gradient_dtypes(plan: Plan) -> str:
    """What the gradient row holds: the model's dtype, and where bf16 gradients are summed in fp32 the
    accumulator beside them (ZeRO 0-1: DeepSpeed's whole fp32 buffer; ZeRO 2-3: the fp32 partition)."""
    precision, accumulate = plan.memory.precision, plan.cfg.train.grad_accum_dtype
    if precision != "bf16" or accumulate == "bf16":
        return precision
    return "bf16 + fp32 accumulator" if plan.cfg.parallel.zero_stage <= 1 else "fp32 partition"


def _memory_lines(plan: Plan) -> list[str]:
    mem, s = plan.memory, plan.memory.worst
    dp, zero, edp = plan.layout()["dp"], plan.cfg.parallel.zero_stage, plan.layout()["expert_data_parallel"]
    by_mode = ", ".join(f"{m} {v / GiB:.2f}" for m, v in s.activations_by_mode.items())
    over = f"{dp} (experts {edp})" if s.expert_parameters else f"{dp}"
    exchange = ", all-to-all buffers" if plan.cfg.parallel.ep > 1 else ""
    rows = [
        (f"weights ({mem.precision})", s.weights),
        (f"gradients ({_gradient_dtypes(plan)})", s.gradients),
        (f"optimizer states (fp32 master + Adam, ZeRO-{zero} over {over})", s.optimizer_states),
        (f"activations ({s.in_flight} micro-batch(es) in flight, {plan.layout()['activation_checkpointing']})", s.activations),
        ("pipeline buffers (1F1B inputs and outputs)", s.pipeline_buffers),
        ("communication buffers (DeepSpeed gradient buckets, ZeRO-3 gathers)", s.communication_buffers),
        (f"backward working memory (loss, recomputed block{exchange})", s.working),
    ]  # fmt: skip
    stage = f"stage {s.stage} of {len(mem.stages)}" if len(mem.stages) > 1 else "one stage"
    held = f", {s.expert_parameters:,} of them routed experts" if s.expert_parameters else ""
    lines = [f"memory per GPU, GiB (worst: {stage}, {s.parameters:,} parameters on the GPU{held})"]
    lines += [f"  {name:<72}{_gib(value)}" for name, value in rows]
    lines.append(f"    activations by recomputation mode: {by_mode}")
    others = ", ".join(f"{name} {v / GiB:.2f}" for name, v in s.phases().items() if name != s.peak_phase)
    lines.append(f"  {'= peak allocated, at the ' + s.peak_phase:<72}{_gib(s.peak)}  ({others})")
    lines.append(f"  {'fragmentation margin':<72}{_gib(mem.fragmentation)}")
    lines.append(f"  {'CUDA context, NCCL and workspaces (runtime reserve)':<72}{_gib(mem.runtime_reserve)}")
    lines.append(f"  {'= required':<72}{_gib(mem.required)}  of {mem.capacity / GiB:.2f}")
    return lines


def _runs(values: list[int]) -> str:
    """[5, 4, 4, 4, 6] -> '5, 4 x 3, 6'."""
    parts: list[list[int]] = []
    for v in values:
        if parts and parts[-1][0] == v:
            parts[-1][1] += 1
        else:
            parts.append([v, 1])
    return ", ".join(str(v) if n == 1 else f"{v} x {n}" for v, n in parts)


def _all_to_all_line(plan: Plan) -> list[str]:
    t, cfg = plan.step, plan.cfg
    if not cfg.model.moe.enabled:
        return []
    ep = cfg.parallel.ep
    if ep == 1:
        return ["all-to-all: none (parallel.ep=1: every rank holds every expert)"]
    fits = "in a node (NVLink)" if ep * cfg.parallel.tp <= plan.cluster.gpus_per_node else "across nodes"
    return [
        f"all-to-all: {t.all_to_all_s:.2f} s per step over {ep} expert-parallel ranks {fits}: "
        f"{t.all_to_all_bytes_per_block / 2**20:,.1f} MiB per exchange per rank, "
        f"{cfg.model.num_moe_blocks} MoE blocks (load imbalance not modelled)"
    ]


def _time_lines(plan: Plan) -> list[str]:
    t, lay = plan.step, plan.layout()
    return [
        f"pipeline: {lay['pp']} stage(s) holding {_runs(lay['pipeline_stage_layers'])} of the "
        f"{sum(lay['pipeline_stage_layers'])} layers (embedding, blocks, norm, output layer), "
        f"{lay['grad_accum_steps']} micro-batches per step, bubble {100 * t.bubble_fraction:.1f}% of the step",
        f"step time {t.step_s:.2f} s = micro-batches {t.compute_s + t.elementwise_s + t.tensor_parallel_s + t.all_to_all_s:.2f} "
        f"(matmul {t.compute_s:.2f}, elementwise {t.elementwise_s:.2f}, tensor-parallel {t.tensor_parallel_s:.2f}"
        f"{f', all-to-all {t.all_to_all_s:.2f}' if plan.cfg.model.moe.enabled else ''}) "
        f"+ bubble {t.bubble_s:.2f} + pipeline sends {t.pipeline_p2p_s:.2f} + data-parallel {t.data_parallel_s:.2f} "
        f"+ optimizer {t.optimizer_s:.2f}",
        f"throughput: {t.tokens_per_s:,.0f} tokens/s, MFU {100 * t.mfu:.1f}% "
        f"({plan.cluster.world_size:,} x {plan.cluster.gpu.peak_tflops(plan.precision):g} TFLOP/s peak)"
        + (
            "; host-bound: eager PyTorch cannot feed the GPU, use larger micro-batches"
            if t.host_bound
            else ""
        ),
        *_all_to_all_line(plan),
    ]


def verdict(plan: Plan) -> str:
    mem = plan.memory
    if plan.fits:
        return (
            f"FITS: {mem.required / GiB:.1f} GiB of {mem.capacity / GiB:.1f} GiB per GPU "
            f"({100 * mem.required / mem.capacity:.0f}%)"
        )
    return (
        f"DOES NOT FIT: stage {mem.worst.stage} needs {mem.required / GiB:.1f} GiB per GPU, "
        f"{mem.capacity / GiB:.1f} GiB available; try --search"
    )


def format_plan(plan: Plan, config_name: str) -> str:
    cfg = plan.cfg
    lines = [
        f"plan: {config_name} on {plan.cluster.describe()}",
        f"model: {plan.parameters:,} parameters (exact, built on the meta device); "
        f"{plan.flops_per_token:,} training FLOPs per token at seq_len {cfg.train.seq_len}",
        f"batch: {cfg.train.global_batch_size:,} sequences x {cfg.train.seq_len:,} tokens = "
        f"{cfg.tokens_per_step:,} tokens per step",
        f"layout: {_describe_layout(plan)}",
        "",
        *_memory_lines(plan),
        "",
        *_time_lines(plan),
        "",
        verdict(plan),
    ]
    return "\n".join(lines)


def format_search(result: SearchResult, config_name: str, cluster: Cluster, top: int) -> str:
    lines = [
        f"search: {config_name} on {cluster.describe()}: {result.evaluated:,} layouts, "
        f"{result.valid:,} accepted by the trainer, {result.fitting:,} fit",
    ]
    if not result.ranked:
        return "\n".join([*lines, "NO LAYOUT FITS: more GPUs, GPUs with more memory, or a smaller batch"])
    header = f"{'rank':>4} {'tp':>3} {'pp':>4} {'dp':>5} {'ep':>4} {'zero':>4} {'micro':>5} {'accum':>6} {'recompute':>9} {'sp':>3} {'GiB/GPU':>8} {'step s':>8} {'tokens/s':>12} {'MFU':>6}"
    lines += ["", header]
    for i, plan in enumerate(result.ranked[:top], 1):
        lay = plan.layout()
        lines.append(
            f"{i:>4} {lay['tp']:>3} {lay['pp']:>4} {lay['dp']:>5} {lay['ep']:>4} {lay['zero_stage']:>4} "
            f"{lay['micro_batch_size']:>5} {lay['grad_accum_steps']:>6} {lay['activation_checkpointing']:>9} "
            f"{'on' if lay['sequence_parallel'] else 'off':>3} {plan.memory.required / GiB:8.1f} "
            f"{plan.step.step_s:8.2f} {plan.step.tokens_per_s:12,.0f} {100 * plan.step.mfu:5.1f}%"
        )
    best = result.ranked[0]
    lines += ["", f"best: {_describe_layout(best)}", f"  overrides: {' '.join(best.overrides())}"]
    return "\n".join(lines)


def plan_json(plan: Plan, config_name: str) -> dict[str, Any]:
    mem = plan.memory
    stages = []
    for s in mem.stages:
        row = dataclasses.asdict(s)
        row.update(phases=s.phases(), peak=s.peak, peak_phase=s.peak_phase)
        stages.append(row)
    return {
        "config": config_name,
        "cluster": cluster_json(plan.cluster),
        "parameters": plan.parameters,
        "flops_per_token": plan.flops_per_token,
        "layout": plan.layout(),
        "overrides": plan.overrides(),
        "fits": plan.fits,
        "memory": {
            "capacity_bytes": mem.capacity,
            "required_bytes": mem.required,
            "peak_bytes": mem.worst.peak,
            "peak_phase": mem.worst.peak_phase,
            "worst_stage": mem.worst.stage,
            "fragmentation_bytes": mem.fragmentation,
            "runtime_reserve_bytes": mem.runtime_reserve,
            "stages": stages,
        },
        "performance": dataclasses.asdict(plan.step),
    }


def cluster_json(cluster: Cluster) -> dict[str, Any]:
    return {
        "nodes": cluster.nodes,
        "gpus_per_node": cluster.gpus_per_node,
        "world_size": cluster.world_size,
        "gpu": dataclasses.asdict(cluster.gpu),
        "intra_node_gbps": cluster.intra_node_gbps,
        "inter_node_gbps": cluster.inter_node_gbps,
        "assumptions": dataclasses.asdict(cluster.assumptions),
    }


def search_json(
    result: SearchResult, config_name: str, cluster: Cluster, top: int, parameters: int
) -> dict[str, Any]:
    return {
        "config": config_name,
        "cluster": cluster_json(cluster),
        "evaluated": result.evaluated,
        "valid": result.valid,
        "fitting": result.fitting,
        "fits": bool(result.ranked),
        "parameters": parameters,
        # Searches keep only the stages that can be the worst; report every stage of the ones shown.
        "ranked": [plan_json(plan_layout(p.cfg, cluster), config_name) for p in result.ranked[:top]],
    }
