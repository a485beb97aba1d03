"""pretrain.plan against published tables, hand calculations and the code it models.

Sources: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (Table 1; the parameter count of section 5.1, P = 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h)),
and the FLOP count of section 5.1); Rajbhandari et al. 2020, "ZeRO" (section 3.1: 2 + 2 + K bytes per
parameter, K = 12 for mixed-precision Adam); the parameter counts Hugging Face reports for the Llama 2
checkpoints; DeepSpeed's own defaults and pipeline schedule.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import Config, ModelConfig, load_config
from pretrain.model.flops import flops_per_token
from pretrain.plan import GPUS, make_cluster, plan_layout
from pretrain.plan.activations import ActivationShape, block_bytes
from pretrain.plan.counts import layer_counts, parameter_count, rank_parameters
from pretrain.plan.hardware import Assumptions
from pretrain.plan.memory import CPU, estimate_memory, in_flight, pipe_buffers, zero_bytes_per_parameter
from pretrain.plan.performance import HOST_OPS_PER_BLOCK

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Table 1: (published parameters in billions, attention heads, hidden size, layers); vocabulary 51,200,
# sequence length 2048.
MEGATRON_TABLE_1 = [
    (1.7, 24, 2304, 24),
    (3.6, 32, 3072, 30),
    (7.5, 32, 4096, 36),
    (18.4, 48, 6144, 40),
    (39.1, 64, 8192, 48),
    (76.1, 80, 10240, 60),
    (145.6, 96, 12288, 80),
    (310.1, 128, 16384, 96),
    (529.6, 128, 20480, 105),
    (1008.0, 160, 25600, 128),
]
VOCAB, SEQ = 51200, 2048


def gpt_shaped(heads: int, hidden: int, layers: int) -> tuple[Config, int]:
    """Our (Llama-style) model in the GPT model's shape: tied embeddings, and a SwiGLU whose three
    matrices (3 h f) come as close as an integer f allows to GPT's two 4h-wide ones (8 h^2)."""
    ffn = round(8 * hidden / 3)
    model = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        ffn_hidden_size=ffn,
        tie_embeddings=True,
    )
    return Config(model=model), ffn


def gpt_only_parameters(hidden: int, layers: int, ffn: int) -> int:
    """What GPT has and our block does not, per the architectures: per layer the biases of q/k/v (3h),
    of the output projection (h), of the two MLP matrices (4h + h), LayerNorm biases (2 x h; both
    models have the 2 x h norm weights), the rest of a 4h MLP over our SwiGLU (8 h^2 - 3 h f); learned
    positions (s h); the final LayerNorm's bias (h)."""
    per_layer = 3 * hidden + hidden + 5 * hidden + 2 * hidden + (8 * hidden * hidden - 3 * hidden * ffn)
    return layers * per_layer + SEQ * hidden + hidden


@pytest.mark.parametrize(("published", "heads", "hidden", "layers"), MEGATRON_TABLE_1)
def test_megatron_table_1_parameter_counts(published, heads, hidden, layers):
    cfg, ffn = gpt_shaped(heads, hidden, layers)
    ours = parameter_count(cfg)  # built on the meta device
    gpt = ours + gpt_only_parameters(hidden, layers, ffn)
    # The paper's own formula (which leaves out the final LayerNorm, 2h) agrees to within that.
    formula = 12 * layers * hidden**2 * (1 + 13 / (12 * hidden) + (VOCAB + SEQ) / (12 * layers * hidden))
    assert abs(gpt - 2 * hidden - formula) < 1e-9 * formula
    # Table 1 prints billions to one decimal: within 1%, or within that rounding for the small models
    # (1.7 stands for 1.652).
    assert abs(gpt / 1e9 - published) <= max(0.01 * published, 0.05)


@pytest.mark.parametrize(("published", "heads", "hidden", "layers"), MEGATRON_TABLE_1)
def test_flops_per_token_match_megatron_formula(published, heads, hidden, layers):
    # Section 5.1: F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) per iteration with full recomputation,
    # i.e. 4 passes over the blocks and 3 over the output layer. Without recomputation per token:
    # 3/4 of the block part, 6 V h for the output layer.
    cfg, ffn = gpt_shaped(heads, hidden, layers)
    blocks = 3 / 4 * 96 * layers * hidden**2 * (1 + SEQ / (6 * hidden))
    megatron = blocks + 6 * VOCAB * hidden
    ours = flops_per_token(cfg.model, SEQ) + 6 * layers * (8 * hidden**2 - 3 * hidden * ffn)
    assert ours == pytest.approx(megatron, rel=1e-12)


