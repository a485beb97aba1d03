"""The built-in corpus and the rank-independent batch order."""

import numpy as np
import pytest

from pretrain.data import ByteTokenizer, DistributedBatches, PackedSamples
from pretrain.data.builtin import stdlib_documents, stdlib_tokens


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
        first_epoch += a.step_sample_ids(a.consumed_samples)[0]
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
    with pytest.raises(ValueError, match="fewer than seq_len"):
        DistributedBatches(PackedSamples(np.arange(5, dtype=np.uint16), 8), 0, 2, 1, 0, 1)
