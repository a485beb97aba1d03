"""Tokenizers: train a byte-level BPE, or load any `tokenizer.json` / Hugging Face tokenizer folder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pretrain.data.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# End-of-document tokens of common tokenizer families, tried in order for tokenizers we did not train.
_EOS_CANDIDATES = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class Tokenizer:
    """A `tokenizers.Tokenizer` with the ids the data pipeline needs and a content hash."""

    def __init__(self, inner: object, source: str):
        from tokenizers import Tokenizer as HFTokenizer

        assert isinstance(inner, HFTokenizer)
        self.inner, self.source = inner, source
        vocab = inner.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        eod = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
        if eod is None:
            raise DataError(
                f"tokenizer {source} has no end-of-document token (looked for {', '.join(_EOS_CANDIDATES)}); "
                f"add one as a special token, or train one with `python -m pretrain.data train-tokenizer`"
            )
        self.eod_id: int = eod
        self.bos_id: int | None = vocab.get(BOS)
        self.pad_id: int | None = vocab.get(PAD)
        self.content_hash = hashlib.sha256(inner.to_str().encode()).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
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
    return Tokenizer(inner, str(file))


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: any byte sequence encodes, nothing is unknown) with BOS/EOS/PAD.
    Writes tokenizer.json plus the small config files that make the folder load with
    `transformers.AutoTokenizer.from_pretrained`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    inner.save(str(output / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None}
    (output / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in specials.items() if v}, indent=2)
    )
    (output / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 1 << 30,
                "clean_up_tokenization_spaces": False,
                **specials,
            },
            indent=2,
        )
    )
    return Tokenizer(inner, str(output / "tokenizer.json"))