@pytest.mark.parametrize(
    ("preset", "published"),
    [
        ("7b", 6_738_415_616),  # meta-llama/Llama-2-7b-hf
        ("13b", 13_015_864_320),  # meta-llama/Llama-2-13b-hf
        ("70b", 68_976_648_192),  # meta-llama/Llama-2-70b-hf
    ],
)
def test_llama_presets_have_the_published_parameter_counts(preset, published):
    assert parameter_count(load_config(CONFIGS / f"{preset}.yaml")) == published


@pytest.mark.parametrize("dp", [1, 8, 64])
@pytest.mark.parametrize(
    ("stage", "paper"),
    [
        (0, lambda nd: 16),
        (1, lambda nd: 4 + 12 / nd),
        (2, lambda nd: 2 + 14 / nd),
        (3, lambda nd: 16 / nd),
    ],
)
def test_zero_paper_bytes_per_parameter(stage, paper, dp):
    assert zero_bytes_per_parameter(stage, dp, "bf16").total == pytest.approx(paper(dp))


@pytest.mark.parametrize("accumulate", ["bf16", "fp32"])
def test_zero_bytes_per_parameter_in_the_memory_estimate(accumulate):
    # One pipeline stage of 4 ranks, ZeRO-2, bf16: weights 2, gradients 2/4 (the ZeRO paper) or, with
    # the gradient partition accumulated in fp32, 4/4; optimizer 12/4 per parameter.
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["parallel.zero_stage=2", "train.precision=bf16", f"train.grad_accum_dtype={accumulate}"],
        world_size=4,
    )
    stage = estimate_memory(cfg, 4, capacity=2**40).stages[0]
    params = rank_parameters(cfg)[0]
    gradients = params // 2 if accumulate == "bf16" else params
    assert (stage.weights, stage.gradients, stage.optimizer_states) == (2 * params, gradients, 3 * params)


def test_bf16_zero1_with_fp32_accumulation_counts_deepspeeds_whole_fp32_gradient_buffer():
    # DeepSpeed then runs its BF16_Optimizer: an fp32 accumulator of every gradient of the stage on
    # every rank, beside the bf16 gradients (2 + 4 bytes per parameter, not partitioned).
    cfg = load_config(CONFIGS / "tiny.yaml", ["parallel.zero_stage=1", "train.precision=bf16"], world_size=4)
    stage = estimate_memory(cfg, 4, capacity=2**40).stages[0]
    assert stage.gradients == 6 * rank_parameters(cfg)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("kv_heads", "head_dim", "qk_norm"), [(4, None, False), (2, None, False), (2, 48, True)]
)
def test_block_activation_bytes_equal_what_autograd_saves(dtype, kv_heads, head_dim, qk_norm):
    """The 'none' formula against the bytes autograd keeps for a real decoder block on this CPU
    (every saved tensor's storage once; the weights and the shared rotary tables are not activations),
    also with heads wider than hidden / heads and Qwen3's per-head query/key norms."""
    from pretrain.model.layers import DecoderBlock, rotary_tables

    model = ModelConfig(
        hidden_size=128,
        num_heads=4,
        num_kv_heads=kv_heads,
        ffn_hidden_size=352,
        head_dim=head_dim,
        qk_norm=qk_norm,
    )
    cfg = Config(model=model)
    cfg.train.micro_batch_size, cfg.train.seq_len = 2, 64
    block = DecoderBlock(cfg.model).to(dtype)
    x = torch.randn(2, 64, 128, dtype=dtype, requires_grad=True)
    tables = rotary_tables(model.head_size, 64, cfg.model.rope_theta, x.device)  # cached: the block's own
    excluded = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *tables)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    shape = ActivationShape.of(cfg, dtype_bytes=x.element_size(), attention_output_saved=False)
    # The formula leaves out one small tensor: each norm's 1 / rms, fp32, one number per position.
    rms = 2 * 4 * shape.tokens
    assert sum(saved.values()) - rms == block_bytes(shape, "none")


