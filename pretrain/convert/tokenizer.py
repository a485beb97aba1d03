"""The tokenizer a run was trained with, written next to its Hugging Face export.

- Prepared data (`data.paths`): the dataset's manifest records the tokenizer path `prepare` was
  given and the tokenizer's content hash. The files are copied if that path still holds the same
  tokenizer (same hash); `--tokenizer` points elsewhere when it moved, and is checked the same way.
- The built-in corpus (no `data.paths`): bytes are tokens 0-255 and end-of-document is 256
  (`pretrain.data.ByteTokenizer`). The export writes the same mapping as a `tokenizers` byte-level
  tokenizer (no merges: every byte is one token), so `AutoTokenizer.from_pretrained` gives the ids
  training saw.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.config import Config
from pretrain.data.tokenizer import MODEL_INPUT_NAMES, write_hf_tokenizer_config
from pretrain.errors import ConversionError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BYTE_EOS = "<|eos|>"


@dataclass
class ExportedTokenizer:
    description: str
    vocab_size: int
    special_tokens: dict[str, int | None]  # bos, eos, pad ids for config.json / generation_config.json


def run_tokenizer(cfg: Config, override: str | Path | None = None) -> Path | None:
    """The tokenizer (a tokenizer.json or a folder holding one) of the run's data; None for the
    built-in byte-level corpus."""
    from pretrain.data.manifest import load_manifest
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.errors import DataError

    if not cfg.data.paths:
        if override is not None:
            raise ConversionError(
                "--tokenizer was given but the run trained on the built-in byte-level corpus"
            )
        return None
    dataset = cfg.data.paths[0]
    try:
        manifest = load_manifest(dataset)
    except DataError as e:
        raise ConversionError(
            f"cannot read the dataset manifest to find the run's tokenizer ({e}); pass --tokenizer PATH"
        ) from e
    path = Path(override) if override is not None else Path(str(manifest.source.get("tokenizer", "")))
    if not path.exists():
        raise ConversionError(
            f"the tokenizer {str(path)!r} that {dataset} was prepared with is not there any more; "
            f"pass --tokenizer PATH (its hash is checked against the dataset's)"
        )
    try:
        found = load_tokenizer(path).content_hash
    except DataError as e:
        raise ConversionError(str(e)) from e
    if found != manifest.tokenizer_hash:
        raise ConversionError(
            f"the tokenizer at {path} (hash {found[:12]}) is not the one {dataset} was prepared with "
            f"(hash {manifest.tokenizer_hash[:12]}); pass the right one as --tokenizer"
        )
    return path


def export_tokenizer(source: Path | None, output: Path, model_vocab_size: int) -> ExportedTokenizer:
    """Write a tokenizer folder `AutoTokenizer.from_pretrained(output)` loads."""
    from pretrain.data.tokenizer import load_tokenizer

    output.mkdir(parents=True, exist_ok=True)
    if source is None:
        inner = byte_level_tokenizer()
        inner.save(str(output / "tokenizer.json"))
        write_hf_tokenizer_config(output, eos=BYTE_EOS, bos=None, pad=None)
        exported = ExportedTokenizer("UTF-8 bytes (ids 0-255) + <|eos|> (256)", 257, {"eos": 256})
    else:
        folder = source if source.is_dir() else source.parent
        copied = [name for name in HF_TOKENIZER_FILES if (folder / name).is_file()]
        if source.is_file() and source.name != "tokenizer.json":
            shutil.copyfile(source, output / "tokenizer.json")
            copied = ["tokenizer.json"]
        for name in copied:
            if not (output / name).exists():
                shutil.copyfile(folder / name, output / name)
        loaded = load_tokenizer(output)
        if "tokenizer_config.json" not in copied:
            vocab = {i: t for t, i in loaded.inner.get_vocab(with_added_tokens=True).items()}
            write_hf_tokenizer_config(
                output,
                eos=vocab[loaded.eod_id],
                bos=vocab.get(loaded.bos_id) if loaded.bos_id is not None else None,
                pad=vocab.get(loaded.pad_id) if loaded.pad_id is not None else None,
            )
        else:
            _complete_tokenizer_config(output)
        exported = ExportedTokenizer(
            str(source), loaded.vocab_size, {"eos": loaded.eod_id, "bos": loaded.bos_id, "pad": loaded.pad_id}
        )
    if exported.vocab_size > model_vocab_size:
        raise ConversionError(
            f"the tokenizer has {exported.vocab_size} tokens but the model only {model_vocab_size} rows; "
            f"this tokenizer does not belong to this model"
        )
    return exported


def byte_level_tokenizer() -> Any:
    """`pretrain.data.ByteTokenizer` as a `tokenizers.Tokenizer`: byte b is token b, EOS is 256.

    The byte-level pre-tokenizer maps each byte to a printable character (GPT-2's table); a BPE model
    with those 256 characters as its vocabulary and no merges then gives one token per byte.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # The alphabet is a set; order it by the byte each character stands for.
    table = _bytes_to_unicode()
    assert set(table.values()) == set(byte_chars)
    vocab = {table[b]: b for b in range(256)}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens([AddedToken(BYTE_EOS, special=True)])
    return inner


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what `ByteLevel` uses)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _complete_tokenizer_config(output: Path) -> None:
    """A copied tokenizer_config.json (an older `train-tokenizer` folder, another project's tokenizer)
    made to feed the exported Llama model what it takes: transformers 4.x otherwise also returns
    token_type_ids, which `model.generate(**tokenizer(text, return_tensors="pt"))` refuses."""
    path = output / "tokenizer_config.json"
    config = json.loads(path.read_text())  # load_tokenizer has read it: valid JSON
    config["model_input_names"] = MODEL_INPUT_NAMES
    config.setdefault("padding_side", "left")
    path.write_text(json.dumps(config, indent=2) + "\n")
