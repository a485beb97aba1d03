"""The built-in corpus and the rank-independent batch order."""

import threading

import numpy as np
import pytest
import torch

from pretrain.data import ByteTokenizer, DistributedBatches, PackedSamples, TokenStream
from pretrain.data.builtin import stdlib_documents, stdlib_tokens
from pretrain.errors import DataError


def test_stdlib_corpus_is_real_text_split_by_document(tmp_path):
    for name, text in {
        "a.py": "def f():\n    return 1\n",
        "b/c.py": '"""doc"""\n',
        "test/t.py": "x=1\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert [p.relative_to(tmp_path).as_posix() for p in stdlib_documents(tmp_path)] == ["a.py", "b/c.py"]
    train, val = stdlib_tokens(0.0, tmp_path)
    assert len(val) == 0
    tok = ByteTokenizer()
    expected = [*tok.encode("def f():\n    return 1\n"), tok.eod_id, *tok.encode('"""doc"""\n'), tok.eod_id]
    assert train.tolist() == expected
    train, val = stdlib_tokens(0.999999, tmp_path)  # (almost) everything held out
    assert len(train) == 0 and len(val) == len(expected)


def test_real_stdlib_is_large_enough_for_the_tiny_preset():
    train, val = stdlib_tokens(0.02)
    assert len(train) > 5_000_000 and len(val) > 50_000
    assert train.max() == ByteTokenizer.eod_id and train.dtype == np.uint16


def test_samples_pack_across_documents_with_one_token_overlap():
    samples = PackedSamples(np.arange(25, dtype=np.uint16), seq_len=4)
    assert len(samples) == 6  # (25 - 1) // 4
    assert samples[0].tolist() == [0, 1, 2, 3, 4]
    assert samples[1].tolist() == [4, 5, 6, 7, 8]


def step_samples(dp_size, micro, steps=5, global_batch=8):
    """Every sample id trained on at each step, gathered over all ranks."""
    samples = PackedSamples(np.arange(401, dtype=np.uint16), seq_len=4)  # 100 samples: wraps into epoch 2
    loaders = [DistributedBatches(samples, 7, global_batch, micro, rank, dp_size) for rank in range(dp_size)]
    per_step = []
    for _ in range(steps):
        ids = set()
        for loader in loaders:
            for inputs, labels in loader.next_step():
                assert inputs.shape == labels.shape == (micro, 4)
                assert (inputs[:, 1:] == labels[:, :-1]).all()  # labels are the inputs shifted by one
                ids.update((inputs[:, 0] // 4).tolist())
        per_step.append(ids)
    return per_step


@pytest.mark.parametrize(("dp_size", "micro"), [(2, 4), (4, 1), (2, 1), (8, 1)])
def test_samples_per_step_do_not_depend_on_dp_size_or_micro_batch(dp_size, micro):
    reference = step_samples(1, 8)
    assert all(len(ids) == 8 for ids in reference)
    assert step_samples(dp_size, micro) == reference


def test_order_is_seeded_covers_every_sample_per_epoch_and_resumes_exactly():
    samples = PackedSamples(np.arange(401, dtype=np.uint16), seq_len=4)
    a = DistributedBatches(samples, 1, 10, 10, 0, 1)
    first_epoch = []
    for _ in range(10):
        first_epoch += [i for _, i in a.step_sample_ids(a.consumed_samples)[0]]
        a.next_step()
    assert sorted(first_epoch) == list(range(100))
    assert first_epoch != list(range(100))  # shuffled
    b = DistributedBatches(samples, 2, 10, 10, 0, 1)
    assert b.step_sample_ids(0) != DistributedBatches(samples, 1, 10, 10, 0, 1).step_sample_ids(0)

    resumed = DistributedBatches(samples, 1, 10, 10, 0, 1)
    resumed.load_state_dict(a.state_dict())
    assert resumed.consumed_samples == 100
    assert [t.tolist() for t, _ in resumed.next_step()] == [t.tolist() for t, _ in a.next_step()]


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than seq_len"):
        DistributedBatches(PackedSamples(np.arange(5, dtype=np.uint16), 8), 0, 2, 1, 0, 1)


def test_token_stream_reads_across_shard_boundaries():
    parts = [np.arange(0, 5), np.arange(5, 7), np.arange(0), np.arange(7, 12)]
    stream = TokenStream(parts)
    assert len(stream) == 12
    for start in range(12):
        for stop in range(start + 1, 13):
            assert stream.read(start, stop).tolist() == list(range(start, stop))
    samples = PackedSamples(stream, seq_len=3, start=2, stop=11)
    assert len(samples) == 2 and samples[1].tolist() == [5, 6, 7, 8]
    with pytest.raises(IndexError):
        samples[2]


def blended(weights, sizes=(50, 30, 20), dp_size=1, global_batch=10, seed=3):
    datasets = [
        PackedSamples(np.arange(4 * n + 1, dtype=np.uint16) + 1000 * d, 4) for d, n in enumerate(sizes)
    ]
    return [DistributedBatches(datasets, seed, global_batch, 10 // dp_size, r, dp_size, weights=weights)
            for r in range(dp_size)]  # fmt: skip


def test_blend_shares_stay_within_one_percent_of_the_weights():
    weights = [0.6, 0.3, 0.1]
    (loader,) = blended(weights, global_batch=100)
    for steps in (10, 50, 200):  # 1,000 to 20,000 samples, many epochs of the small datasets
        while loader.consumed_samples < steps * 100:
            loader.next_step()
        shares = np.array(loader.consumed_per_dataset()) / loader.consumed_samples
        assert np.abs(shares - weights).max() < 0.01, shares
    # and within every window of 1,000 samples, not only on average
    ids = loader.schedule.datasets(0, 20_000)
    for start in range(0, 20_000, 1_000):
        window = np.bincount(ids[start : start + 1_000], minlength=3) / 1_000
        assert np.abs(window - weights).max() < 0.01, (start, window)


def test_blend_counters_agree_with_a_plain_count():
    (loader,) = blended([0.5, 0.25, 0.25])
    schedule = loader.schedule
    ids = schedule.datasets(0, 200_000)  # crosses several cached blocks
    for start in (0, 1, 65_535, 65_536, 131_073, 199_990):
        expected = np.bincount(ids[:start], minlength=3)
        assert schedule.counts_before(start).tolist() == expected.tolist()
    got_ids, counters = schedule.locate(131_000, 131_100)
    for offset, (d, k) in enumerate(zip(got_ids, counters, strict=True)):
        assert d == ids[131_000 + offset] and k == (ids[: 131_000 + offset] == d).sum()


def trained_rows(loaders, steps):
    rows = []
    for _ in range(steps):
        step_rows = []
        for loader in loaders:
            step_rows += [tuple(r) for inputs, _ in loader.next_step() for r in inputs[:, :1].tolist()]
        rows.append(sorted(step_rows))
    return rows


@pytest.mark.parametrize("dp_sizes", [(1, 2), (2, 1), (2, 5), (5, 1)])
def test_resume_on_another_dp_size_continues_without_repeat_or_gap(dp_sizes):
    """Train k steps on one DP size, resume on another: the same samples as an uninterrupted run."""
    before, after = dp_sizes
    uninterrupted = trained_rows(blended([0.5, 0.3, 0.2], dp_size=1), 12)
    first = blended([0.5, 0.3, 0.2], dp_size=before)
    head = trained_rows(first, 5)
    resumed = blended([0.5, 0.3, 0.2], dp_size=after)
    for loader in resumed:
        loader.load_state_dict(first[0].state_dict())
    assert head + trained_rows(resumed, 7) == uninterrupted


def test_positions_restart_after_each_end_of_document():
    from pretrain.data.loader import document_positions

    eod = 9
    tokens = torch.tensor([[5, 6, eod, 7, 8, 8, eod, eod, 1], [eod, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert document_positions(tokens, eod).tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0, 0],
        [0, 0, 1, 2, 3, 4, 5, 6, 7],
    ]


class ThreadRecordingSamples(PackedSamples):
    """PackedSamples that remember which thread read each sample."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.readers: list[str] = []

    def __getitem__(self, index):
        self.readers.append(threading.current_thread().name)
        return super().__getitem__(index)


def test_prefetching_reads_the_next_step_off_the_training_thread_and_changes_nothing():
    tokens = np.arange(4000, dtype=np.uint16)
    plain = DistributedBatches(PackedSamples(tokens, 16), 5, 8, 2, 1, 2)
    samples = ThreadRecordingSamples(tokens, 16)
    ahead = DistributedBatches(samples, 5, 8, 2, 1, 2, prefetch=True)

    def both(action):
        return action(plain), action(ahead)

    def same_step():
        a, b = both(lambda loader: loader.next_step())
        assert len(a) == len(b) == 2
        for (ta, la), (tb, lb) in zip(a, b, strict=True):
            assert torch.equal(ta, tb) and torch.equal(la, lb)
            assert tb.is_contiguous() and lb.is_contiguous()
        assert plain.last_step_start == ahead.last_step_start

    same_step()
    # The first step is read when asked for; 2 micro-batches x 2 samples, then the next step ahead.
    assert samples.readers[:4] == [threading.current_thread().name] * 4
    samples.readers.clear()
    for _ in range(3):
        same_step()
    assert samples.readers and all(name.startswith("prefetch") for name in samples.readers)
    # A batch skipped, a rewind and a jump forward between steps: what was read ahead is not used.
    both(lambda loader: loader.skip_batch(loader.consumed_samples))
    same_step()
    both(lambda loader: loader.load_state_dict({"consumed_samples": 8, "skipped_batches": [16]}))
    same_step()
    same_step()
    both(lambda loader: loader.load_state_dict({"consumed_samples": 200}))
    same_step()
    assert plain.state_dict() == ahead.state_dict()
