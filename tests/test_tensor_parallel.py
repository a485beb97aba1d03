"""Tensor-parallel layers, one at a time, against the plain layers they replace (2 gloo ranks)."""

import pytest

from parallel_checks import MODEL, QK_NORM_MODEL, layer_parity, vocab_parallel_loss
from pretrain.testing import run_distributed

pytestmark = pytest.mark.slow

# fp32. A tensor-parallel layer computes the same sums as the plain one, split in two and added
# (row-parallel matmuls, the vocabulary-parallel softmax): reordering moves the result by a few ulp
# (~1e-7 relative; observed <= 3e-7 absolute on values of order 1). 1e-5 is far below any real bug,
# such as a wrong shard, a missing all-reduce (factor 2) or a leaked padding column (loss moves by > 1).
ATOL = 1e-5


@pytest.mark.parametrize("padded_vocab", [50, 64, 100])
def test_vocab_parallel_cross_entropy_matches_the_whole_softmax(padded_vocab):
    """Padded columns are set to 50 (they would own the softmax if they leaked); with 100 columns the
    second rank holds nothing but padding."""
    for result in run_distributed(vocab_parallel_loss, 2, padded_vocab):
        assert result["logits_shape_ok"] == 1.0
        for key in ("loss", "grad", "logits"):
            assert result[key] < ATOL, (key, result)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize(
    "index",
    [0, 1, MODEL.num_layers + 1, MODEL.num_layers + 2],
    ids=["embedding", "block", "final-norm", "output-layer"],
)
def test_layer_output_and_every_gradient_match_the_plain_layer(index, sequence_parallel):
    """Output, input gradient and each parameter's gradient (gathered shard by shard) equal the plain
    layer's; with sequence parallelism the replicated norm weights still get the full-sequence gradient."""
    for rank, result in enumerate(run_distributed(layer_parity, 2, index, sequence_parallel)):
        assert any(key.startswith("grad ") for key in result), result
        bad = {key: value for key, value in result.items() if value > ATOL}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_a_block_with_qk_norm_and_wide_heads_matches_the_plain_block(sequence_parallel):
    """The q/k norms' weights are whole on every rank but see only its heads: without the sum of
    their gradients over the tensor-parallel group each rank would hold half of it."""
    for rank, result in enumerate(run_distributed(layer_parity, 2, 1, sequence_parallel, QK_NORM_MODEL)):
        assert "grad blocks.0.attn.q_norm.weight" in result, result
        bad = {key: value for key, value in result.items() if value > ATOL}
        assert not bad, f"rank {rank}: {bad}"


NORM = "blocks.1.mlp_norm.weight"
TIED = "tied_modules.embedding.weight"


@pytest.mark.parametrize(
    ("overrides", "param", "expected"),
    [
        (["parallel.tp=2"], NORM, f"{NORM}: tensor-parallel copies differ"),
        ([], NORM, f"{NORM}: data-parallel copies differ"),
        (
            ["parallel.pp=2", "model.tie_embeddings=true"],
            TIED,
            "tied embedding.weight: pipeline-stage (tied) copies",
        ),
    ],
    ids=["tp2", "dp2", "tied-pp2"],
)
def test_replica_check_names_a_parameter_that_drifted_on_one_rank(overrides, param, expected, tmp_path):
    """Consistent at step 2; at step 4 the parameter nudged on rank 1 after step 3 is named: a norm
    weight (the same on both TP ranks, and on both DP replicas), the tied embedding (the same on the
    first and last stage). ZeRO-0, because ZeRO would overwrite the nudged module weight with its own
    fp32 master copy at the next step."""
    from parallel_checks import replica_check_after_drift

    overrides = [*overrides, "parallel.zero_stage=0"]
    records = run_distributed(replica_check_after_drift, 2, overrides, str(tmp_path), 1, param)[0]
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["replica_divergence"] == []
    (problem,) = records[1]["replica_divergence"]
    assert problem.startswith(expected), problem
