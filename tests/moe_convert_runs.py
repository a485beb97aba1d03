"""Mixture-of-experts models for the conversion tests: the two exportable variants of the small
MoE (tests/test_moe_layouts.py's sizes), trained in every expert layout, and tiny Hugging Face MoE
models made by transformers itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# SMALL (tests/training_runs.py) as a mixture of experts: 4 routed experts (top-2) of width 32 after
# one dense block, every balancing loss on.
MOE = [
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_ffn_hidden_size=32",
    "model.moe.first_dense_layers=1",
    "model.moe.z_loss_coeff=0.001",
    "checkpoint.save_final=true",
]
VARIANTS = {
    # Qwen3MoeForCausalLM: softmax routing, QK-norm, heads wider than hidden / heads (32 vs 16).
    "qwen3-moe": [*MOE, "model.qk_norm=true", "model.head_dim=32"],
    # Glm4MoeForCausalLM: sigmoid routing scaled by 2.5, a shared expert, the auxiliary-loss-free bias
    # (moved every step, so it is nonzero at export and selects differently than the scores alone).
    "glm4-moe": [
        *MOE,
        "model.moe.score_func=sigmoid",
        "model.moe.num_shared_experts=1",
        "model.moe.route_scale=2.5",
        "model.moe.bias_update_rate=0.01",
        "model.qk_norm=true",
    ],
    # MixtralForCausalLM: softmax, no QK-norm, every block an MoE one (one process and EP2 x TP2 only).
    "mixtral": [*MOE, "model.moe.first_dense_layers=0"],
    # Qwen2MoeForCausalLM: softmax, no QK-norm, a dense block and a shared expert (one process, EP2).
    "qwen2-moe": [*MOE, "model.moe.num_shared_experts=1"],
}
FOUR_BLOCKS = ["model.num_layers=4"]  # under EP x PP every stage needs an MoE block
LAYOUTS = {
    # name: (processes, overrides)
    "one": (1, []),
    "ep2": (2, ["parallel.ep=2"]),
    # bf16: the export is bf16 (the router bias stays fp32), the masters come from ZeRO-2's partitions.
    "ep2-zero2-bf16": (2, ["parallel.ep=2", "parallel.zero_stage=2", "train.precision=bf16"]),
    "ep2-tp2": (4, ["parallel.ep=2", "parallel.tp=2"]),
    "ep2-pp2": (4, ["parallel.ep=2", "parallel.pp=2", *FOUR_BLOCKS]),
    "ep4": (4, ["parallel.ep=4"]),  # one expert per rank (Glm4Moe only: tests/test_convert_moe.py)
}
VOCAB = 320

TINY_HF = {  # shared by the three Hugging Face configs
    "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
}  # fmt: skip


def hf_moe_model(kind: str) -> Any:
    """A tiny randomly initialised transformers MoE model of `kind` (qwen3_moe, qwen2_moe, mixtral, glm4_moe),
    with router biases and norms moved off their initial values so that each tensor matters."""
    import torch
    import transformers

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **TINY_HF, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True, rope_parameters=rope,
        )  # fmt: skip
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **TINY_HF, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False, qkv_bias=True,
            rope_parameters=rope,
        )  # fmt: skip
        cls = transformers.Qwen2MoeForCausalLM
    elif kind == "mixtral":
        config = transformers.MixtralConfig(
            **TINY_HF, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, rope_parameters=rope
        )
        cls = transformers.MixtralForCausalLM
    else:
        config = transformers.Glm4MoeConfig(
            **TINY_HF, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, use_qk_norm=True,
            num_nextn_predict_layers=0, rope_parameters={**rope, "partial_rotary_factor": 1.0},
        )  # fmt: skip
        cls = transformers.Glm4MoeForCausalLM
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.ndim == 1:  # norms: ones at init, which would hide a swapped q_norm / k_norm
                tensor.add_(0.1 * torch.randn_like(tensor))
            else:  # transformers' 0.02 gives near-uniform routing and logits
                tensor.mul_(5.0)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn_like(buffer))
        for name, tensor in model.named_parameters():  # what our model computes: no biases, gate 0
            if name.endswith(("_proj.bias", "shared_expert_gate.weight")):
                tensor.zero_()
    return model.eval()


def save_hf_moe_model(kind: str, folder: Path) -> Any:
    model = hf_moe_model(kind)
    model.save_pretrained(folder)
    return model


def random_consolidated(path: Path, cfg: Any, expert_bias: float = 0.0, seed: int = 1) -> Path:
    """Consolidated weights of our model `cfg`, initialised with `seed` and then made less uniform
    (weights x 5, norms off 1, router biases of size `expert_bias`), as to-fp32 writes them."""
    import torch

    from pretrain.model import Transformer
    from pretrain.model.names import stored_shapes
    from pretrain.weights.consolidated import write_consolidated

    state = Transformer(cfg, padded_vocab_size=cfg.vocab_size, seed=seed).state_dict()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in state.items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("expert_bias"):
                tensor.copy_(expert_bias * noise)
            elif tensor.ndim == 1:
                tensor.add_(0.1 * noise)
            else:
                tensor.mul_(5.0)
    tensors = ((name, state[name]) for name in stored_shapes(cfg))
    return write_consolidated(path, cfg, tensors, {"precision": "fp32"})


def first_batch(cfg: Any) -> tuple[Any, Any]:
    """The global batch of training step 1, as (inputs, labels) over all micro-batches."""
    import torch

    from pretrain.data import DistributedBatches, load_training_data

    data = load_training_data(cfg.data, cfg.train.seq_len)
    batches = DistributedBatches(
        data.train, cfg.seed, cfg.train.global_batch_size, cfg.train.micro_batch_size, 0, 1
    ).next_step()
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def read_folder(folder: Path) -> dict[str, Any]:
    """Every tensor of a Hugging Face folder's safetensors files, by name."""
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return out