def test_host_op_counts_are_those_of_a_real_block():
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.model.layers import DecoderBlock, rotary_tables
    from pretrain.parallel.recompute import apply_activation_checkpointing

    # The counts include building the rotary table once (the first mode); another test that ran a
    # block of the same shape before would have cached it.
    rotary_tables.cache_clear()

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    for mode, expected in HOST_OPS_PER_BLOCK.items():
        block = DecoderBlock(ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=64))
        apply_activation_checkpointing(block, mode)
        x = torch.randn(1, 8, 32, requires_grad=True)
        Count.n = 0
        with Count():
            block(x).sum().backward()
        assert Count.n == expected, mode


def test_gpu_peaks_are_the_trainers():
    from pretrain.train.mfu import _PEAK_TFLOPS

    for gpu, key in [("a100-40gb", "A100"), ("a100-80gb", "A100"), ("h100-80gb", "H100"), ("h200", "H200")]:
        (row,) = [r for r in _PEAK_TFLOPS if r[0] == key]
        assert (GPUS[gpu].peak_tflops_bf16, GPUS[gpu].peak_tflops_fp32) == row[1:]


def test_reduce_bucket_is_deepspeeds_default():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert DeepSpeedZeroConfig().reduce_bucket_size == Assumptions().reduce_bucket_elements


@pytest.mark.parametrize(("pp", "micro_batches"), [(4, 32), (8, 3), (2, 1)])
def test_in_flight_micro_batches_follow_deepspeeds_1f1b_schedule(pp, micro_batches):
    """Run DeepSpeed's own schedule for every stage and count forward passes not yet matched by their
    backward pass: the activations a stage holds at once."""
    from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, TrainSchedule

    for stage in range(pp):
        schedule = TrainSchedule(micro_batches=micro_batches, stages=pp, stage_id=stage)
        outstanding = most = 0
        for step in schedule.steps():
            for instruction in step:
                outstanding += isinstance(instruction, ForwardPass) - isinstance(instruction, BackwardPass)
                most = max(most, outstanding)
        assert in_flight(pp, stage, micro_batches) == most
        assert pipe_buffers(pp, stage, micro_batches) == schedule.num_pipe_buffers()


def test_pipeline_bubble_and_in_flight_by_hand():
    cfg = load_config(CONFIGS / "70b.yaml")  # tp 2 x pp 16 over 256 GPUs: dp 8, accumulation 1024 / 8 = 128
    plan = plan_layout(cfg, make_cluster(32, 8, "h100-80gb"))
    assert plan.step.bubble_fraction == pytest.approx(15 / (128 + 15))
    assert [s.in_flight for s in plan.memory.stages] == list(range(16, 0, -1))
    assert plan.step.step_s == pytest.approx(
        (128 + 15) * plan.step.micro_batch_s
        + plan.step.pipeline_p2p_s
        + plan.step.data_parallel_s
        + plan.step.optimizer_s
    )


def test_compute_time_by_hand():
    # One GPU, no parallelism: the step is 16 micro-batches of matmuls at peak x efficiency (the GPU,
    # not the host, is the bottleneck for this shape), plus elementwise work and the optimizer.
    cfg = load_config(
        CONFIGS / "7b.yaml",
        ["parallel.zero_stage=1", "parallel.pp=1", "train.global_batch_size=16", "train.micro_batch_size=1"],
        world_size=1,
    )
    plan = plan_layout(cfg, make_cluster(1, 1, "h100-80gb"))
    flops = flops_per_token(cfg.model, 4096) * 16 * 4096
    assert plan.step.compute_s == pytest.approx(flops / (989.4e12 * 0.70))
    assert not plan.step.host_bound
    assert plan.step.tensor_parallel_s == plan.step.data_parallel_s == plan.step.bubble_s == 0
    assert plan.step.mfu == pytest.approx(flops / plan.step.step_s / 989.4e12)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # DeepSpeed's BF16_Optimizer (ZeRO-1 with fp32 sums): an all-reduce of the fp32 gradients after
        # the backward pass, then the bf16 weights all-gathered.
        (["parallel.zero_stage=1"], lambda ring, mb, backward: ring(4, 2) + ring(2, 1)),
        # ZeRO-1's own optimizer (bf16 sums): one bf16 reduce-scatter overlapping the last backward pass.
        (
            ["parallel.zero_stage=1", "train.grad_accum_dtype=bf16"],
            lambda ring, mb, backward: max(0.0, ring(2, 1) - backward) + ring(2, 1),
        ),
        # ZeRO-2 reduce-scatters every micro-batch's gradients (fp32), each overlapping its backward.
        (
            ["parallel.zero_stage=2"],
            lambda ring, mb, backward: mb * max(0.0, ring(4, 1) - backward) + ring(2, 1),
        ),
    ],
)
def test_data_parallel_traffic_as_deepspeed_moves_it(overrides, expected):
    cluster = make_cluster(4, 8, "h100-80gb")
    cfg = load_config(CONFIGS / "7b.yaml", ["parallel.pp=1", *overrides], world_size=32)
    step = plan_layout(cfg, cluster).step
    params = rank_parameters(cfg)[0]

    def ring(nbytes: int, passes: int) -> float:  # a ring collective of `nbytes` per parameter over 32 ranks
        bandwidth = cluster.group_bandwidth_gbps(32) * 1e9
        return cluster.group_latency_s(32) + passes * 31 / 32 * nbytes * params / bandwidth

    assert step.data_parallel_s == pytest.approx(expected(ring, 32, step.micro_batch_s * 2 / 3))


