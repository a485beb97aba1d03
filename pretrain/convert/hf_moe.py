"""The Hugging Face classes beyond Llama: which one computes a model exactly, its `config.json`, and
the tensor names of a mixture of experts (one of our stacked expert tensors is one Hub tensor per
expert).

    dense, qk_norm=false                         LlamaForCausalLM    (pretrain.convert.hf)
    dense, qk_norm=true                          Qwen3ForCausalLM
    softmax, no shared experts, qk_norm=true     Qwen3MoeForCausalLM (mlp_only_layers = the dense blocks)
    softmax, no shared experts, qk_norm=false,
      no dense blocks, normalize_top_k=true      MixtralForCausalLM
    softmax, qk_norm=false, otherwise            Qwen2MoeForCausalLM (zero q/k/v biases; a zero shared-expert
                                                 gate, sigmoid 0 = 1/2, and the shared down_proj doubled)
    sigmoid (shared experts or not)              Glm4MoeForCausalLM  (DeepSeek-V3's router and MoE block)

Anything else is refused with the feature no class computes (docs/CONVERT.md, "Mixture of experts").
The per-expert names (`model.layers.N.mlp.experts.E.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.E.w1.weight`) are what the Hub's checkpoints hold, what vLLM reads, and
what transformers 5 itself saves; its loader fuses them into its 3-D expert parameters.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pretrain.config import ModelConfig
from pretrain.config.moe import MoEConfig
from pretrain.convert.hf import to_hf_name
from pretrain.errors import ConversionError

REFUSED = (
    "no Hugging Face class computes this mixture-of-experts model exactly; nothing was written "
    "(`python -m pretrain.convert to-fp32` consolidates it into this framework's own weights)"
)
# DeepSeek-V3's own class, and the others built on multi-head latent attention.
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2", "glm4_moe_lite")
MLA_REASON = (
    "it uses multi-head latent attention (MLA: queries and keys/values through low-rank projections, an "
    "RMSNorm on the key/value latent, a rotary key shared by all heads, interleaved rotary), which our "
    "grouped-query attention cannot be written as exactly; its MoE block is the one Glm4MoeForCausalLM "
    "computes, so a sigmoid-routed model of ours exports there (docs/CONVERT.md, 'Mixture of experts')"
)


@dataclass(frozen=True)
class Family:
    """A transformers class our model maps onto, and how its MoE tensors are named on the Hub."""

    architecture: str
    model_type: str
    moe_module: str = "mlp"
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # our gate, up, down
    router_bias: bool = False  # the router's e_score_correction_bias (our expert_bias)
    shared: bool = False  # has shared experts (one SwiGLU of their summed width), even of width 0
    shared_name: str = "shared_experts"
    # Qwen2-MoE: the shared expert's output times sigmoid(gate x); written with a zero gate (sigmoid 0
    # = 1/2 exactly) and the shared down_proj doubled (exact: a power of 2), so it computes ours.
    shared_gate: bool = False
    qkv_bias: bool = False  # q/k/v biases, written as zeros


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "llama"),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", "qwen3_moe"),
    "mixtral": Family("MixtralForCausalLM", "mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
    "glm4_moe": Family("Glm4MoeForCausalLM", "glm4_moe", router_bias=True, shared=True),
    "qwen2_moe": Family(
        "Qwen2MoeForCausalLM",
        "qwen2_moe",
        shared=True,
        shared_name="shared_expert",
        shared_gate=True,
        qkv_bias=True,
    ),
}
_OUR_EXPERTS = ("gate_proj", "up_proj", "down_proj")
_MOE_NAME = re.compile(r"blocks\.(\d+)\.mlp\.(router|experts|shared)\.(.+)")
_QKV = re.compile(r"blocks\.\d+\.attn\.[qkv]_proj\.weight")

# (Hub name, shape, what of our tensor it holds: None the whole, an int that expert, "zeros" nothing
# (a tensor of zeros the class needs, e.g. a bias), "double" the whole times 2)
Entry = tuple[str, tuple[int, ...], "int | str | None"]


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        raise ConversionError(f"{what}:\n" + "\n".join(f"  - {p}" for p in problems))


def export_family(cfg: ModelConfig, expert_bias_moves: bool = False) -> Family:
    """The class that computes `cfg` exactly, or a ConversionError naming every feature none does.
    `expert_bias_moves`: the run trained the auxiliary-loss-free bias (bias_update_rate > 0)."""
    moe = cfg.moe
    if not moe.enabled:
        return FAMILIES["qwen3" if cfg.qk_norm else "llama"]
    if moe.score_func == "sigmoid":
        if moe.num_experts < 2:
            _refuse(
                ["Glm4MoeForCausalLM ranks expert groups by their top-2 scores: it needs at least 2 "
                 "experts (model.moe.num_experts is 1)"], REFUSED,
            )  # fmt: skip
        return FAMILIES["glm4_moe"]
    problems = softmax_problems(moe, expert_bias_moves)
    if cfg.qk_norm and moe.num_shared_experts:
        problems.append(
            f"softmax routing with shared experts (model.moe.num_shared_experts={moe.num_shared_experts}) and "
            "qk_norm: Qwen3-MoE has QK-norm but no shared experts, Qwen2-MoE shared experts but no QK-norm; "
            "with model.qk_norm=false it exports as Qwen2MoeForCausalLM, with sigmoid routing "
            "(model.moe.score_func=sigmoid) as Glm4MoeForCausalLM"
        )
    _refuse(problems, REFUSED)
    if cfg.qk_norm:
        return FAMILIES["qwen3_moe"]
    mixtral = not moe.num_shared_experts and not moe.first_dense_layers and moe.normalize_top_k
    return FAMILIES["mixtral" if mixtral else "qwen2_moe"]


def softmax_problems(moe: MoEConfig, expert_bias_moves: bool = False) -> list[str]:
    """What of a softmax-routed MoE no softmax-routed class (Qwen3-MoE, Qwen2-MoE, Mixtral) computes."""
    problems = []
    if moe.route_scale != 1:
        problems.append(
            f"softmax routing with model.moe.route_scale={moe.route_scale}: Qwen3-MoE, Qwen2-MoE and Mixtral do "
            "not scale the routing weights (Glm4MoeForCausalLM's routed_scaling_factor does, with sigmoid routing)"
        )
    if expert_bias_moves:
        problems.append(nonzero_bias_problem())
    return problems


def nonzero_bias_problem() -> str:
    return (
        "softmax routing with a trained expert_bias (auxiliary-loss-free balancing, "
        "model.moe.bias_update_rate > 0): the bias changes which experts are chosen and Qwen3-MoE, "
        "Qwen2-MoE and Mixtral have no such bias; sigmoid routing exports it as Glm4MoeForCausalLM's "
        "e_score_correction_bias"
    )


def family_config(family: Family, cfg: ModelConfig) -> dict[str, Any]:
    """The class-specific fields of config.json (the common ones: pretrain.convert.hf.hf_config)."""
    fields: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type}
    moe = cfg.moe
    if family.model_type in ("qwen3", "qwen3_moe", "qwen2_moe"):
        fields.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if family.model_type == "qwen2_moe":
        fields.update(
            qkv_bias=True, shared_expert_intermediate_size=moe.num_shared_experts * cfg.expert_ffn_size
        )
    if family.model_type in ("qwen3_moe", "qwen2_moe"):
        fields.update(
            num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=cfg.expert_ffn_size,
            decoder_sparse_step=1, mlp_only_layers=list(range(moe.first_dense_layers)),
            norm_topk_prob=moe.normalize_top_k, router_aux_loss_coef=moe.aux_loss_coeff, output_router_logits=False,
        )  # fmt: skip
    elif family.model_type == "mixtral":
        fields.update(
            intermediate_size=cfg.expert_ffn_size, num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
            sliding_window=None, router_jitter_noise=0.0, router_aux_loss_coef=moe.aux_loss_coeff,
            output_router_logits=False,
        )  # fmt: skip
    elif family.model_type == "glm4_moe":
        fields.update(
            n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=cfg.expert_ffn_size,
            n_shared_experts=moe.num_shared_experts, first_k_dense_replace=moe.first_dense_layers,
            norm_topk_prob=moe.normalize_top_k, routed_scaling_factor=moe.route_scale, n_group=1, topk_group=1,
            use_qk_norm=cfg.qk_norm, num_nextn_predict_layers=0, output_router_logits=False,
        )  # fmt: skip
        fields["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": 1.0,
        }
        fields["partial_rotary_factor"] = 1.0
    return fields


def hf_entries(
    family: Family,
    cfg: ModelConfig,
    name: str,
    shape: tuple[int, ...],
    rename: Callable[[str], str] = to_hf_name,
) -> list[Entry]:
    """The Hub tensors one of our tensors becomes (none: a router bias the class does not have);
    `rename` names the tensors that are the same in every class."""
    match = _MOE_NAME.fullmatch(name)
    if not match:
        bias = [(rename(name).removesuffix("weight") + "bias", shape[:1], "zeros")]
        return [(rename(name), shape, None), *(bias if family.qkv_bias and _QKV.fullmatch(name) else [])]
    block, kind, rest = match.groups()
    prefix = f"model.layers.{block}.{family.moe_module}"
    if kind == "router" and rest == "weight":
        return [(f"{prefix}.gate.weight", shape, None), *_shared_extras(family, cfg, prefix)]
    if kind == "router":  # expert_bias
        return [(f"{prefix}.gate.e_score_correction_bias", shape, None)] if family.router_bias else []
    if kind == "experts":
        hf = family.experts[_OUR_EXPERTS.index(rest)]
        return [(f"{prefix}.experts.{e}.{hf}.weight", shape[1:], e) for e in range(shape[0])]
    doubled = family.shared_gate and rest == "down_proj.weight"
    return [(f"{prefix}.{family.shared_name}.{rest}", shape, "double" if doubled else None)]


def _shared_extras(family: Family, cfg: ModelConfig, prefix: str) -> list[Entry]:
    """Zero tensors of the shared expert a class always has: width-0 weights where ours has none
    (what transformers saves), Qwen2-MoE's gate."""
    hidden, extras = cfg.hidden_size, list[Entry]()
    if family.shared and not cfg.moe.num_shared_experts:
        for proj, empty in (("gate_proj", (0, hidden)), ("up_proj", (0, hidden)), ("down_proj", (hidden, 0))):
            extras.append((f"{prefix}.{family.shared_name}.{proj}.weight", empty, "zeros"))
    if family.shared_gate:
        extras.append((f"{prefix}.shared_expert_gate.weight", (1, hidden), "zeros"))
    return extras


