"""The mixture-of-experts block on its own (plain torch, one process) and the MoE config checks."""

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from pretrain.config import ModelConfig
from pretrain.model import Transformer, active_parameters, count_parameters
from pretrain.model.moe import MixtureOfExperts

TINY_MOE = REPO / "configs" / "tiny-moe.yaml"


def _model_config(**moe) -> ModelConfig:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48)
    for key, value in {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16, **moe}.items():
        setattr(cfg.moe, key, value)
    return cfg


def _block(**moe) -> MixtureOfExperts:
    torch.manual_seed(0)
    block = MixtureOfExperts(_model_config(**moe))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def test_moe_block_is_the_weighted_sum_of_its_top_k_experts():
    """Against a direct per-token computation: softmax over experts, top-2, renormalised weights."""
    block = _block(num_shared_experts=1)
    x = torch.randn(2, 5, 32)
    out = block(x)
    flat = x.reshape(-1, 32)
    scores = (flat @ block.router.weight.T).softmax(-1)
    top = scores.topk(2, dim=-1)
    expected = torch.zeros_like(flat)
    e = block.experts
    for t in range(flat.shape[0]):
        weights = top.values[t] / top.values[t].sum()
        for w, i in zip(weights, top.indices[t], strict=True):
            h = torch.nn.functional.silu(e.gate_proj[i] @ flat[t]) * (e.up_proj[i] @ flat[t])
            expected[t] += w * (e.down_proj[i] @ h)
    expected += block.shared(flat)
    torch.testing.assert_close(out.reshape(-1, 32), expected, rtol=1e-5, atol=1e-6)


def test_router_computes_in_fp32_under_bf16_weights():
    block = _block().to(torch.bfloat16)
    routing, logits, scores = block.router(torch.randn(6, 32, dtype=torch.bfloat16))
    assert logits.dtype == scores.dtype == routing.weights.dtype == torch.float32
    assert block(torch.randn(1, 6, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_sigmoid_router_normalises_and_scales_the_selected_scores():
    block = _block(score_func="sigmoid", route_scale=2.5)
    routing, _, scores = block.router(torch.randn(7, 32))
    assert torch.allclose(routing.weights.sum(-1), torch.full((7,), 2.5))
    assert (scores > 0).all() and (scores < 1).all()


def test_aux_and_z_loss_follow_their_formulas_for_a_uniform_router():
    """Uniform probabilities (P_i = 1/E): the aux loss is E/(kT) sum_i count_i / E for the counts the
    router chose, and the z-loss is logsumexp(0, ..., 0)^2 = log(E)^2."""
    block = _block()
    torch.nn.init.zeros_(block.router.weight)  # all scores equal: uniform probabilities
    x = torch.randn(1, 8, 32)
    routing, logits, scores = block.router(x.reshape(-1, 32))
    aux, z_loss = block._balancing_losses(routing, logits, scores, batch=1)
    counts = torch.bincount(routing.experts.reshape(-1), minlength=4).float()
    assert aux.item() == pytest.approx(4 / (2 * 8) * (counts * 0.25).sum().item())
    assert z_loss.item() == pytest.approx(math.log(4) ** 2)


def test_balancing_losses_add_gradient_without_changing_the_output():
    """The aux and z-loss reach the router's gradient (and nothing else of the output)."""
    plain, balanced = _block(aux_loss_coeff=0.0), _block(aux_loss_coeff=1.0, z_loss_coeff=1.0)
    x = torch.randn(2, 6, 32)
    out_plain, out_balanced = plain(x), balanced(x)
    assert torch.equal(out_plain, out_balanced)
    out_plain.sum().backward()
    out_balanced.sum().backward()
    assert not torch.allclose(plain.router.weight.grad, balanced.router.weight.grad)
    torch.testing.assert_close(plain.experts.down_proj.grad, balanced.experts.down_proj.grad)


def test_expert_bias_steers_the_choice_but_not_the_weights():
    block = _block(normalize_top_k=False)
    x = torch.randn(9, 32)
    block.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    routing, _, scores = block.router(x)
    assert (routing.experts == 3).any(-1).all()  # expert 3 chosen by every token
    assert torch.equal(routing.weights, scores.gather(-1, routing.experts))  # weights are unbiased


def test_capacity_drops_and_counts_the_overflow():
    block = _block(dropless=False, capacity_factor=1.0)
    torch.nn.init.zeros_(block.router.weight)
    block.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 2.0]))  # every token picks experts 3 and 2
    block.train()
    block(torch.randn(1, 8, 32))
    stats = block.take_statistics()
    capacity = math.ceil(1.0 * 8 * 2 / 4)
    assert stats.tokens_per_expert.tolist() == [0, 0, capacity, capacity]
    assert int(stats.dropped) == 2 * (8 - capacity)


