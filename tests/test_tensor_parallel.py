"""Tensor-parallel layers, one at a time, against the plain layers they replace (2 gloo ranks)."""

import pytest

from parallel_checks import MODEL, layer_parity, vocab_parallel_loss
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
