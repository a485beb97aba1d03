"""Mixture-of-experts conversion: the small MoE trained in every expert layout (one process, EP2,
EP2 x ZeRO-2, EP2 x TP2, EP2 x PP2), exported to Qwen3MoeForCausalLM and Glm4MoeForCausalLM and
checked against `transformers`; tiny MoE models made by transformers imported and trained from at
EP2; every variant no class computes refused with its reason. transformers is the reference."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO
from moe_convert_runs import LAYOUTS, VARIANTS, VOCAB, first_batch, random_consolidated, save_hf_moe_model
from pretrain.config import ModelConfig, load_config
from pretrain.config.moe import MoEConfig
from pretrain.convert import commands
from pretrain.convert.hf_moe import export_family
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


def read_folder(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return out


CLASSES = {
    "qwen3-moe": "Qwen3MoeForCausalLM",
    "glm4-moe": "Glm4MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2-moe": "Qwen2MoeForCausalLM",
}
# The variants trained in a few layouts only (each in every layout would add a minute).
SOME_LAYOUTS = {"mixtral": ("one", "ep2-tp2"), "qwen2-moe": ("one", "ep2"), "glm4-moe": tuple(LAYOUTS)}
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


def run_cli(*args):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "pretrain.convert", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@SLOW
def test_command_line_verify_of_a_damaged_moe_export_exits_1_naming_the_block(trained, tmp_path):
    run_dir = trained("glm4-moe", "ep2-zero2-bf16")
    done = run_cli("to-hf", "--checkpoint", run_dir, "--output", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert "class: Glm4MoeForCausalLM" in done.stdout and "verification passed" in done.stdout
    assert "not DeepseekV3ForCausalLM, whose multi-head latent attention ours is not" in done.stdout
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    a, b = (f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in (2, 3))
    weights[a], weights[b] = weights[b], weights[a]
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    checked = run_cli("verify", "--checkpoint", run_dir, "--hf", tmp_path / "hf")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "first layer that differs: blocks.1" in checked.stdout
    assert "mixture-of-experts block" in checked.stdout


# --- from Hugging Face -----------------------------------------------------------------------------

HF_KINDS = ["qwen3_moe", "qwen2_moe", "mixtral", "glm4_moe"]


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hugging_face_moe_to_ours_to_hugging_face_is_bitwise(kind, tmp_path):
    """A model made by transformers imports; exported again (verified: our model computes what
    transformers does), its files hold the same tensors to the bit under the same names."""
    save_hf_moe_model(kind, tmp_path / "hf")
    report = commands.from_hf(tmp_path / "hf", tmp_path / "init")
    assert "model.moe.num_experts=4" in report.notes[0] and "checkpoint.init_weights=" in report.notes[0]
    back = commands.to_hf(tmp_path / "init", tmp_path / "back")
    assert back.verification.passed and back.verification.generated_equal, back.verification.summary()
    before, after = read_folder(tmp_path / "hf"), read_folder(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    ours = dict(ConsolidatedWeights(tmp_path / "init").items())
    if kind == "glm4_moe":
        assert torch.equal(
            ours["blocks.1.mlp.router.expert_bias"], before["model.layers.1.mlp.gate.e_score_correction_bias"]
        )
    assert ours["blocks.1.mlp.router.expert_bias"].any() == (kind == "glm4_moe")


@pytest.mark.parametrize("kind", HF_KINDS)
def test_a_folder_with_fused_3d_experts_imports_the_same_weights(kind, tmp_path):
    """transformers 5's in-memory layout (experts.gate_up_proj, experts.down_proj; Mixtral's router as
    mlp.gate), saved as is: the same consolidated weights as the Hub's per-expert names give."""
    model = save_hf_moe_model(kind, tmp_path / "hub")
    fused = tmp_path / "fused"
    model.config.save_pretrained(fused)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    commands.from_hf(tmp_path / "hub", tmp_path / "a")
    commands.from_hf(fused, tmp_path / "b")
    a, b = (
        dict(ConsolidatedWeights(tmp_path / "a").items()),
        dict(ConsolidatedWeights(tmp_path / "b").items()),
    )
    assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)


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


