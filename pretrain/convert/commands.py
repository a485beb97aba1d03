"""The three conversions, as functions (the command line in `__main__` only parses arguments).

Outputs are written into a temporary sibling and renamed into place when complete (and, for
`to_hf`, verified), so OUTPUT is either absent or whole: an interrupted or rejected conversion never
leaves something that looks like a model under the name asked for.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.config import ModelConfig
from pretrain.convert.hf import (
    DTYPE_NAMES,
    IGNORED_HF_TENSORS,
    from_hf_name,
    hf_config,
    model_config_from_hf,
    to_hf_name,
)
from pretrain.convert.source import Weights, open_weights
from pretrain.errors import ConversionError
from pretrain.model.names import parameter_shapes, stored_shapes
from pretrain.provenance import code_version
from pretrain.weights.consolidated import WEIGHTS_FILE, model_config_to_json, write_consolidated
from pretrain.weights.safetensors_io import SafetensorsWriter, parse_size, plan_shards, shard_file_names

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class Report:
    output: Path
    files: list[str]
    provenance: dict[str, Any]
    verification: Any = None  # pretrain.convert.verify.Verification
    notes: list[str] = field(default_factory=list)


def _fresh_output(output: Path, overwrite: bool) -> Path:
    """A temporary sibling of `output` to write into."""
    if output.exists() and not overwrite:
        raise ConversionError(
            f"{output} already exists; choose another --output, or pass --overwrite to replace it"
        )
    tmp = output.with_name(f".{output.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return tmp


def _move_into_place(tmp: Path, output: Path) -> None:
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    tmp.rename(output)


class _Progress:
    """A line every few seconds while tensors stream (a 70B export takes a while)."""

    def __init__(self, total: int, verb: str):
        self.total, self.verb, self.done, self.last = total, verb, 0, time.monotonic()

    def wrap(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for item in tensors:
            self.done += 1
            if time.monotonic() - self.last > 10:
                self.last = time.monotonic()
                print(f"{self.verb} {self.done}/{self.total} tensors ({item[0]})", flush=True)
            yield item


def _export_dtype(requested: str, weights: Weights) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    trained = weights.provenance.get("precision")  # a training run, or to-fp32 of one
    if trained is None:  # from-hf: the dtype the Hugging Face model was stored in
        names = {v: k for k, v in DTYPE_NAMES.items()}
        return names.get(str(weights.provenance.get("source_dtype")), torch.float32)
    return DTYPES.get(str(trained), torch.float32)


# ---------------------------------------------------------------------------------------------


def to_hf(
    checkpoint: str | Path,
    output: str | Path,
    dtype: str = "auto",
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: str | Path | None = None,
    config: str | Path | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Report:
    """Export the newest complete checkpoint under `checkpoint` (or consolidated weights) as a
    Hugging Face Llama folder; with `verify`, refuse it unless transformers computes what we do."""
    from pretrain.convert.tokenizer import export_tokenizer, run_tokenizer

    output = Path(output)
    weights = open_weights(checkpoint, config)
    _refuse_mixture_of_experts(weights.model, "to-hf")
    model = weights.model
    out_dtype = _export_dtype(dtype, weights)
    tmp = _fresh_output(output, overwrite)
    tmp.mkdir(parents=True)
    try:
        report = Report(output, [], dict(weights.provenance))
        # Tokenizer first: its vocabulary is checked against the model before anything big is written.
        if weights.config is not None:
            source = run_tokenizer(weights.config, tokenizer)
        else:
            source = Path(tokenizer) if tokenizer else _tokenizer_beside(weights)
        if source is None and weights.config is None:
            report.notes.append("no tokenizer: the weights carry none; pass --tokenizer to include one")
            special: dict[str, int | None] = {}
        else:
            exported = export_tokenizer(source, tmp, model.vocab_size)
            special = exported.special_tokens
            report.notes.append(f"tokenizer: {exported.description}")

        names = _write_hf_shards(tmp, weights, out_dtype, parse_size(max_shard_size))
        max_positions = (
            weights.config.train.seq_len if weights.config is not None else _max_positions(weights)
        )
        provenance = {**weights.provenance, "exported_with": code_version()}
        (tmp / "config.json").write_text(
            json.dumps(hf_config(model, max_positions, out_dtype, special, provenance), indent=2) + "\n"
        )
        generation = {k: v for k, v in {"bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
                                         "pad_token_id": special.get("pad")}.items() if v is not None}  # fmt: skip
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        report.provenance = provenance
        report.files = names

        if verify:
            result = _verify(tmp, weights, out_dtype)
            report.verification = result
            if not result.passed:
                rejected = output.with_name(f"{output.name}.rejected")
                if rejected.exists():
                    shutil.rmtree(rejected)
                tmp.rename(rejected)
                raise ConversionError(
                    f"the export does not compute what the checkpoint computes; it was kept for inspection as "
                    f"{rejected}, not as {output}.\n{result.summary()}"
                )
        else:
            report.notes.append("not verified (--no-verify): transformers was not run on the export")
        _move_into_place(tmp, output)
        return report
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp)
        raise


def _verify(folder: Path, weights: Weights, dtype: torch.dtype) -> Any:
    from pretrain.convert.verify import build_model, verify_export

    # Our model gets the numbers the export holds: rounded to its dtype, computed in fp32.
    return verify_export(folder, build_model(weights.model, ((n, t.to(dtype)) for n, t in weights.tensors())))


def verify_hf(folder: str | Path, checkpoint: str | Path, config: str | Path | None = None) -> Any:
    """Check an existing export (e.g. one written with --no-verify) against the checkpoint it came from."""
    from pretrain.weights.consolidated import architecture_differences

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json; give the folder to-hf wrote")
    hf = json.loads((folder / "config.json").read_text())
    weights = open_weights(checkpoint, config)
    differences = architecture_differences(model_config_from_hf(hf, str(folder)), weights.model)
    if differences:
        raise ConversionError(
            f"{folder}/config.json does not describe the checkpoint's model:\n"
            + "\n".join(f"  - {d}" for d in differences)
        )
    names = {v: k for k, v in DTYPE_NAMES.items()}
    return _verify(folder, weights, names.get(hf.get("dtype") or hf.get("torch_dtype"), torch.float32))


def _write_hf_shards(folder: Path, weights: Weights, dtype: torch.dtype, max_shard_bytes: int) -> list[str]:
    shapes = parameter_shapes(weights.model)
    sizes = [(name, shape.numel() * dtype.itemsize) for name, shape in shapes.items()]
    plan = plan_shards(sizes, max_shard_bytes)
    files = shard_file_names(len(plan))
    tensors = _Progress(len(shapes), "exported").wrap(weights.tensors())
    weight_map = {}
    for file, names in zip(files, plan, strict=True):
        entries = [(to_hf_name(n), dtype, shapes[n]) for n in names]
        with SafetensorsWriter(folder / file, entries, {"format": "pt"}) as writer:
            for expected in names:
                name, tensor = next(tensors)
                assert name == expected, (name, expected)
                writer.write(to_hf_name(name), tensor.to(dtype))
                weight_map[to_hf_name(name)] = file
    if len(files) > 1:
        total = sum(size for _, size in sizes)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _tokenizer_beside(weights: Weights) -> Path | None:
    """Consolidated weights from `from-hf` keep the model's tokenizer files in their folder."""
    if weights.run_dir is not None and (weights.run_dir / "tokenizer.json").is_file():
        return weights.run_dir
    return None


