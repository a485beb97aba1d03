"""Mixture-of-experts conversion of real checkpoints: the small MoE trained in every expert layout
(one process, EP2, EP4, EP2 x ZeRO-2 in bf16, EP2 x TP2, EP2 x PP2), exported to
Qwen3MoeForCausalLM and Glm4MoeForCausalLM (Mixtral in one process, Qwen2-MoE in two layouts) and checked
against `transformers`; tiny MoE models made by transformers imported and trained from at EP2.
transformers is the reference. (Refusals and conversions without training: test_convert_moe_units.py.)"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from convert_runs import run_convert_cli
from moe_convert_runs import LAYOUTS, VARIANTS, VOCAB, first_batch, read_folder, save_hf_moe_model
from pretrain.config import load_config
from pretrain.convert import commands
from pretrain.convert.verify import LOGIT_TOLERANCE, build_model
from pretrain.errors import ConversionError
from pretrain.testing import run_distributed
from pretrain.weights.consolidated import ConsolidatedWeights
from training_runs import step_records, train_and_read_metrics

SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(variant, layout) -> the run directory of 3 steps of that variant in that layout (an odd
    count: the sign updates of the router bias cannot all cancel)."""
    cache = {}

    def get(variant, layout):
        if (variant, layout) not in cache:
            processes, overrides = LAYOUTS[layout]
            run_dir = tmp_path_factory.mktemp(f"{variant}-{layout}") / "run"
            run_distributed(
                train_and_read_metrics,
                processes,
                [*VARIANTS[variant], *overrides, "train.steps=3"],
                str(run_dir),
            )
            cache[variant, layout] = run_dir
        return cache[variant, layout]

    return get


CLASSES = {
    "qwen3-moe": "Qwen3MoeForCausalLM",
    "glm4-moe": "Glm4MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2-moe": "Qwen2MoeForCausalLM",
}
# Qwen3-MoE is exported from every layout but EP 4; the other classes differ from it in names and
# routing only, which one process checks, plus the layouts where something else changes: for the
# biased Glm4Moe every layout but TP (EP 4: one expert per rank; bf16 with ZeRO-2: the fp32 router
# bias), EP 2 for Qwen2-MoE's shared expert. Each case trains its own run (~5-9 s).
SOME_LAYOUTS = {
    "mixtral": ("one",),
    "qwen2-moe": ("one", "ep2"),
    "glm4-moe": ("one", "ep2", "ep4", "ep2-zero2-bf16", "ep2-pp2"),
}
CASES = [
    pytest.param(variant, layout, marks=[] if layout == "one" else [SLOW], id=f"{variant}-{layout}")
    for variant in VARIANTS
    for layout in LAYOUTS
    if layout in SOME_LAYOUTS.get(variant, set(LAYOUTS) - {"ep4"})
]


