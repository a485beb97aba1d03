"""Megatron indexed-dataset shards: the bytes we write, the bytes we read, and broken files."""

import struct

import numpy as np
import pytest

from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter, ShardError, best_dtype


def write(prefix, documents, dtype=np.uint16):
    writer = IndexedDatasetWriter(prefix, dtype)
    for doc in documents:
        writer.add_document(np.asarray(doc))
    writer.finalize()


DOCS = [[5, 6, 7, 1], [8, 1], [9, 10, 11, 12, 13, 1]]


def test_index_bytes_follow_the_megatron_layout_field_by_field(tmp_path):
    write(tmp_path / "s", DOCS)
    raw = (tmp_path / "s.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, sequences, documents = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, code, sequences, documents) == (1, 8, 3, 4)  # dtype code 8 = uint16; D = docs + 1
    offset = 9 + 8 + 1 + 8 + 8
    assert list(struct.unpack_from("<3i", raw, offset)) == [4, 2, 6]  # sizes (int32)
    assert list(struct.unpack_from("<3q", raw, offset + 12)) == [0, 8, 12]  # byte pointers (int64)
    assert list(struct.unpack_from("<4q", raw, offset + 36)) == [0, 1, 2, 3]  # document index (int64)
    assert len(raw) == offset + 36 + 32
    assert (tmp_path / "s.bin").read_bytes() == np.concatenate(DOCS).astype("<u2").tobytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_shard_built_by_hand_in_the_published_layout_loads(tmp_path):
    docs = [[70000, 1], [2, 3, 70001]]  # int32 tokens (dtype code 4), as for vocabularies over 65,536
    tokens = np.concatenate(docs).astype("<i4")
    (tmp_path / "h.bin").write_bytes(tokens.tobytes())
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2, 3)
    body = struct.pack("<2i", 2, 3) + struct.pack("<2q", 0, 8) + struct.pack("<3q", 0, 1, 2)
    (tmp_path / "h.idx").write_bytes(header + body)
    shard = IndexedDataset(tmp_path / "h")
    assert shard.dtype == np.int32 and shard.num_documents == 2 and shard.num_tokens == 5
    assert [shard.document(i).tolist() for i in range(2)] == docs
    assert shard.tokens.tolist() == tokens.tolist()


def test_dtype_fits_the_vocabulary(tmp_path):
    assert best_dtype(65_536) is np.uint16 and best_dtype(65_537) is np.int32
    write(tmp_path / "wide", [[100_000, 1]], np.int32)
    assert IndexedDataset(tmp_path / "wide").document(0).tolist() == [100_000, 1]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "s.bin").write_bytes((d / "s.bin").read_bytes()[:-2]), r"s\.bin holds 22 bytes .* truncated"),
        (lambda d: (d / "s.idx").write_bytes((d / "s.idx").read_bytes()[:-8]), r"s\.idx holds .* truncated"),
        (lambda d: (d / "s.idx").write_bytes(b"NOTMAGIC!" + (d / "s.idx").read_bytes()[9:]), r"s\.idx is not a Megatron"),
        (lambda d: (d / "s.idx").write_bytes((d / "s.idx").read_bytes()[:9] + struct.pack("<Q", 2) + (d / "s.idx").read_bytes()[17:]), r"index version 2"),
        (lambda d: (d / "s.idx").write_bytes((d / "s.idx").read_bytes()[:10]), r"s\.idx is truncated"),
        (lambda d: (d / "s.bin").unlink(), r"s\.bin does not exist"),
    ],
)  # fmt: skip
def test_broken_shards_are_named_with_the_fix(tmp_path, damage, message):
    write(tmp_path / "s", DOCS)
    damage(tmp_path)
    with pytest.raises(ShardError, match=message) as info:
        IndexedDataset(tmp_path / "s")
    assert "re-run" in str(info.value) or "only version" in str(info.value)
