"""The sample order: a true permutation per epoch, shuffled well, in O(1) memory per rank, and
checkpoints written with the old (version 1) order still resume on exactly their next samples."""

import logging
import tracemalloc

import numpy as np
import pytest

from pretrain.data import DistributedBatches, PackedSamples, TokenStream
from pretrain.data.order import FEISTEL_ORDER, LEGACY_ORDER, FeistelOrder, GlobalOrder, order_memory
from pretrain.errors import DataError

SMALL_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 15, 16, 17, 31, 32, 33, 97, 127, 128, 129, 251, 256, 257]
SMALL_SIZES += [1000, 1023, 1024, 1025, 4093, 4096, 4097, 65_521]  # 65,521: the largest prime < 2^16


@pytest.mark.parametrize("n", SMALL_SIZES)
def test_every_epoch_is_a_permutation_of_all_samples(n):
    """Exhaustive: each of three epochs, for two seeds, holds every sample exactly once."""
    for seed in ([0, 0], [1234, 3]):
        ids = FeistelOrder(n, seed).lookup(np.arange(3 * n)).reshape(3, n)
        for epoch in ids:
            assert np.array_equal(np.sort(epoch), np.arange(n))


@pytest.mark.parametrize("n", [2**20 - 1, 2**20 + 1, 10**9 + 7, 2**40, 10**12 + 39])
def test_large_orders_stay_in_range_and_never_repeat_a_sample(n):
    """Sampled: 200,000 distinct draws of an epoch give 200,000 distinct ids below N (injective, so a
    bijection of the epoch); below 2^21 the whole epoch is checked."""
    order = FeistelOrder(n, [7, 1])
    draws = np.arange(n) if n < 2**21 else np.random.default_rng(0).choice(n, 200_000, replace=False)
    ids = order.lookup(draws + 3 * n)  # epoch 3
    assert ids.min() >= 0 and ids.max() < n
    assert len(np.unique(ids)) == len(draws)


def test_the_order_is_fixed_by_its_seed_alone():
    """Written-down values: a change of the arithmetic (or of numpy under it) changes every run's
    order, and must be a new order version, not a silent change of this one."""
    assert FeistelOrder(1000, [1234, 0]).lookup(np.arange(12)).tolist() == [
        488, 645, 71, 479, 305, 234, 177, 844, 958, 794, 554, 856
    ]  # fmt: skip
    big = FeistelOrder(10**10 + 19, [1234, 2]).lookup(np.array([0, 1, 10**10 + 19, 5 * 10**12]))
    assert big.tolist() == [8466936622, 8344045295, 6707525392, 407215622]
    assert FeistelOrder(5, [2**70 + 3, 1]).lookup(np.arange(10)).tolist() == [0, 1, 3, 2, 4, 0, 3, 2, 4, 1]
    # A draw's id does not depend on which other draws are looked up with it.
    order, draws = FeistelOrder(777, [5, 0]), np.array([3000, 5, 776, 777, 778, 1553, 9])
    assert order.lookup(draws).tolist() == [order[int(k)] for k in draws]
    with pytest.raises(ValueError, match="non-negative"):
        FeistelOrder(10, [-1, 0])