def family_of_hf(config: dict[str, Any], problems: list[str]) -> Family | None:
    """The family a Hugging Face config.json belongs to (None, with the reason in `problems`)."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    for family in FAMILIES.values():
        if model_type == family.model_type or family.architecture in architectures:
            return family
    if model_type in MLA_MODEL_TYPES:
        problems.append(f"model_type {model_type!r} does not convert: {MLA_REASON}")
    else:
        known = ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())
        problems.append(
            f"model_type is {model_type!r} (architectures {architectures}); these convert: {known}"
        )
    return None


def moe_fields_from_hf(family: Family, config: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Our ModelConfig fields (qk_norm, ffn_hidden_size, moe) of a Hugging Face family's config."""
    layers = int(config.get("num_hidden_layers") or 0)
    if family.model_type == "llama":
        return {}
    if family.model_type == "qwen3":
        _no_sliding_window(config, problems)
        return {"qk_norm": True}
    if family.model_type == "mixtral":
        if config.get("sliding_window") is not None:
            problems.append(
                f"sliding_window is {config['sliding_window']}; our attention is full causal attention"
            )
        moe = MoEConfig(
            num_experts=config.get("num_local_experts", 8), top_k=config.get("num_experts_per_tok", 2)
        )
        return {"qk_norm": False, "moe": moe, "ffn_hidden_size": config.get("intermediate_size")}
    if family.model_type == "qwen3_moe":
        _no_sliding_window(config, problems)
        return {"qk_norm": True, "moe": _qwen3_moe(config, layers, problems)}
    if family.model_type == "qwen2_moe":
        _no_sliding_window(config, problems)
        return {"qk_norm": False, "moe": _qwen2_moe(config, layers, problems)}
    return _glm4_moe(config, layers, problems)


