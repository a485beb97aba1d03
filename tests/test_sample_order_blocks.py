"""Order version 3: blocks of consecutive samples shuffled, then samples within windows of blocks. A
bijection per epoch, local (a partial pass touches about its share of the blocks), mixed within a
window, fixed by its seed and sizes, and kept by a resumed run whatever the configuration says."""

import logging
import math
import tracemalloc

import numpy as np
import pytest

from pretrain.config import DataConfig
from pretrain.data import DistributedBatches, PackedSamples
from pretrain.data.block_order import BlockOrder, shuffle_blocks
from pretrain.data.order import BLOCK_ORDER, FEISTEL_ORDER, FeistelOrder
from pretrain.errors import DataError
from test_sample_order import sample_ids

SIZES = [1, 2, 3, 7, 16, 17, 63, 64, 65, 100, 257, 1000, 1031]


@pytest.mark.parametrize("n", SIZES)
def test_every_epoch_is_a_permutation_of_all_samples(n):
    """Exhaustive over three epochs and two seeds, for blocks and windows that divide N, do not,
    and exceed it (one short block; one window holding every block)."""
    for block in (1, 2, 3, 8, 64, 2000):
        for window in (1, 2, 3, 5, 64):
            for seed in ([0, 0], [99, 3]):
                ids = BlockOrder(n, seed, block, window).lookup(np.arange(3 * n)).reshape(3, n)
                for epoch in ids:
                    assert np.array_equal(np.sort(epoch), np.arange(n)), (n, block, window, seed)


@pytest.mark.parametrize("n", [2**20 + 1, 10**9 + 7, 10**12 + 39])
def test_large_orders_stay_in_range_and_never_repeat_a_sample(n):
    order = BlockOrder(n, [7, 1], 4093, 64)
    draws = np.arange(n) if n < 2**21 else np.random.default_rng(0).choice(n, 200_000, replace=False)
    ids = order.lookup(draws + 2 * n)
    assert ids.min() >= 0 and ids.max() < n
    assert len(np.unique(ids)) == len(draws)


@pytest.mark.parametrize("n", [1, 2, 5, 17, 1000, 4097])
def test_the_feistel_inverse_undoes_the_order(n):
    """BlockOrder finds the short block's slot through it; version 2's values are untouched by it."""
    order = FeistelOrder(n, [3, 1])
    for epoch in (0, 4):
        ids = order.lookup(np.arange(n) + epoch * n)
        assert [order.position_of(epoch, int(i)) for i in ids] == list(range(n))


def test_the_order_is_fixed_by_its_seed_and_sizes_alone():
    """Written-down values: changing the arithmetic must be a new order version, not a silent change."""
    assert BlockOrder(1000, [1234, 0], 16, 4).lookup(np.arange(12)).tolist() == [
        750, 749, 434, 767, 439, 444, 766, 759, 433, 760, 581, 438
    ]  # fmt: skip
    big = BlockOrder(10**12 + 39, [1234, 2], 4096, 64).lookup(np.array([0, 1, 10**12 + 39, 5 * 10**12 + 7]))
    assert big.tolist() == [592337010279, 656138484096, 911184580777, 73778820730]
    assert BlockOrder(10, [5, 1], 3, 2).lookup(np.arange(20)).tolist() == [
        3, 0, 1, 5, 2, 4, 8, 6, 7, 9, 1, 0, 2, 7, 6, 8, 3, 5, 9, 4
    ]  # fmt: skip
    order, draws = BlockOrder(777, [5, 0], 10, 3), np.array([3000, 5, 776, 777, 778, 1553, 9])
    assert order.lookup(draws).tolist() == [order[int(k)] for k in draws]
    epoch0 = order.lookup(np.arange(777))
    assert not np.array_equal(order.lookup(np.arange(777, 2 * 777)), epoch0)  # each epoch reshuffles
    for other in (
        BlockOrder(777, [6, 0], 10, 3),
        BlockOrder(777, [5, 0], 11, 3),
        BlockOrder(777, [5, 0], 10, 4),
    ):
        assert (other.lookup(np.arange(777)) == epoch0).sum() < 20  # seed, B and W each key the order
    assert BlockOrder(777, [5, 0], 10, 3, shuffle=False).lookup(np.arange(780)).tolist() == [
        *range(777),
        0,
        1,
        2,
    ]