@pytest.mark.parametrize(("variant", "layout"), CASES)
def test_moe_export_computes_what_our_model_computes_in_transformers(variant, layout, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = trained(variant, layout)
    report = commands.to_hf(run_dir, tmp_path / "hf")
    assert report.verification.passed and report.verification.generated_equal, report.verification.summary()
    assert report.verification.max_abs_diff <= LOGIT_TOLERANCE
    assert f"class: {CLASSES[variant]}" in report.notes

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg = load_config(run_dir / "config.yaml").model
    assert config["architectures"] == [CLASSES[variant]] and config["vocab_size"] == VOCAB
    assert config["num_experts_per_tok"] == 2
    if variant == "qwen3-moe":
        assert config["num_experts"] == 4 and config["mlp_only_layers"] == [0] and config["head_dim"] == 32
        assert config["norm_topk_prob"] is True and config["decoder_sparse_step"] == 1
        assert config["moe_intermediate_size"] == 32
    elif variant == "mixtral":
        assert config["num_local_experts"] == 4 and config["intermediate_size"] == 32
        assert config["sliding_window"] is None
    elif variant == "qwen2-moe":
        assert config["num_experts"] == 4 and config["mlp_only_layers"] == [0] and config["qkv_bias"] is True
        assert config["shared_expert_intermediate_size"] == 32 and config["moe_intermediate_size"] == 32
    else:
        assert config["moe_intermediate_size"] == 32
        assert config["n_routed_experts"] == 4 and config["n_shared_experts"] == 1
        assert config["first_k_dense_replace"] == 1 and config["routed_scaling_factor"] == 2.5
        assert config["rope_parameters"]["partial_rotary_factor"] == 1.0 and config["use_qk_norm"] is True

    # The Hub's per-expert names hold our stacked experts' slices, and transformers' loader fuses them
    # into its 3-D parameters with the same numbers; the router bias travels (Glm4Moe) or is zero.
    consolidated = tmp_path / "ours.safetensors"
    commands.to_fp32(run_dir, consolidated)
    ours = dict(ConsolidatedWeights(consolidated).items())
    # bf16 runs export bf16 (auto: the precision trained in), but for the router bias.
    dtype = torch.bfloat16 if "bf16" in layout else torch.float32
    ours = {n: t if n.endswith("expert_bias") else t.to(dtype) for n, t in ours.items()}
    exported = read_folder(tmp_path / "hf")
    moe_block = cfg.num_layers - 1
    gate = ours[f"blocks.{moe_block}.mlp.experts.gate_proj"]
    hub = "block_sparse_moe.experts.{}.w1" if variant == "mixtral" else "mlp.experts.{}.gate_proj"
    for e in range(4):
        assert torch.equal(exported[f"model.layers.{moe_block}.{hub.format(e)}.weight"], gate[e])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    fused = hf.model.layers[moe_block].mlp.experts
    up = ours[f"blocks.{moe_block}.mlp.experts.up_proj"]
    assert torch.equal(fused.gate_up_proj.detach(), torch.cat([gate, up], dim=1).float())
    bias = ours[f"blocks.{moe_block}.mlp.router.expert_bias"]
    if (
        variant == "qwen2-moe"
    ):  # a zero gate (sigmoid 0 = 1/2) on the doubled shared expert, zero q/k/v biases
        shared = f"model.layers.{moe_block}.mlp.shared_expert"
        assert (
            not exported[f"{shared}_gate.weight"].any()
            and not exported["model.layers.0.self_attn.q_proj.bias"].any()
        )
        assert torch.equal(
            exported[f"{shared}.down_proj.weight"],
            2 * ours[f"blocks.{moe_block}.mlp.shared.down_proj.weight"],
        )
    if variant == "glm4-moe":
        assert bias.any()  # moved by bias_update_rate
        assert torch.equal(hf.model.layers[moe_block].mlp.gate.e_score_correction_bias, bias)
        assert exported[f"model.layers.{moe_block}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    else:
        assert not bias.any() and not any("correction_bias" in name for name in exported)

    # Independently of the built-in verification: transformers against our model on other tokens.
    model = build_model(cfg, ours.items())
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=LOGIT_TOLERANCE)


@SLOW
def test_the_trained_router_bias_changes_the_experts_chosen(trained, tmp_path):
    """The Glm4Moe export's e_score_correction_bias matters: without it, transformers routes some
    tokens elsewhere and its logits leave the tolerance (so the match above is not a bias-free one)."""
    from transformers import AutoModelForCausalLM

    commands.to_hf(trained("glm4-moe", "ep2"), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with_bias = hf(tokens).logits
        hf.model.layers[1].mlp.gate.e_score_correction_bias.zero_()
        without = hf(tokens).logits
    assert (with_bias - without).abs().max() > 100 * LOGIT_TOLERANCE


@SLOW
@pytest.mark.parametrize(("variant", "layout"), [("qwen3-moe", "ep2-tp2"), ("glm4-moe", "ep2-pp2")])
def test_moe_ours_to_hf_to_ours_is_bitwise(variant, layout, trained, tmp_path):
    run_dir = trained(variant, layout)
    commands.to_fp32(run_dir, tmp_path / "ours.safetensors")
    commands.to_hf(run_dir, tmp_path / "hf", dtype="fp32", max_shard_size="100KB", verify=False)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # experts over several files
    commands.from_hf(tmp_path / "hf", tmp_path / "back")
    before = dict(ConsolidatedWeights(tmp_path / "ours.safetensors").items())
    after = dict(ConsolidatedWeights(tmp_path / "back").items())
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def swap_experts(entries_of):
    """hf_entries with experts 0 and 1 of every MoE block written under each other's names."""

    def swapped(family, cfg, name, shape, rename):
        entries = entries_of(family, cfg, name, shape, rename)
        if ".mlp.experts." in name:
            (first, shape0, part0), (second, shape1, part1), *rest = entries
            entries = [(first, shape0, part1), (second, shape1, part0), *rest]
        return entries

    return swapped


@SLOW
def test_an_export_with_two_experts_swapped_is_refused_naming_the_moe_block(trained, tmp_path, monkeypatch):
    run_dir = trained("qwen3-moe", "ep2")
    monkeypatch.setattr(commands, "hf_entries", swap_experts(commands.hf_entries))
    with pytest.raises(ConversionError) as error:
        commands.to_hf(run_dir, tmp_path / "hf")
    message = str(error.value)
    assert "verification FAILED" in message
    assert "first layer that differs: blocks.1 (HF model.layers.1)" in message
    assert "in its mixture-of-experts block (HF model.layers.1.mlp" in message
    assert not (tmp_path / "hf").exists() and (tmp_path / "hf.rejected" / "config.json").is_file()


@SLOW
def test_command_line_verify_of_a_damaged_moe_export_exits_1_naming_the_block(trained, tmp_path):
    run_dir = trained("glm4-moe", "ep2-zero2-bf16")
    done = run_convert_cli("to-hf", "--checkpoint", run_dir, "--output", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert "class: Glm4MoeForCausalLM" in done.stdout and "verification passed" in done.stdout
    assert "not DeepseekV3ForCausalLM, whose multi-head latent attention ours is not" in done.stdout
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    a, b = (f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in (2, 3))
    weights[a], weights[b] = weights[b], weights[a]
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    checked = run_convert_cli("verify", "--checkpoint", run_dir, "--hf", tmp_path / "hf")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "first layer that differs: blocks.1" in checked.stdout
    assert "mixture-of-experts block" in checked.stdout


# --- from Hugging Face -----------------------------------------------------------------------------

HF_KINDS = ["qwen3_moe", "qwen2_moe", "mixtral", "glm4_moe"]


@SLOW
@pytest.mark.parametrize("kind", HF_KINDS)
def test_training_from_an_imported_moe_at_ep2_starts_from_its_loss(kind, tmp_path):
    """from-hf, then 2 steps with 2 expert-parallel ranks: step 1's loss is computed before any
    update, so it is the transformers model's loss on that batch."""
    hf = save_hf_moe_model(kind, tmp_path / "hf")
    report = commands.from_hf(tmp_path / "hf", tmp_path / "init")
    overrides = report.notes[0].removeprefix("train from it with: ").split()
    records, _ = run_distributed(
        train_and_read_metrics, 2, [*overrides, "parallel.ep=2", "train.steps=2"], str(tmp_path / "run")
    )
    losses = [r["loss"] for r in step_records(records)]
    cfg = load_config(tmp_path / "run" / "config.yaml")
    inputs, labels = first_batch(cfg)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(hf(inputs).logits.flatten(0, 1), labels.flatten()).item()
    # fp32 both sides; EP2 averages two ranks' losses and sums the experts' outputs in another order.
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[1] < losses[0]


@SLOW
def test_the_tiny_moe_preset_trains_at_ep2_and_exports_verified_from_the_command_line(tmp_path):
    """The user's path: configs/tiny-moe.yaml trained at EP 2 with the launcher's own entry point, then
    `python -m pretrain.convert to-hf`: Glm4MoeForCausalLM, verified (exit 0)."""
    from pretrain.parallel.distributed import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    run_dir = tmp_path / "run"
    train = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
        str(free_port()), "pretrain/main.py", "--config", "configs/tiny-moe.yaml", "parallel.ep=2", "train.steps=2",
        "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=0",
        "checkpoint.interval=0", "logging.tensorboard=false", "logging.plot=false", f"run.dir={run_dir}",
    ]  # fmt: skip
    trained = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    export = [sys.executable, "-m", "pretrain.convert", "to-hf", "--checkpoint", str(run_dir), "--output",
              str(tmp_path / "hf")]  # fmt: skip
    exported = subprocess.run(export, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-3000:]
    assert "verification passed" in exported.stdout + exported.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["n_routed_experts"] == 8
