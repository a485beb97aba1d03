"""What the data must provide for a config, checked once for both ways of asking: loading the data
(the real run, which then memory-maps the shards) and `check_from_metadata` (--dry-run, which reads
only the manifests, or the built-in corpus's file sizes), so both refuse the same things alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.config import Config, DataConfig
from pretrain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pretrain.data.manifest import Manifest


def training_cut(total: int, validation_fraction: float) -> int:
    """Where a dataset's held-out validation tail starts: its last validation_fraction of tokens."""
    return total - round(validation_fraction * total)


def check_training_samples(
    name: str, total: int, train_tokens: int, seq_len: int, validation_fraction: float
) -> None:
    """A sample is seq_len + 1 tokens (inputs and shifted labels); a dataset must hold one."""
    if train_tokens < seq_len + 1:
        raise DataError(
            f"dataset {name} holds {total} tokens, fewer than one training sample of seq_len + 1 = {seq_len + 1} "
            f"after holding out data.validation_fraction={validation_fraction}; add data or shorten train.seq_len"
        )


def check_one_tokenizer(names: Sequence[str], hashes: Sequence[str]) -> None:
    if len(set(hashes)) > 1:
        listing = "; ".join(f"{name}: {h[:12]}" for name, h in zip(names, hashes, strict=True))
        raise DataError(
            f"the datasets in data.paths were tokenized with different tokenizers ({listing}); "
            f"prepare them all with the same tokenizer"
        )


def check_vocabulary(model_vocab_size: int, data_vocab_size: int, names: Sequence[str]) -> None:
    if data_vocab_size > model_vocab_size:
        raise ConfigError(
            [
                f"model.vocab_size ({model_vocab_size}) is smaller than the vocabulary of the tokenizer the data "
                f"was made with ({data_vocab_size}, datasets {', '.join(names)}); "
                f"set model.vocab_size >= {data_vocab_size}"
            ]
        )


def check_from_metadata(cfg: Config) -> None:
    """The checks loading the data makes, in its order, from metadata alone: no shard is opened and
    a remote dataset's manifest is the only file fetched. (What only the shards can tell, their
    sizes and checksums against the manifest, waits for the real run.)"""
    from pretrain.data import BUILTIN_NAME
    from pretrain.data.builtin import ByteTokenizer, stdlib_token_counts

    data, seq_len = cfg.data, cfg.train.seq_len
    if not data.paths:
        train, validation = stdlib_token_counts(data.validation_fraction)
        check_training_samples(BUILTIN_NAME, train + validation, train, seq_len, data.validation_fraction)
        check_vocabulary(cfg.model.vocab_size, ByteTokenizer.vocab_size, [BUILTIN_NAME])
        return
    names, hashes, vocab_sizes = [], [], []
    for path in data.paths:
        manifest = _manifest(path, data)
        total = manifest.num_tokens
        cut = training_cut(total, data.validation_fraction)
        check_training_samples(path, total, cut, seq_len, data.validation_fraction)
        names.append(dataset_name(path))
        hashes.append(manifest.tokenizer_hash)
        vocab_sizes.append(manifest.vocab_size)
    check_one_tokenizer(names, hashes)
    check_vocabulary(cfg.model.vocab_size, max(vocab_sizes), names)


def dataset_name(path: str) -> str:
    return Path(path.rstrip("/")).name or path


def unreadable(path: str, error: OSError) -> DataError:
    """Unreadable, not missing (that is checked, with its fix): permissions, I/O."""
    return DataError(f"dataset {path} cannot be read ({error}); check the files and their permissions")


def _manifest(path: str, data: DataConfig) -> Manifest:
    from pretrain.data.manifest import MANIFEST, load_manifest, parse_manifest, require_tokens
    from pretrain.data.remote import RetryPolicy, fetch_manifest, is_remote

    try:
        if is_remote(path):
            manifest = fetch_manifest(path, RetryPolicy.of(data))
            return require_tokens(path, parse_manifest(manifest, f"{path.rstrip('/')}/{MANIFEST}"))
        return require_tokens(path, load_manifest(path))
    except OSError as e:
        raise unreadable(path, e) from e
