"""How the layer list (embedding, blocks..., norm, head) is split into pipeline stages."""

import pytest

from conftest import TINY
from pretrain.config import ConfigError, load_config
from pretrain.parallel.partition import layer_parameter_counts, partition_layers


def stages(overrides, world_size):
    cfg = load_config(TINY, overrides, world_size=world_size)
    parts = partition_layers(cfg)
    return parts, [list(range(parts[s], parts[s + 1])) for s in range(cfg.parallel.pp)]


def test_equal_block_counts_with_the_embedding_first_and_the_head_last():
    # tiny: 4 blocks -> layer list [0 embedding, 1-4 blocks, 5 norm, 6 head]
    assert stages(["parallel.pp=2"], 2)[1] == [[0, 1, 2], [3, 4, 5, 6]]
    assert stages(["parallel.pp=4"], 4)[1] == [[0, 1], [2], [3], [4, 5, 6]]
    # 5 blocks over 2 stages: the first takes the extra block (the last also computes head and loss)
    assert stages(["parallel.pp=2", "model.num_layers=5"], 2)[1] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_parameter_balanced_split_counts_the_padded_vocabulary():
    cfg = load_config(TINY, ["parallel.pp=2"], world_size=2)
    counts = layer_parameter_counts(cfg)
    assert counts[0] == counts[-1] == 384 * 128  # 320 rows padded to 384
    assert counts[5] == 128  # final norm
    parts, held = stages(["parallel.pp=2", "parallel.pipeline_partition=parameters"], 2)
    per_stage = [sum(counts[i] for i in layers) for layers in held]
    assert max(per_stage) - min(per_stage) <= max(
        counts
    )  # no better contiguous split exists by more than a layer
    assert sum(len(layers) for layers in held) == len(counts) and parts[0] == 0


def test_parameter_balanced_split_that_leaves_a_stage_without_blocks_is_refused():
    # A 32k vocabulary dwarfs three 64-wide blocks: balancing gives the first stage the embedding alone.
    overrides = ["parallel.pp=3", "parallel.pipeline_partition=parameters", "model.vocab_size=32000",
                 "model.hidden_size=64", "model.num_layers=3", "model.ffn_hidden_size=128"]  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"leaves pipeline stage 0 without a decoder block.*pipeline_partition=layers"
    ):
        stages(overrides, 3)


def test_balanced_boundaries_are_optimal():
    """Against brute force over every contiguous split of small random weight lists."""
    import itertools
    import random

    from pretrain.parallel.partition import balanced_boundaries

    rng = random.Random(0)
    for _ in range(200):
        weights = [rng.randint(1, 50) for _ in range(rng.randint(2, 8))]
        parts = rng.randint(1, len(weights))
        bounds = balanced_boundaries(weights, parts)
        assert bounds[0] == 0 and bounds[-1] == len(weights) and len(bounds) == parts + 1
        assert all(a < b for a, b in itertools.pairwise(bounds))  # every stage non-empty

        def heaviest(b, weights=weights):
            return max(sum(weights[lo:hi]) for lo, hi in itertools.pairwise(b))

        best = min(
            heaviest([0, *cuts, len(weights)])
            for cuts in itertools.combinations(range(1, len(weights)), parts - 1)
        )
        assert heaviest(bounds) == best, (weights, parts, bounds)