def blocks_touched(order, draws):
    return len(np.unique(order.lookup(draws) // order.block))


def test_a_partial_pass_touches_about_its_share_of_the_blocks():
    """First k draws: at most ceil(k / B) + W blocks (the windows read whole, plus the W blocks of the
    one in progress), in every epoch; a global shuffle touches nearly every block by 10%."""
    n, block, window = 100_000, 100, 8
    order = BlockOrder(n, [1, 0], block, window)
    for epoch in (0, 3):
        for k in (1, 50, 1000, 10_000, 33_333, n):
            touched = blocks_touched(order, np.arange(k) + epoch * n)
            assert touched <= math.ceil(k / block) + window, (epoch, k, touched)
    # Every block touched by a window's draws is read whole by the window's end.
    ids = order.lookup(np.arange(block * window))
    assert np.array_equal(np.bincount(ids // block)[np.unique(ids // block)], np.full(window, block))
    global_order = FeistelOrder(n, [1, 0])
    assert len(np.unique(global_order.lookup(np.arange(n // 10)) // block)) > 0.99 * n // block


def test_a_window_is_well_mixed():
    """Within a window the draws come from its W blocks in a random-looking interleave: adjacent draws
    share a block about 1/W of the time, no block runs in order, and each window's blocks lie anywhere."""
    n, block, window = 64_000, 64, 16
    order = BlockOrder(n, [42, 0], block, window)
    ids = order.lookup(np.arange(n))
    blocks = ids // block
    same_block = (np.diff(blocks) == 0).mean()
    assert abs(same_block - 1 / window) < 0.02, same_block
    for w in range(0, n // (block * window), 7):
        inside = ids[w * block * window : (w + 1) * block * window]
        assert (np.diff(inside) == 1).mean() < 0.05  # not runs of consecutive samples
        local = inside - inside.min()
        assert abs(np.corrcoef(np.arange(len(inside)), local)[0, 1]) < 0.15
    # The blocks of the first windows spread over the dataset: ~10% per tenth of the blocks.
    first = np.unique(blocks[: n // 4])
    per_tenth = np.bincount(first * 10 // (n // block), minlength=10)
    assert per_tenth.min() > 10 and per_tenth.max() < 40, per_tenth


def test_the_order_takes_o_of_batch_memory():
    """No table of samples or blocks: building and reading 1,024 draws at an epoch boundary of 1e12
    samples stays far below a megabyte (measured ~0.3 MB: per-draw round keys, 128 bytes a draw)."""
    BlockOrder(1000, [0, 0], 10, 4).lookup(np.arange(2000))  # first calls import and cache
    tracemalloc.start()
    try:
        order = BlockOrder(10**12 + 7, [0, 0], 4096, 64)
        order.lookup(np.arange(10**12 + 7 - 512, 10**12 + 7 + 512))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak


def datasets(blocks=((4, 3), (0, 0))):
    return [
        PackedSamples(np.arange(4 * n + 1, dtype=np.uint16), 4, shuffle_blocks=b)
        for n, b in zip((37, 23), blocks, strict=True)
    ]


def loaders(dp_size, state=None, blocks=((4, 3), (0, 0))):
    made = [DistributedBatches(datasets(blocks), 11, 12, 12 // dp_size, r, dp_size) for r in range(dp_size)]
    for loader in made:
        if state is not None:
            loader.load_state_dict(state)
    return made


def test_a_new_run_with_blocks_records_them_and_resumes_on_exactly_the_next_samples():
    """Per dataset of a blend: the first in blocks of 4 (windows of 3), the second globally shuffled."""
    fresh = loaders(1)[0]
    assert fresh.state_dict() == {
        "consumed_samples": 0,
        "order_version": BLOCK_ORDER,
        "shuffle_blocks": [[4, 3], [0, 0]],
    }
    assert isinstance(fresh.orders[0], BlockOrder) and isinstance(fresh.orders[1], FeistelOrder)
    # The globally shuffled dataset draws exactly what version 2 draws for it.
    assert (
        fresh.orders[1].lookup(np.arange(50)).tolist()
        == FeistelOrder(23, [11, 1]).lookup(np.arange(50)).tolist()
    )
    uninterrupted = sample_ids(loaders(1), 9)  # several epochs of both datasets
    first = loaders(2)
    head = sample_ids(first, 3)
    assert head + sample_ids(loaders(3, first[0].state_dict()), 6) == uninterrupted
    assert uninterrupted != sample_ids(loaders(1, blocks=((0, 0), (0, 0))), 9)
    assert loaders(1, blocks=((0, 0), (0, 0)))[0].state_dict()["order_version"] == FEISTEL_ORDER


def test_a_resume_keeps_the_recorded_order_whatever_the_configuration_asks(caplog):
    """Other block sizes (or data.cache_chunk, which sizes auto blocks) on resume: the checkpoint's
    order continues, with a warning; a version 2 checkpoint stays version 2 under a block configuration."""
    uninterrupted = sample_ids(loaders(1), 8)
    first = loaders(1)
    head = sample_ids(first, 3)
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        resumed = loaders(2, first[0].state_dict(), blocks=((8, 2), (5, 5)))
    assert head + sample_ids(resumed, 5) == uninterrupted
    assert resumed[0].state_dict()["shuffle_blocks"] == [[4, 3], [0, 0]]
    assert sum("keeps the checkpoint's order" in r.getMessage() for r in caplog.records) == 2
    plain = loaders(1, blocks=((0, 0), (0, 0)))
    version_2_head = sample_ids(plain, 3)
    state = plain[0].state_dict()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        kept = loaders(1, state)
    assert "version 2" in caplog.text and kept[0].state_dict() == state
    assert version_2_head + sample_ids(kept, 5) == sample_ids(loaders(1, blocks=((0, 0), (0, 0))), 8)


def test_a_version_3_state_without_its_block_sizes_is_refused():
    with pytest.raises(DataError, match="records no shuffle_blocks"):
        loaders(1, {"consumed_samples": 12, "order_version": BLOCK_ORDER})


def test_block_sizes_come_from_the_configuration_and_are_checked():
    """Auto: a global shuffle for local data; for remote data blocks of 4 cache chunks."""
    auto = DataConfig(cache_chunk="16MiB")
    assert shuffle_blocks(auto, remote=False, seq_len=4096, token_bytes=2) == (0, 0)
    assert shuffle_blocks(auto, remote=True, seq_len=4096, token_bytes=2) == (4 * 2048, 64)
    assert shuffle_blocks(DataConfig(cache_chunk="1KiB"), True, 1000, 4) == (2, 64)  # rounded up
    explicit = DataConfig(shuffle_block=512, shuffle_window=8)
    assert shuffle_blocks(explicit, False, 4096, 2) == shuffle_blocks(explicit, True, 4096, 2) == (512, 8)
    assert shuffle_blocks(DataConfig(shuffle_block=0), True, 4096, 2) == (0, 0)
    problems = DataConfig(shuffle_block=-1, shuffle_window=0).problems()
    assert any("data.shuffle_block must be >= 0" in p and "null" in p for p in problems)
    assert any("data.shuffle_window must be at least 1" in p for p in problems)
    assert not DataConfig(shuffle_block=4096, shuffle_window=1).problems()
