"""The plain model: exact parameter and FLOP counts, causality, and equality with Hugging Face Llama."""

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model import Transformer, count_parameters, flops_per_token
from pretrain.model.flops import matmul_parameters

TINY = ModelConfig(
    vocab_size=320, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=352
)


def built_parameters(cfg: ModelConfig) -> int:
    """Unique parameters of the built model, less the zero rows that pad the vocabulary."""
    with torch.device("meta"):
        model = Transformer(cfg)
    padding = (model.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return sum(p.numel() for p in model.parameters()) - padding


def test_tiny_parameter_count_by_hand():
    # embedding 320*128 = 40,960; head 40,960
    # per block: q 128*128 = 16,384; k, v 2 * 128*64 = 16,384; o 16,384; SwiGLU 3*128*352 = 135,168;
    #            norms 2*128 = 256  -> 184,576; x4 blocks = 738,304; final norm 128
    assert count_parameters(TINY) == 40_960 + 40_960 + 738_304 + 128 == 820_352
    assert built_parameters(TINY) == 820_352


def test_tied_embeddings_are_counted_once():
    tied = ModelConfig(**{**TINY.__dict__, "tie_embeddings": True})
    assert count_parameters(tied) == 820_352 - 40_960 == built_parameters(tied)
    model = Transformer(tied)
    assert model.head.weight is model.embedding.weight


@pytest.mark.parametrize(
    ("cfg", "published"),
    [
        # Llama 2 7B (Touvron et al. 2023): the count Hugging Face reports for meta-llama/Llama-2-7b-hf.
        (ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008), 6_738_415_616),
        # Llama 3 8B: GQA with 8 kv-heads, 128,256 vocabulary, untied.
        (ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                     ffn_hidden_size=14336, rope_theta=500000.0), 8_030_261_248),
    ],
)  # fmt: skip
def test_parameter_count_matches_published_models(cfg, published):
    assert count_parameters(cfg) == published
    assert built_parameters(cfg) == published


def test_derived_ffn_width_follows_llama_rule():
    # Llama 7B: 8/3 * 4096 = 10922.67 -> multiple of 256 -> 11008
    assert ModelConfig(hidden_size=4096, ffn_multiple_of=256).ffn_size == 11008


def test_flops_per_token_by_hand():
    cfg = ModelConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128
    )
    # per block matmul weights: q 64*64 = 4096; k, v 2 * 64*32 = 4096; o 4096; SwiGLU 3*64*128 = 24,576 -> 36,864
    # 2 blocks = 73,728; head 64*256 = 16,384 -> 90,112 matmul weights; forward 2 * 90,112 = 180,224
    # attention at T = 32: 2 (QK^T, AV) * 2 flops * 2 layers * 32 * 4 heads * 16 = 16,384
    # training = 3 * (180,224 + 16,384) = 589,824
    assert matmul_parameters(cfg) == 90_112
    assert flops_per_token(cfg, seq_len=32) == 589_824


def test_flops_match_the_6n_rule_for_llama2_7b():
    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008)
    # 6N with N excluding the embedding lookup (but including the head), plus 12 L T d for attention
    n = 6_738_415_616 - 32000 * 4096 - (2 * 32 + 1) * 4096  # minus embedding and norm vectors
    assert flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 4096 * 4096


def test_output_depends_only_on_the_past():
    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 24))
    changed = tokens.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=256, num_layers=8, num_heads=4, ffn_hidden_size=512)
    block = Transformer(cfg).blocks[0]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_hugging_face_llama(kv_heads, tied):
    """Our module is Llama: same weights into transformers' LlamaForCausalLM give the same logits (fp32).
    Tolerance 1e-5: identical math, different kernel order (fused SDPA vs eager attention)."""
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                      ffn_hidden_size=96, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=tied)  # fmt: skip
    ours = Transformer(cfg, seed=0).eval()
    hf_config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        max_position_embeddings=64, attention_bias=False, mlp_bias=False,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    # Our embedding and output rows are padded to a multiple of 128; Hugging Face holds the real 300.
    state = {"model.embed_tokens.weight": ours.embedding.weight[:300], "model.norm.weight": ours.norm.weight,
             "lm_head.weight": ours.head.weight[:300]}  # fmt: skip
    for i, block in enumerate(ours.blocks):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = block.attn_norm.weight
        state[prefix + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[prefix + f"self_attn.{name}.weight"] = getattr(block.attn, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[prefix + f"mlp.{name}.weight"] = getattr(block.mlp, name).weight
    hf.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_vocabulary_padding_changes_nothing_but_the_shapes():
    """Padded rows start at zero, are never predicted and get no gradient: the same seed gives the same
    logits and loss, and the same gradients on the real rows, whatever the padding."""
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    small, large = (
        Transformer(TINY, padded_vocab_size=384, seed=3),
        Transformer(TINY, padded_vocab_size=1024, seed=3),
    )
    assert large.embedding.weight.shape == (1024, 128) and not large.head.weight[320:].any()
    torch.testing.assert_close(small(tokens), large(tokens), rtol=0, atol=0)
    assert small(tokens).shape[-1] == 320
    small(tokens, tokens).backward()
    large(tokens, tokens).backward()
    assert not large.head.weight.grad[320:].any() and not large.embedding.weight.grad[320:].any()
    torch.testing.assert_close(small.head.weight.grad[:320], large.head.weight.grad[:320], rtol=0, atol=0)


def test_each_layer_draws_from_its_own_seed():
    """A layer's initial weights depend on (seed, layer index) only, so a pipeline stage or a
    tensor-parallel shard can build its layers alone and get the single-process numbers."""
    from pretrain.model import build_layer

    model = Transformer(TINY, seed=7)
    alone = build_layer(TINY, 3, model.padded_vocab_size, seed=7)  # block 2, built without the others
    for (name, ours), (_, theirs) in zip(
        model.blocks[2].named_parameters(), alone.named_parameters(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    other_seed = build_layer(TINY, 3, model.padded_vocab_size, seed=8)
    assert not torch.equal(other_seed.attn.q_proj.weight, alone.attn.q_proj.weight)
    assert not torch.equal(model.blocks[1].attn.q_proj.weight, model.blocks[2].attn.q_proj.weight)
