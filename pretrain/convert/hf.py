"""The Hugging Face Llama side: parameter names and `config.json`, both ways.

Our model is Llama (RMSNorm, half-split rotary, SwiGLU, grouped-query attention, no biases), so the
conversion is a renaming: no permutation of q/k (our rotary already uses Hugging Face's half-split
layout) and no fused QKV to split. Anything a Llama folder may hold that our model cannot compute
(biases, rotary scaling, another activation) is refused with the reason rather than silently
dropped. The other classes (Qwen3, and the mixtures of experts) are in pretrain.convert.hf_moe.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from pretrain.config import ModelConfig
from pretrain.errors import ConversionError

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
_TOP_NAMES = {"embedding": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}
_FROM_HF_BLOCK = {hf: ours for ours, hf in _BLOCK_NAMES.items()}
_FROM_HF_TOP = {hf: ours for ours, hf in _TOP_NAMES.items()}
# Buffers some older Llama exports carry; recomputed by every implementation, never weights.
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def to_hf_name(name: str) -> str:
    module, _, param = name.rpartition(".")
    if module.startswith("blocks."):
        _, index, rest = module.split(".", 2)
        return f"model.layers.{index}.{_BLOCK_NAMES[rest]}.{param}"
    return f"{_TOP_NAMES[module]}.{param}"


def from_hf_name(name: str) -> str | None:
    """Our name for a Hugging Face Llama tensor name; None if it is not one of ours."""
    module, _, param = name.rpartition(".")
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if match:
        rest = _FROM_HF_BLOCK.get(match.group(2))
        return None if rest is None or param != "weight" else f"blocks.{match.group(1)}.{rest}.{param}"
    top = _FROM_HF_TOP.get(module)
    return None if top is None or param != "weight" else f"{top}.{param}"


def hf_config(
    cfg: ModelConfig,
    max_position_embeddings: int,
    dtype: torch.dtype,
    special_tokens: dict[str, int | None],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """A config.json that the class `export_family(cfg)` computes `cfg` with (LlamaForCausalLM for a
    dense model): transformers 4.x reads rope_theta and torch_dtype, 5.x rope_parameters and dtype;
    both pairs are written."""
    from pretrain.convert.hf_moe import export_family, family_config

    family = export_family(cfg)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": special_tokens.get("bos"),
        "eos_token_id": special_tokens.get("eos"),
        "pad_token_id": special_tokens.get("pad"),
        "torch_dtype": DTYPE_NAMES[dtype],
        "dtype": DTYPE_NAMES[dtype],
    }
    if family.model_type == "llama":
        config.update(mlp_bias=False, pretraining_tp=1)
    config.update(family_config(family, cfg))
    config["pretrain_provenance"] = provenance
    return config


def model_config_from_hf(config: dict[str, Any], where: str) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json, or a ConversionError listing every feature of
    it our model does not compute."""
    from pretrain.convert.hf_moe import family_of_hf, moe_fields_from_hf

    problems: list[str] = []
    family = family_of_hf(config, problems)
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        problems.append(f"hidden_act is {config['hidden_act']!r}; our MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key} is true; our model has no biases")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling or rope_type != "default":
        problems.append(
            f"rotary scaling {scaling or rope} is not supported (our rotary embedding is unscaled); "
            f"convert a model without rope_scaling"
        )
    heads, hidden = config.get("num_attention_heads", 0), config.get("hidden_size", 0)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if not isinstance(config.get(key), int)]
    if missing:
        problems.append(f"config.json lacks {', '.join(missing)}")
    head_dim = config.get("head_dim")
    if not missing and head_dim is None and hidden % heads:
        problems.append(
            f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim is given"
        )
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2):
        problems.append(f"head_dim {head_dim} is not a positive even width (rotary embeddings rotate pairs)")
    fields = moe_fields_from_hf(family, config, problems) if family is not None else {}
    if problems:
        raise ConversionError(f"{where} cannot be converted:\n" + "\n".join(f"  - {p}" for p in problems))
    fields.setdefault("ffn_hidden_size", config["intermediate_size"])
    cfg = ModelConfig(
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=None if head_dim in (None, hidden // heads) and not hidden % heads else head_dim,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
        **fields,
    )
    if cfg.problems():  # e.g. an MoE config with no experts, or top_k above their number
        raise ConversionError(
            f"{where} cannot be converted:\n" + "\n".join(f"  - {p}" for p in cfg.problems())
        )
    return cfg