def test_the_shuffle_looks_random():
    """Sanity bounds for N = 10,000, each several standard deviations wide for a uniform permutation."""
    n = 10_000
    order = FeistelOrder(n, [42, 0])
    epoch0, epoch1 = order.lookup(np.arange(n)), order.lookup(np.arange(n, 2 * n))
    # Fixed points of a random permutation: Poisson(1); 8 or more has probability 1e-5.
    assert (epoch0 == np.arange(n)).sum() < 8
    # Adjacent draws land far apart: E|U - V| = N/3 for independent uniforms; the mean over 9,999
    # pairs has a standard deviation of ~0.0024 N, and 0.03 N is over 10 of them.
    assert abs(np.abs(np.diff(epoch0)).mean() - n / 3) < 0.03 * n
    # No drift with the draw index and none between epochs: correlations of a random permutation
    # have a standard deviation of 1/sqrt(N) = 0.01.
    assert abs(np.corrcoef(np.arange(n), epoch0)[0, 1]) < 0.05
    assert abs(np.corrcoef(epoch0, epoch1)[0, 1]) < 0.05
    # The first 1,000 draws spread over the whole dataset: ~100 per tenth (binomial sd 9.5).
    per_tenth = np.bincount(epoch0[:1000] * 10 // n, minlength=10)
    assert per_tenth.min() > 60 and per_tenth.max() < 140, per_tenth
    # Other seeds and datasets are other orders (agreement of two random permutations: ~1 position).
    for other in ([43, 0], [42, 1]):
        assert (FeistelOrder(n, other).lookup(np.arange(n)) == epoch0).sum() < 8


def test_version_1_is_numpys_per_epoch_permutation_as_before():
    """The old order, value for value: what checkpoints without a version field trained on."""
    n, seed = 1000, [9, 2]
    draws = np.arange(n - 5, n + 5)  # across the boundary into epoch 1
    expected = [np.random.default_rng([*seed, int(k) // n]).permutation(n)[int(k) % n] for k in draws]
    assert GlobalOrder(n, seed).lookup(draws).tolist() == expected
    assert GlobalOrder(n, seed, shuffle=False).lookup(draws).tolist() == (draws % n).tolist()


def test_the_order_takes_o_of_batch_memory_and_the_old_one_o_of_samples():
    """tracemalloc peak (numpy reports its buffers to it) while building the order and reading four
    batches of 1,024 draws, two at an epoch boundary. Measured: 2 KB to build, 84 KB to read,
    whatever N. The bounds leave 4x for interpreter and numpy versions; the old order needs 4 bytes
    per sample (and 12 while building): 40 MB at 1e7, far past them."""
    for n in (10**6, 10**9, 10**12):
        cost = order_memory(n, FEISTEL_ORDER, batch=1024)
        assert cost["build_peak_bytes"] < 8 * 1024, cost
        assert cost["read_peak_bytes"] < 512 * 1024, cost
    # O(batch): 8x the batch costs at most ~8x (plus the fixed part), not more.
    small, large = (order_memory(10**9, FEISTEL_ORDER, batch=b)["read_peak_bytes"] for b in (512, 4096))
    assert large < 10 * small
    old = order_memory(10**7, LEGACY_ORDER, batch=1024)
    assert old["peak_bytes"] > 4 * 10**7 > 512 * 1024


def huge_dataset(num_samples, seq_len=8):
    """A dataset of `num_samples` samples that takes no memory: one token repeated (a zero-stride view)."""
    stream = TokenStream([np.broadcast_to(np.uint16(1), (num_samples * seq_len + 1,))])
    return PackedSamples(stream, seq_len)


def loader_peak_bytes(num_samples, version):
    """tracemalloc peak of one rank's loader (DP rank 3 of 8; datasets of `num_samples` and 1,000
    samples), built and stepped across an epoch boundary of the small one."""
    tracemalloc.start()
    try:
        datasets = [huge_dataset(num_samples), huge_dataset(1000)]
        loader = DistributedBatches(datasets, 1, 256, 4, 3, 8, weights=[0.9, 0.1])
        loader.load_state_dict({"consumed_samples": 9728, "order_version": version})
        before = loader.consumed_per_dataset()[1]
        for _ in range(3):
            loader.next_step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert before < 1000 < loader.consumed_per_dataset()[1]  # the boundary was crossed
    return peak


def test_a_rank_of_a_loader_over_a_billion_samples_holds_no_table_of_them():
    """Measured 256 KB at 1e6, 1e9 and 1e12 samples alike: the step's arrays (256 draws located, this rank's 32 looked
    up and read) and the loader's objects; 1 MB leaves room for other numpy and Python versions. The
    old order needs 4 bytes per sample (12 while building), so it fails the bound from ~1e5 samples:
    shown at 1e7, where it takes > 40 MB (at 1e9 it would take 12 GB)."""
    loader_peak_bytes(10**4, FEISTEL_ORDER)  # first calls import and cache; not what is measured
    assert loader_peak_bytes(10**9, FEISTEL_ORDER) < 1024 * 1024
    assert loader_peak_bytes(10**7, LEGACY_ORDER) > 4 * 10**7


def sample_ids(loaders, steps):
    out = []
    for _ in range(steps):
        step = []
        for loader in loaders:
            step += sorted(i for micro in loader.step_sample_ids(loader.consumed_samples) for i in micro)
            loader.next_step()
        out.append(sorted(step))
    return out


def loaders(dp_size, state=None):
    datasets = [PackedSamples(np.arange(4 * n + 1, dtype=np.uint16), 4) for n in (37, 23)]
    made = [DistributedBatches(datasets, 11, 12, 12 // dp_size, r, dp_size) for r in range(dp_size)]
    for loader in made:
        if state is not None:
            loader.load_state_dict(state)
    return made


@pytest.mark.parametrize("dp_sizes", [(1, 3), (4, 2)])
def test_a_checkpoint_of_the_old_order_resumes_exactly_in_it_on_any_dp_size(dp_sizes, caplog):
    """A state without `order_version` (every checkpoint before it existed) continues the version 1
    order at its position, also on another DP size, and keeps recording version 1; it says so once."""
    before, after = dp_sizes
    uninterrupted = sample_ids(loaders(1, {"consumed_samples": 0}), 9)  # 108 draws: several epochs
    # The old code's own definition of those draws, for the first step.
    expected = []
    for d, c in zip(*loaders(1)[0].schedule.locate(0, 12), strict=True):
        n = (37, 23)[d]
        expected.append((int(d), int(np.random.default_rng([11, int(d), c // n]).permutation(n)[c % n])))
    assert uninterrupted[0] == sorted(expected)
    first = loaders(before, {"consumed_samples": 0})
    head = sample_ids(first, 4)
    old_state = {"consumed_samples": first[0].state_dict()["consumed_samples"]}  # as written before
    with caplog.at_level(logging.INFO, logger="pretrain"):
        resumed = loaders(after, old_state)
    assert sum("version 1 order" in r.getMessage() for r in caplog.records) == after  # once per loader
    assert head + sample_ids(resumed, 5) == uninterrupted
    assert resumed[0].state_dict()["order_version"] == LEGACY_ORDER
    again = loaders(2, resumed[0].state_dict())
    assert sample_ids(again, 1) == sample_ids(loaders(1, resumed[0].state_dict()), 1)


def test_new_runs_use_and_record_the_bounded_order():
    fresh = loaders(1)[0]
    assert fresh.state_dict() == {"consumed_samples": 0, "order_version": FEISTEL_ORDER}
    assert all(isinstance(order, FeistelOrder) for order in fresh.orders)
    uninterrupted = sample_ids(loaders(1), 6)
    first = loaders(2)
    head = sample_ids(first, 2)
    assert head + sample_ids(loaders(3, first[0].state_dict()), 4) == uninterrupted
    assert uninterrupted != sample_ids(loaders(1, {"consumed_samples": 0}), 6)  # not the old order


def test_an_unknown_order_version_is_refused_naming_it():
    with pytest.raises(DataError, match=r"sample order version 4 .* newer version"):
        loaders(1, {"consumed_samples": 12, "order_version": 4})


def test_an_unshuffled_loader_has_one_order_whatever_the_version(caplog):
    """Validation is unshuffled and the trainer rewinds it with {"consumed_samples": 0}: no version
    change can alter it, and it builds no table and logs nothing."""
    samples = PackedSamples(np.arange(401, dtype=np.uint16), 4)
    plain = DistributedBatches(samples, 3, 10, 5, 1, 2, shuffle=False)
    with caplog.at_level(logging.INFO, logger="pretrain"):
        rewound = DistributedBatches(samples, 3, 10, 5, 1, 2, shuffle=False)
        rewound.load_state_dict({"consumed_samples": 0})
    assert not caplog.records
    assert rewound.step_sample_ids(90) == plain.step_sample_ids(90) == [[(0, i) for i in range(95, 100)]]
