"""Mixture-of-experts conversion without training: every variant no transformers class computes is
refused with its reason; the class chosen for each variant computes ours (built-in verification);
tiny MoE models made by transformers convert to ours and back bitwise, from either tensor layout."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_convert_runs import VOCAB, random_consolidated, read_folder, save_hf_moe_model
from pretrain.config import ModelConfig
from pretrain.config.moe import MoEConfig
from pretrain.convert import commands
from pretrain.convert.hf_moe import export_family
from pretrain.errors import ConversionError
from pretrain.weights.consolidated import ConsolidatedWeights

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