def _max_positions(weights: Weights) -> int:
    return int(weights.provenance.get("max_position_embeddings", 4096))


# ---------------------------------------------------------------------------------------------


def _refuse_mixture_of_experts(model: Any, command: str) -> None:
    if model.moe.enabled:
        raise ConversionError(
            f"{command} of a mixture-of-experts model is not supported yet (no mapping onto a Hugging Face "
            "MoE class yet; docs/MOE.md, 'Not yet'); nothing was written. `python -m pretrain.convert to-fp32` "
            "consolidates it into this framework's own weights file"
        )


def to_fp32(
    checkpoint: str | Path, output: str | Path, config: str | Path | None = None, overwrite: bool = False
) -> Report:
    """Consolidated fp32 weights of the newest complete checkpoint under `checkpoint`: one safetensors
    file (see pretrain.weights.consolidated), usable as `checkpoint.init_weights`."""
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ConversionError(f"--output {output} should end in .safetensors")
    weights = open_weights(checkpoint, config)
    tmp = _fresh_output(output, overwrite)
    provenance = {**weights.provenance, "consolidated_with": code_version()}
    if weights.config is not None:
        provenance["max_position_embeddings"] = weights.config.train.seq_len
    count = len(stored_shapes(weights.model))
    try:
        write_consolidated(
            tmp, weights.model, _Progress(count, "consolidated").wrap(weights.tensors()), provenance
        )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _move_into_place(tmp, output)
    return Report(output, [output.name], provenance)


# ---------------------------------------------------------------------------------------------