def test_statistics_are_counted_once_under_full_recomputation():
    from pretrain.parallel.recompute import apply_activation_checkpointing

    cfg = _model_config(first_dense_layers=0)
    model = Transformer(cfg, seed=0)
    for block in model.blocks:
        apply_activation_checkpointing(block, "full")
    tokens = torch.randint(0, 64, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    stats = model.blocks[0].mlp.take_statistics()
    assert stats.forwards == 1 and stats.tokens_per_expert.sum().item() == 2 * 8 * 2


def test_parameter_counts_split_total_and_active():
    cfg = _model_config(num_shared_experts=1, first_dense_layers=1)
    built = sum(p.numel() for p in Transformer(cfg, seed=0).parameters())
    padding = (cfg.padded_vocab_size(1) - cfg.vocab_size) * cfg.hidden_size * 2
    assert count_parameters(cfg) == built - padding
    d, g = cfg.hidden_size, cfg.expert_ffn_size
    assert (
        count_parameters(cfg) - active_parameters(cfg) == (4 - 2) * 3 * d * g
    )  # two idle experts, one block


def _config_error(*overrides: str, world_size: int = 4) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0"}
    return subprocess.run(
        [sys.executable, "pretrain/main.py", "--config", str(TINY_MOE), *overrides, "run.dir=/nonexistent/run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["parallel.ep=3"], "model.moe.num_experts (8) is not divisible by parallel.ep (3)"),
        (["parallel.ep=8"], "parallel.ep (8) does not divide the data-parallel size (4"),
        (["model.moe.top_k=9"], "model.moe.top_k (9) exceeds model.moe.num_experts (8)"),
        (["parallel.zero_stage=3"], "model.moe with parallel.zero_stage=3 is not supported"),
        (["parallel.ep=2", "parallel.zero_stage=0"], "parallel.ep=2 needs parallel.zero_stage 1 or 2"),
        (["model.moe.dropless=false", "model.moe.capacity_factor=0.5"], "capacity_factor (0.5) is below 1"),
        (["model.moe.capacity_factor=0.5"], "is set but model.moe.dropless=true"),
        (["model.moe.num_experts=0", "parallel.ep=2"], "parallel.ep=2 needs a mixture-of-experts model"),
        (
            ["parallel.pp=2", "parallel.ep=2", "model.moe.first_dense_layers=2"],
            "every pipeline stage needs a mixture-of-experts block, but stage(s) 0 hold only dense blocks",
        ),
    ],
)
def test_impossible_moe_settings_are_config_errors_before_anything_starts(overrides, expected):
    result = _config_error(*overrides)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def _expert_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in layer.named_parameters() if ".experts." in n}


@pytest.mark.parametrize("source", ["random init", "init_weights"])
def test_an_expert_parallel_rank_builds_only_its_experts_with_the_whole_blocks_values(source, tmp_path):
    """Rank 1 of EP 4 builds experts [2, 4) of 8: bitwise the rows the single-process block has, and
    everything else of the block as it is there (random init, or read from consolidated weights)."""
    from pretrain.config import load_config
    from pretrain.model import build_layer
    from pretrain.model.names import stored_shapes
    from pretrain.weights.consolidated import open_init_weights, write_consolidated

    cfg = load_config(TINY_MOE, []).model
    padded = 384
    if source == "random init":
        whole = build_layer(cfg, 2, padded, seed=7)
        part = build_layer(cfg, 2, padded, seed=7, held_experts=(2, 2))
    else:
        gen = torch.Generator().manual_seed(0)
        tensors = {n: torch.randn(s, generator=gen) for n, s in stored_shapes(cfg).items()}
        write_consolidated(tmp_path / "w.safetensors", cfg, iter(tensors.items()), {"test": True})
        weights = open_init_weights(str(tmp_path / "w.safetensors"), cfg)
        whole = weights.build_layer(cfg, 2, padded)
        part = weights.build_layer(cfg, 2, padded, held_experts=(2, 2))
    experts = _expert_tensors(whole)
    assert experts and all(t.shape[0] == 8 for t in experts.values())
    for name, held in _expert_tensors(part).items():
        assert torch.equal(held, experts[name][2:4]), name
    rest = {n: p for n, p in whole.state_dict().items() if ".experts." not in n}
    assert rest.keys() == {n for n in part.state_dict() if ".experts." not in n}
    for name, value in part.state_dict().items():
        if ".experts." not in name:
            assert torch.equal(value, rest[name]), name


def test_the_trainers_build_under_expert_parallelism_never_allocates_every_expert():
    """What build_rank_layers allocates for rank 3 of EP 4: no tensor with a row per expert (the
    trainer used to build each block whole and keep a quarter of it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.config import load_config
    from pretrain.parallel.parallelize import build_rank_layers
    from pretrain.parallel.topology import ParallelContext

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.expert_rows: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.ndim == 3:
                self.expert_rows.append(out.shape[0])
            return out

    cfg = load_config(TINY_MOE, ["parallel.ep=4"], world_size=4)
    ctx = ParallelContext(1, 1, 4, 0, 0, 3, False, ep=4, ep_rank=3)
    with Allocations() as allocations:
        layers = build_rank_layers(cfg, ctx, torch.device("cpu"))
    assert allocations.expert_rows and set(allocations.expert_rows) == {2}, allocations.expert_rows
    held = [m for layer in layers.values() for m in layer.modules() if hasattr(m, "local")]
    assert len(held) == 3 and all(m.gate_proj.shape[0] == 2 for m in held)