# --- refusals ------------------------------------------------------------------------------------


def small_moe(**changes):
    moe = {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 24, **changes.pop("moe", {})}
    return ModelConfig(
        vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
        moe=MoEConfig(**moe), **changes,
    )  # fmt: skip


REFUSED = {
    "softmax-shared-qk-norm": (
        {"qk_norm": True, "moe": {"num_shared_experts": 1}},
        ["softmax routing with shared experts (model.moe.num_shared_experts=1) and qk_norm",
         "Qwen3-MoE has QK-norm but no shared experts, Qwen2-MoE shared experts but no QK-norm",
         "model.qk_norm=false it exports as Qwen2MoeForCausalLM", "score_func=sigmoid", "Glm4MoeForCausalLM"],
    ),
    "softmax-route-scale": ({"qk_norm": True, "moe": {"route_scale": 2.0}}, ["route_scale=2.0"]),
    "sigmoid-one-expert": ({"moe": {"score_func": "sigmoid", "num_experts": 1, "top_k": 1}}, ["at least 2 experts"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_variants_no_class_computes_are_refused_with_the_reason(case, tmp_path):
    changes, reasons = REFUSED[case]
    weights = random_consolidated(tmp_path / "w.safetensors", small_moe(**changes))
    with pytest.raises(ConversionError) as error:
        commands.to_hf(weights, tmp_path / "hf")
    message = str(error.value)
    assert "no Hugging Face class computes this mixture-of-experts model exactly" in message
    for reason in reasons:
        assert reason in message, reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # nothing written


@pytest.mark.parametrize(
    ("moe", "architecture"),
    [({}, "MixtralForCausalLM"), ({"normalize_top_k": False}, "Qwen2MoeForCausalLM"),
     ({"first_dense_layers": 1, "num_shared_experts": 2}, "Qwen2MoeForCausalLM")],
)  # fmt: skip
def test_softmax_routing_without_qk_norm_is_mixtral_where_it_fits_else_qwen2_moe(moe, architecture, tmp_path):
    weights = random_consolidated(tmp_path / "w.safetensors", small_moe(moe=moe))
    report = commands.to_hf(weights, tmp_path / "hf", dtype="bf16")
    assert report.verification.passed and report.verification.generated_equal
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]


def test_softmax_routing_with_a_trained_bias_is_refused(tmp_path):
    """A nonzero expert_bias (consolidated weights carry no config) is found while streaming; a run
    configured with bias_update_rate is refused up front."""
    weights = random_consolidated(tmp_path / "w.safetensors", small_moe(qk_norm=True), expert_bias=0.05)
    with pytest.raises(
        ConversionError, match=r"blocks.0.mlp.router.expert_bias is not zero.*selection|chosen"
    ):
        commands.to_hf(weights, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    with pytest.raises(ConversionError, match="bias_update_rate > 0"):
        export_family(small_moe(qk_norm=True), expert_bias_moves=True)


def test_a_capacity_model_exports_verified_as_dropless(tmp_path):
    cfg = small_moe(qk_norm=True, moe={"dropless": False, "capacity_factor": 1.0})
    report = commands.to_hf(random_consolidated(tmp_path / "w.safetensors", cfg), tmp_path / "hf")
    assert report.verification.passed
    assert any(
        "dropless=false: the Hugging Face class is dropless (no capacity)" in note for note in report.notes
    )


@pytest.mark.parametrize(
    ("qk_norm", "architecture"), [(True, "Qwen3ForCausalLM"), (False, "LlamaForCausalLM")]
)
def test_dense_models_with_wide_heads_and_qk_norm_export_and_import(qk_norm, architecture, tmp_path):
    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=48, head_dim=16, qk_norm=qk_norm)  # fmt: skip
    weights = random_consolidated(tmp_path / "w.safetensors", cfg)
    report = commands.to_hf(weights, tmp_path / "hf", dtype="fp32")
    assert report.verification.passed and report.verification.generated_equal
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["head_dim"] == 16
    assert config["attention_bias"] is False
    back = commands.from_hf(tmp_path / "hf", tmp_path / "init")
    assert "model.head_dim=16" in back.notes[0] and ("model.qk_norm=true" in back.notes[0]) == qk_norm
    before, after = (
        dict(ConsolidatedWeights(weights).items()),
        dict(ConsolidatedWeights(tmp_path / "init").items()),
    )
    assert sorted(before) == sorted(after) and all(torch.equal(after[n], t) for n, t in before.items())


def test_deepseek_v3_is_refused_with_the_mla_reason(tmp_path):
    import transformers

    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16,
    )  # fmt: skip
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError) as error:
        commands.from_hf(tmp_path / "hf", tmp_path / "init")
    message = str(error.value)
    assert "model_type 'deepseek_v3' does not convert" in message and "multi-head latent attention" in message
    assert "Glm4MoeForCausalLM" in message and not (tmp_path / "init").exists()


