"""Tokenizers: train a byte-level BPE, or load any `tokenizer.json` / Hugging Face tokenizer folder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pretrain.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# What a causal LM takes. Without this list transformers 4.x's fast tokenizers also return
# token_type_ids, and `model.generate(**tokenizer(text, return_tensors="pt"))` refuses them.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
# Special tokens of common tokenizer families, tried in order when a tokenizer's folder does not name
# them (tokenizer_config.json / special_tokens_map.json), e.g. a bare tokenizer.json.
_EOS_CANDIDATES = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
_BOS_CANDIDATES = (BOS, "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_PAD_CANDIDATES = (PAD, "<pad>", "<|padding|>", "[PAD]")


class Tokenizer:
    """A `tokenizers.Tokenizer` with the ids the data pipeline needs and a content hash."""

    def __init__(self, inner: object, source: str, named: dict[str, str] | None = None):
        """`named`: special tokens a Hugging Face folder declares ({"eos_token": "</s>", ...}); they win
        over the guesses from common names."""
        from tokenizers import Tokenizer as HFTokenizer

        assert isinstance(inner, HFTokenizer)
        self.inner, self.source = inner, source
        named = named or {}
        vocab = inner.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1

        def find(key: str, candidates: tuple[str, ...]) -> int | None:
            names = [named[key]] if key in named else []
            return next((vocab[t] for t in [*names, *candidates] if t in vocab), None)

        eod = find("eos_token", _EOS_CANDIDATES)
        if eod is None:
            raise DataError(
                f"tokenizer {source} has no end-of-document token (looked for {', '.join(_EOS_CANDIDATES)} "
                f"and eos_token in tokenizer_config.json); add one as a special token, or train a tokenizer "
                f"with `python -m pretrain.data train-tokenizer`"
            )
        self.eod_id: int = eod
        self.bos_id: int | None = find("bos_token", _BOS_CANDIDATES)
        self.pad_id: int | None = find("pad_token", _PAD_CANDIDATES)
        # Recorded with data and checkpoints: the same JSON (vocabulary, merges, normalisation) gives
        # the same ids, so equal hashes mean interchangeable tokenizers.
        self.content_hash = hashlib.sha256(inner.to_str().encode()).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids without added BOS/EOS (the pipeline appends the end-of-document itself). The fast
        variant skips character offsets, which nobody here reads: ~1.6x the throughput."""
        encode = getattr(self.inner, "encode_batch_fast", self.inner.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=False)


def _named_special_tokens(folder: Path) -> dict[str, str]:
    """Special tokens a Hugging Face tokenizer folder declares, as plain strings."""
    named: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON ({e}); fix or delete it") from e
        for key in ("eos_token", "bos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str):
                named[key] = value
    return named


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` file, or a folder holding one (a Hugging Face tokenizer folder)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"no tokenizer at {path} (expected a tokenizer.json or a folder holding one); "
            f"train one with `python -m pretrain.data train-tokenizer`"
        )
    try:
        inner = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{file} is not a readable tokenizer.json: {e}") from e
    return Tokenizer(inner, str(file), _named_special_tokens(file.parent))


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: any byte sequence encodes, nothing is unknown) with BOS/EOS/PAD.
    Writes tokenizer.json plus the small config files that make the folder load with
    `transformers.AutoTokenizer.from_pretrained`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    smallest = 256 + 3  # every byte plus BOS/EOS/PAD
    if vocab_size < smallest:
        raise DataError(f"--vocab-size {vocab_size} is too small; byte-level BPE needs at least {smallest}")
    seen = 0

    def counted(texts: Iterable[str]) -> Iterator[str]:
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(counted(texts), trainer)
    if seen == 0:
        raise DataError("the tokenizer's training input holds no documents; check --input and --text-field")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    inner.save(str(output / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (output / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    write_hf_tokenizer_config(output, eos=EOS, bos=BOS, pad=PAD)
    return load_tokenizer(output)


def write_hf_tokenizer_config(output: Path, eos: str, bos: str | None, pad: str | None) -> None:
    """The tokenizer_config.json that makes a folder with a tokenizer.json load with
    `transformers.AutoTokenizer` (4.x and 5.x) and feed `model.generate` what a causal LM takes."""
    specials = {"eos_token": eos, "bos_token": bos, "pad_token": pad}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_input_names": MODEL_INPUT_NAMES,
        # Batched generation continues each row from its last token: padding goes on the left.
        "padding_side": "left",
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
        **{k: v for k, v in specials.items() if v is not None},
    }
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