def from_hf(
    model: str | Path, output: str | Path, allow_pickle: bool = False, overwrite: bool = False
) -> Report:
    """A Hugging Face Llama folder as consolidated fp32 weights the trainer starts from
    (`checkpoint.init_weights=OUTPUT`), with the folder's tokenizer files copied alongside."""
    from pretrain.convert.tokenizer import HF_TOKENIZER_FILES

    folder = Path(model)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder} has no config.json; give a Hugging Face model folder")
    hf = json.loads(config_file.read_text())
    cfg = model_config_from_hf(hf, str(folder))
    hf_tensors = _HFTensors(folder, allow_pickle)
    _check_hf_tensors(folder, cfg, hf_tensors)
    output = Path(output)
    tmp = _fresh_output(output, overwrite)
    tmp.mkdir(parents=True)
    provenance = {
        "framework": "transformers (LlamaForCausalLM)",
        "source": str(folder.resolve()),
        "max_position_embeddings": hf.get("max_position_embeddings"),
        "source_dtype": hf.get("dtype") or hf.get("torch_dtype"),
        "imported_with": code_version(),
    }
    try:
        for name in HF_TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        tensors = ((name, hf_tensors.get(to_hf_name(name))) for name in parameter_shapes(cfg))
        count = len(parameter_shapes(cfg))
        write_consolidated(tmp / WEIGHTS_FILE, cfg, _Progress(count, "imported").wrap(tensors), provenance)
        (tmp / "model_config.json").write_text(model_config_to_json(cfg) + "\n")
    except BaseException:
        shutil.rmtree(tmp)
        raise
    _move_into_place(tmp, output)
    report = Report(output, sorted(p.name for p in output.iterdir()), provenance)
    report.notes.append(
        "train from it with: " + " ".join(training_overrides(cfg)) + f" checkpoint.init_weights={output}"
    )
    return report


def training_overrides(cfg: ModelConfig) -> list[str]:
    """The model.* overrides that make a training config match `cfg`."""
    values = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.kv_heads,
        "ffn_hidden_size": cfg.ffn_size,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_embeddings": str(cfg.tie_embeddings).lower(),
    }
    return [f"model.{k}={v}" for k, v in values.items()]


class _HFTensors:
    """A Hugging Face folder's tensors by name, read lazily (one tensor at a time)."""

    def __init__(self, folder: Path, allow_pickle: bool):
        from safetensors import safe_open

        self._pickled: dict[str, torch.Tensor] = {}
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self._where = json.loads(index.read_text())["weight_map"]
        elif not (folder / "model.safetensors").is_file():
            self._load_pickles(folder, allow_pickle)
            return
        for file in sorted(set(self._where.values())) or ["model.safetensors"]:
            if not (folder / file).is_file():
                raise ConversionError(
                    f"{folder / file} is missing (listed in {index.name}); download it again"
                )
            self._files[file] = safe_open(str(folder / file), framework="pt")
        if not self._where:
            self._where = {name: "model.safetensors" for name in self._files["model.safetensors"].keys()}  # noqa: SIM118
        self.names = set(self._where)

    def _load_pickles(self, folder: Path, allow_pickle: bool) -> None:
        pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
        if not pickles:
            raise ConversionError(
                f"{folder} holds no model.safetensors (or its index) and no pytorch_model.bin"
            )
        if not allow_pickle:
            raise ConversionError(
                f"{folder} holds only pickled weights ({', '.join(pickles)}); loading a pickle runs code from the "
                f"file. Convert it to safetensors with transformers, or pass --allow-pickle if you trust its source"
            )
        for file in pickles:
            self._pickled.update(torch.load(folder / file, map_location="cpu", mmap=True, weights_only=False))
        self.names = set(self._pickled)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled:
            return tuple(self._pickled[name].shape)
        return tuple(self._files[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if self._pickled:
            return self._pickled[name].float()
        return self._files[self._where[name]].get_tensor(name).float()


def _check_hf_tensors(folder: Path, cfg: ModelConfig, tensors: _HFTensors) -> None:
    """Every tensor the model needs is there with its shape; nothing else is (R2.4: no silent loss)."""
    expected = {to_hf_name(n): s for n, s in parameter_shapes(cfg).items()}
    problems = [f"tensor {name} is missing" for name in sorted(set(expected) - tensors.names)]
    extra = sorted(n for n in tensors.names - set(expected) if not IGNORED_HF_TENSORS.fullmatch(n))
    for name in extra:
        if name == "lm_head.weight" and cfg.tie_embeddings:  # some exports store the tied copy too
            if not torch.equal(tensors.get(name), tensors.get("model.embed_tokens.weight")):
                problems.append(
                    "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
                )
            continue
        known = from_hf_name(name) is not None
        problems.append(
            f"unexpected tensor {name}" + ("" if known else " (not part of a Llama model we can train)")
        )
    for name in sorted(set(expected) & tensors.names):
        found = tensors.shape(name)
        if found != tuple(expected[name]):
            problems.append(
                f"tensor {name} has shape {list(found)}, config.json implies {list(expected[name])}"
            )
    if problems:
        raise ConversionError(
            f"{folder} does not match its config.json:\n" + "\n".join(f"  - {p}" for p in problems)
        )


__all__ = ["DTYPES", "Report", "from_hf", "to_fp32", "to_hf", "training_overrides", "verify_hf"]
