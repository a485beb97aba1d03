"""The resharding cache's reader in one process: the slices it returns are the full tensor's (padded,
TP-split, flat ranges across rows), it counts only the elements it reads, and a damaged file is a
CheckpointError naming the file and the fix."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save

from pretrain.checkpoint.cache_reader import CacheFile, CacheReads, TensorSlice
from pretrain.errors import CheckpointError

VOCAB, HIDDEN, PADDED = 10, 4, 16


def write(folder, name, shape):
    tensors = {k: torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) * (i + 1)
               for i, k in enumerate(("fp32", "exp_avg", "exp_avg_sq"))}  # fmt: skip
    (folder / f"{name}.safetensors").write_bytes(save(tensors))
    return tensors


def layout(tp, tp_rank):
    return SimpleNamespace(padded_vocab_size=PADDED), SimpleNamespace(tp=tp, tp_rank=tp_rank, ep=1, ep_rank=0)


def padded(full):
    return torch.cat([full, full.new_zeros(PADDED - full.shape[0], *full.shape[1:])])


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_vocabulary_slice_is_padded_and_padding_is_not_read(tmp_path, tp_rank):
    full = write(tmp_path, "embedding.weight", (VOCAB, HIDDEN))["exp_avg"]
    part = TensorSlice.of("embedding.weight", (VOCAB, HIDDEN), *layout(2, tp_rank))
    reads = CacheReads()
    with CacheFile(tmp_path, "embedding.weight", (VOCAB, HIDDEN), reads) as f:
        got = f.whole("exp_avg", part)
    assert torch.equal(got, padded(full)[tp_rank * 8 : (tp_rank + 1) * 8])
    real_rows = min(VOCAB, 8 * (tp_rank + 1)) - 8 * tp_rank
    assert reads.read["exp_avg"] == real_rows * HIDDEN * 4  # only rows the file holds


@pytest.mark.parametrize(("start", "size"), [(0, 5), (3, 9), (13, 20), (30, 6), (40, 4)])
def test_flat_range_of_a_column_slice(tmp_path, start, size):
    """o_proj is split along dim 1: a flat range of the TP slice spans rows of its columns; past the
    end it is zeros (ZeRO-3's padded last partition)."""
    name, shape = "blocks.0.attn.o_proj.weight", (8, 8)
    full = write(tmp_path, name, shape)["fp32"]
    part = TensorSlice.of(name, shape, *layout(2, 1))
    reads = CacheReads()
    with CacheFile(tmp_path, name, shape, reads) as f:
        got = f.flat("fp32", part, start, size)
    expected = torch.zeros(size)
    wanted = full[:, 4:].flatten()[start : start + size]
    expected[: wanted.numel()] = wanted
    assert torch.equal(got, expected)
    if wanted.numel():  # whole rows of 4 around the range: at most one partial row each side
        assert wanted.numel() * 4 <= reads.read["fp32"] <= (wanted.numel() + 2 * 3) * 4
    else:
        assert reads.read["fp32"] == 0


def test_the_cache_size_is_the_whole_caches():
    reads = CacheReads.of_cache({"embedding.weight": (VOCAB, HIDDEN), "norm.weight": (HIDDEN,)})
    assert reads.cache == dict.fromkeys(("fp32", "exp_avg", "exp_avg_sq"), (VOCAB + 1) * HIDDEN * 4)
    reads.read["exp_avg"] = reads.cache["exp_avg"]
    assert reads.fraction() == pytest.approx(1 / 3) and reads.fraction(("exp_avg",)) == 1


def test_a_truncated_cache_file_names_the_file_and_the_fix(tmp_path):
    write(tmp_path, "norm.weight", (HIDDEN,))
    path = tmp_path / "norm.weight.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(
        CheckpointError, match=r"norm.weight.safetensors cannot be read .*truncated or corrupt.*delete"
    ):
        CacheFile(tmp_path, "norm.weight", (HIDDEN,), CacheReads())


def test_a_cache_file_of_another_shape_is_refused(tmp_path):
    write(tmp_path, "norm.weight", (HIDDEN + 1,))
    with pytest.raises(CheckpointError, match=r"the model needs F32 \[4\]"):
        CacheFile(tmp_path, "norm.weight", (HIDDEN,), CacheReads())


def test_a_missing_cache_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"norm\.weight\.safetensors cannot be read"):
        CacheFile(tmp_path, "norm.weight", (HIDDEN,), CacheReads())