def test_fits_is_decided_against_the_gpus_memory():
    cfg = load_config(CONFIGS / "7b.yaml", world_size=32)
    needed = plan_layout(cfg, make_cluster(4, 8, "h100-80gb")).memory.required
    for capacity, fits in [(needed, True), (needed - 1, False)]:
        gpu = dataclasses.replace(GPUS["h100-80gb"], memory_bytes=capacity)
        assert plan_layout(cfg, make_cluster(4, 8, gpu)).fits is fits


def test_zero3_construction_is_the_partitions_plus_one_whole_layer():
    # pretrain.parallel.zero3 partitions each layer as soon as it is built: 70B with ZeRO-3 over 256
    # GPUs holds 2 bytes per parameter / 256 plus one whole fp32 decoder block (3.4 GB): 4 GB, where
    # building the whole model first needed 4 bytes per parameter of it (276 GB).
    cfg = load_config(CONFIGS / "70b.yaml", ["parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=3"], 256)
    plan = plan_layout(cfg, make_cluster(32, 8, "h100-80gb"))
    largest = max(c.total for c in layer_counts(cfg))
    construction = plan.memory.worst.construction
    assert construction == int(2 * rank_parameters(cfg)[0] / 256 + 4 * largest)
    assert construction < 4 * rank_parameters(cfg)[0] / 50
    assert plan.memory.worst.peak_phase != "construction"


def test_cpu_runtime_does_not_count_untouched_buckets():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.precision=fp32"], world_size=1)
    gpu, cpu = estimate_memory(cfg, 1, 2**40).worst, estimate_memory(cfg, 1, 2**40, CPU).worst
    assert gpu.communication_buffers == 2 * 500_000_000 * 4 and cpu.communication_buffers == 0