def test_from_hf_refuses_every_unmappable_moe_feature_at_once(tmp_path):
    save_hf_moe_model("glm4_moe", tmp_path / "glm")
    config_file = tmp_path / "glm" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(n_group=2, topk_group=1, attention_bias=True)
    config["rope_parameters"]["partial_rotary_factor"] = 0.5
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConversionError) as error:
        commands.from_hf(tmp_path / "glm", tmp_path / "init")
    message = str(error.value)
    for reason in ("group-limited routing (n_group 2, topk_group 1)", "partial_rotary_factor is 0.5",
                   "attention_bias is true"):  # fmt: skip
        assert reason in message, reason

    save_hf_moe_model("qwen3_moe", tmp_path / "qwen")
    config_file = tmp_path / "qwen" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(mlp_only_layers=[1], use_sliding_window=True)
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConversionError) as error:
        commands.from_hf(tmp_path / "qwen", tmp_path / "init")
    message = str(error.value)
    assert "the dense blocks (mlp_only_layers [1], decoder_sparse_step 1) are [1]" in message
    assert "use_sliding_window is true" in message and not (tmp_path / "init").exists()

    save_hf_moe_model("qwen2_moe", tmp_path / "qwen2")
    weights = load_file(tmp_path / "qwen2" / "model.safetensors")
    weights["model.layers.1.mlp.shared_expert_gate.weight"] += 0.1
    weights["model.layers.0.self_attn.k_proj.bias"] += 0.1
    save_file(weights, tmp_path / "qwen2" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError) as error:
        commands.from_hf(tmp_path / "qwen2", tmp_path / "init")
    message = str(error.value)
    assert "tensor model.layers.0.self_attn.k_proj.bias is not zero: our attention has no biases" in message
    assert (
        "model.layers.1.mlp.shared_expert_gate.weight is not zero: Qwen2-MoE's learned shared-expert gate"
        in message
    )

    save_hf_moe_model("mixtral", tmp_path / "mixtral")
    config_file = tmp_path / "mixtral" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "sliding_window": 32}))
    with pytest.raises(ConversionError, match="sliding_window is 32; our attention is full causal"):
        commands.from_hf(tmp_path / "mixtral", tmp_path / "init")
    config_file.write_text(json.dumps(config))
    weights = load_file(tmp_path / "mixtral" / "model.safetensors")
    del weights["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(weights, tmp_path / "mixtral" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ConversionError, match=r"tensor model.layers.1.block_sparse_moe.experts.3.w2.weight is missing"
    ):
        commands.from_hf(tmp_path / "mixtral", tmp_path / "init")