def _num_experts(config: dict[str, Any]) -> int:
    """Routed experts, under any of the names the classes use (transformers 5 saves Qwen3-MoE's
    num_experts as num_local_experts)."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return 0


def _no_sliding_window(config: dict[str, Any], problems: list[str]) -> None:
    if config.get("use_sliding_window"):
        problems.append("use_sliding_window is true; our attention is full causal attention")


def _qwen3_moe(config: dict[str, Any], layers: int, problems: list[str]) -> MoEConfig:
    step, only = int(config.get("decoder_sparse_step", 1) or 1), set(config.get("mlp_only_layers") or [])
    dense = [i for i in range(layers) if i in only or (i + 1) % step]
    if dense != list(range(len(dense))) or len(dense) >= layers:
        problems.append(
            f"the dense blocks (mlp_only_layers {sorted(only)}, decoder_sparse_step {step}) are {dense}; ours are "
            "the first model.moe.first_dense_layers blocks, with at least one MoE block after them"
        )
    return MoEConfig(
        num_experts=_num_experts(config), top_k=config.get("num_experts_per_tok", 1),
        expert_ffn_hidden_size=config.get("moe_intermediate_size"), first_dense_layers=len(dense),
        normalize_top_k=bool(config.get("norm_topk_prob", False)),
    )  # fmt: skip


def _qwen2_moe(config: dict[str, Any], layers: int, problems: list[str]) -> MoEConfig:
    """Qwen3-MoE's fields, and shared experts: one of shared_expert_intermediate_size (its gate and
    biases are checked to be zero with the tensors)."""
    moe = _qwen3_moe(config, layers, problems)
    shared, width = int(config.get("shared_expert_intermediate_size", 0)), moe.expert_ffn_hidden_size or 1
    if shared % width:
        problems.append(
            f"shared_expert_intermediate_size {shared} is not a multiple of moe_intermediate_size {width}: our "
            "shared experts are num_shared_experts x the expert width"
        )
    return dataclasses.replace(moe, num_shared_experts=shared // width)


def _glm4_moe(config: dict[str, Any], layers: int, problems: list[str]) -> dict[str, Any]:
    groups, kept = config.get("n_group", 1), config.get("topk_group", 1)
    if groups != kept:
        problems.append(
            f"group-limited routing (n_group {groups}, topk_group {kept}): our router picks the top k of all "
            "experts, which is n_group == topk_group"
        )
    rope = config.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
    if partial != 1.0:
        problems.append(
            f"partial_rotary_factor is {partial} (GLM-4.5 rotates half of each head); our rotary embedding "
            "rotates the whole head (1.0)"
        )
    first = int(config.get("first_k_dense_replace", 1))
    if first >= layers:
        problems.append(f"first_k_dense_replace {first} leaves no MoE block of {layers}")
    moe = MoEConfig(
        num_experts=_num_experts(config), top_k=config.get("num_experts_per_tok", 1),
        expert_ffn_hidden_size=config.get("moe_intermediate_size"), num_shared_experts=config.get("n_shared_experts", 0),
        first_dense_layers=first, score_func="sigmoid", normalize_top_k=bool(config.get("norm_topk_prob", True)),
        route_scale=float(config.get("routed_scaling_factor", 1.0)),
    )  # fmt: skip
    return {"qk_norm": bool(config.get("use_qk_norm", False)), "moe": moe}


__all__ = ["FAMILIES", "MLA_REASON", "Family", "export_family", "family_config", "family_of_hf", "hf_entries"]