# ----- the command line


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_plan(capsys, monkeypatch):
    """`python -m pretrain.plan ARGS` in this process (the start-up of a new one is tested once)."""
    from pretrain.plan.__main__ import main

    monkeypatch.chdir(REPO)

    def run(*args: str) -> Result:
        code = main(list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def test_cli_1t_on_3072_h100s():
    command = ["--config", "configs/1t.yaml", "--nodes", "384", "--gpus-per-node", "8", "--gpu", "h100-80gb"]
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.plan", *command],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # By hand: per block 4 h^2 (q, k, v, o) + 3 h f (SwiGLU, f = 68352) + 2 h (norms) = 7,870,924,800;
    # x 128 = 1,007,478,374,400; + the tied embedding 51,200 x 25,600 + the final norm 25,600.
    assert "1,008,789,120,000 parameters" in result.stdout
    assert "data-parallel 6 x tensor-parallel 8 x pipeline-parallel 64, ZeRO-1" in result.stdout
    assert "\nFITS: " in result.stdout and "MFU" in result.stdout


def test_cli_json_has_the_parameter_count_and_fits(run_plan):
    result = run_plan("--config", "configs/1t.yaml", "--nodes", "384", "--json", "parallel.pp=64")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["parameters"] == 1_008_789_120_000 and out["fits"] is True
    assert out["layout"]["dp"] == 6 and len(out["memory"]["stages"]) == 64
    worst = max(out["memory"]["stages"], key=lambda s: s["peak"])
    assert out["memory"]["peak_bytes"] == worst["peak"]
    assert out["memory"]["required_bytes"] <= out["memory"]["capacity_bytes"]


def test_cli_search_70b_ranks_fitting_layouts(run_plan):
    result = run_plan(
        "--config", "configs/70b.yaml", "--nodes", "32", "--gpus-per-node", "8", "--search", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (
        out["parameters"] == 68_976_648_192
        and out["fits"]
        and out["fitting"] <= out["valid"] <= out["evaluated"]
    )
    ranked = out["ranked"]
    assert len(ranked) == 10
    speeds = [r["performance"]["tokens_per_s"] for r in ranked]
    assert all(later <= earlier * 1.01 for earlier, later in itertools.pairwise(speeds))
    for r in ranked:
        lay = r["layout"]
        assert r["fits"] and lay["tp"] * lay["pp"] * lay["dp"] == 256
        assert lay["micro_batch_size"] * lay["grad_accum_steps"] * lay["dp"] == 1024
        assert not (lay["pp"] > 1 and lay["zero_stage"] > 1)  # DeepSpeed's pipeline: ZeRO 0-1 only
    # The best layout, given back as overrides, plans to the same numbers.
    again = run_plan("--config", "configs/70b.yaml", "--nodes", "32", "--json", *ranked[0]["overrides"])
    assert json.loads(again.stdout)["performance"] == ranked[0]["performance"]


def test_cli_impossible_layout_reports_the_config_error(run_plan):
    result = run_plan("--config", "configs/70b.yaml", "--nodes", "32", "parallel.tp=3")
    assert result.returncode == 2
    assert "must be divisible by parallel.tp (3)" in result.stderr
    result = run_plan("--config", "configs/70b.yaml", "--nodes", "32", "parallel.zero_stage=3")
    assert result.returncode == 2 and "cannot be combined with pipeline parallelism" in result.stderr
    result = run_plan("--config", "configs/70b.yaml", "--nodes", "32", "parallel.tpp=2")
    assert result.returncode == 2 and "did you mean 'parallel.tp'?" in result.stderr


def test_planner_refuses_what_the_engine_refuses_once_auto_is_bf16(run_plan):
    # The presets say train.precision=auto: the config check cannot know it is bf16, the engine
    # (pretrain/parallel/engine.py) checks again on the GPU and refuses ZeRO-0 under a pipeline with
    # fp32 accumulation; the planner, which plans for a GPU, must refuse it too, in --search as well.
    result = run_plan("--config", "configs/70b.yaml", "--nodes", "32", "parallel.zero_stage=0")
    assert result.returncode == 2 and "needs parallel.zero_stage=1" in result.stderr
    result = run_plan("--config", "configs/70b.yaml", "--nodes", "32", "--search", "--json", "--top", "100")
    ranked = json.loads(result.stdout)["ranked"]
    assert ranked and all(r["layout"]["pp"] == 1 or r["layout"]["zero_stage"] == 1 for r in ranked)
    bf16 = run_plan(
        "--config",
        "configs/70b.yaml",
        "--nodes",
        "32",
        "parallel.zero_stage=0",
        "train.grad_accum_dtype=bf16",
    )
    assert bf16.returncode in (0, 1), bf16.stderr


def test_cli_does_not_fit_exits_1(run_plan):
    result = run_plan(
        "--config", "configs/70b.yaml", "--nodes", "32", "parallel.activation_checkpointing=none"
    )
    assert result.returncode == 1, result.stdout
    assert "DOES NOT FIT" in result.stdout


def preset_clusters() -> list[tuple[str, int, int, str]]:
    """(preset, nodes, GPUs per node, GPU) from each preset's '# cluster: N nodes x G gpu' line."""
    rows = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        for line in path.read_text().splitlines():
            if line.startswith("# cluster: "):
                nodes, _, _, per_node, gpu = line.removeprefix("# cluster: ").split()
                rows.append((path.name, int(nodes), int(per_node), gpu))
    return rows


def test_every_large_preset_states_its_cluster():
    names = {row[0] for row in preset_clusters()}
    expected = {f"{n}.yaml" for n in ("125m", "350m", "1.3b", "7b", "13b", "70b", "175b", "530b", "1t")}
    assert expected <= names


@pytest.mark.parametrize(("preset", "nodes", "per_node", "gpu"), preset_clusters())
def test_preset_fits_its_stated_cluster(preset, nodes, per_node, gpu):
    cfg = load_config(CONFIGS / preset, world_size=nodes * per_node)  # the trainer's validation
    plan = plan_layout(cfg, make_cluster(nodes, per_node, gpu))
    assert plan.fits, (preset, plan.memory.required / 2**30)
    assert math.isfinite(plan.step.tokens_per_s) and 0 < plan.step.mfu < 1
