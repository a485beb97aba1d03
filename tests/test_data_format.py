"""Megatron indexed-dataset shards: the bytes we write, the bytes we read, and broken files."""

import struct
import tracemalloc

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


def test_bulk_and_single_writes_give_the_same_bytes_and_narrowing_is_checked(tmp_path):
    write(tmp_path / "one", DOCS)
    writer = IndexedDatasetWriter(tmp_path / "bulk", np.uint16)
    writer.add_documents(np.concatenate(DOCS[:2]), np.array([4, 2]))
    writer.add_document(np.asarray(DOCS[2], dtype=np.int64))
    writer.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"bulk{ext}").read_bytes()
    narrow = IndexedDatasetWriter(tmp_path / "narrow", np.uint16)
    with pytest.raises(ValueError, match=r"narrow: token ids 1\.\.70000 do not fit uint16"):
        narrow.add_document(np.array([70_000, 1]))
    narrow.abort()
    assert not list(tmp_path.glob("narrow*"))


def test_tokens_are_a_read_only_map_and_an_empty_shard_loads(tmp_path):
    write(tmp_path / "s", DOCS)
    shard = IndexedDataset(tmp_path / "s")
    assert isinstance(shard.tokens, np.memmap) and not shard.tokens.flags.writeable
    assert len(shard) == 3 and shard.document_indices.tolist() == [0, 1, 2, 3]
    write(tmp_path / "empty", [])
    empty = IndexedDataset(tmp_path / "empty")
    assert (empty.num_documents, empty.num_tokens, len(empty.tokens)) == (0, 0, 0)


def test_a_corrupt_document_index_or_dtype_code_is_named(tmp_path):
    write(tmp_path / "s", DOCS)
    raw = bytearray((tmp_path / "s.idx").read_bytes())
    raw[-8:] = struct.pack("<q", 7)  # the last document index entry must equal the sequence count
    (tmp_path / "s.idx").write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"s\.idx has a document index .* re-run prepare"):
        IndexedDataset(tmp_path / "s")
    raw[-8:] = struct.pack("<q", 3)
    raw[17] = 9  # no such dtype code
    (tmp_path / "s.idx").write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"s\.idx has unknown dtype code 9"):
        IndexedDataset(tmp_path / "s")


def test_pointers_and_sizes_read_independently_with_numpy(tmp_path):
    docs = [list(range(2, 2 + n)) for n in (3, 1, 5, 2)]
    write(tmp_path / "s", docs, np.int32)
    raw = (tmp_path / "s.idx").read_bytes()
    header = np.frombuffer(raw, dtype=np.dtype([("magic", "S9"), ("version", "<u8"), ("code", "u1"),
                                                ("seqs", "<u8"), ("docs", "<u8")]), count=1)[0]  # fmt: skip
    assert (header["magic"], header["version"], header["code"], header["seqs"], header["docs"]) == (
        b"MMIDIDX", 1, 4, 4, 5,  # numpy strips the magic's trailing NULs
    )  # fmt: skip
    sizes = np.frombuffer(raw, "<i4", 4, 34)
    pointers = np.frombuffer(raw, "<i8", 4, 34 + 16)
    bin_tokens = np.fromfile(tmp_path / "s.bin", dtype="<i4")
    assert [bin_tokens[p // 4 : p // 4 + n].tolist() for p, n in zip(pointers, sizes, strict=True)] == docs


def test_an_open_shard_holds_no_private_copy_of_its_index(tmp_path):
    """The .idx is memory-mapped (page cache, shared by a node's ranks), not read into each rank:
    20 bytes per document, 4 MB here, 200 MB per rank for a 1e10-token dataset of 500-token documents.
    tracemalloc sees Python and numpy allocations, not mappings; the open shard keeps ~2 KB of
    objects (100 KB bound for other versions), where a read .idx would keep all 4 MB."""
    writer = IndexedDatasetWriter(tmp_path / "many", np.uint16)
    writer.add_documents(np.ones(200_000, dtype=np.uint16), np.ones(200_000, dtype=np.int32))
    writer.finalize()
    tracemalloc.start()
    try:
        shard = IndexedDataset(tmp_path / "many")
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert shard.num_documents == 200_000 and int(shard.sizes.sum()) == 200_000
    assert held < 100 * 1024, held
