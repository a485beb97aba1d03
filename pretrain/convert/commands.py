"""The conversions, as functions (the command line in `__main__` only parses arguments): to-hf and
verify here, from-hf in `pretrain.convert.import_hf`.

Outputs are written into a temporary sibling and renamed into place when complete (and, for
`to_hf`, verified), so OUTPUT is either absent or whole: an interrupted or rejected conversion never
leaves something that looks like a model under the name asked for.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pretrain.convert.hf import DTYPE_NAMES, hf_config, model_config_from_hf, to_hf_name
from pretrain.convert.hf_moe import REFUSED, Family, export_family, hf_entries, nonzero_bias_problem
from pretrain.convert.import_hf import from_hf, training_overrides
from pretrain.convert.output import Report, _fresh_output, _move_into_place, _Progress
from pretrain.convert.source import Weights, open_weights
from pretrain.convert.verify import missing_class_problem
from pretrain.errors import ConversionError
from pretrain.model.names import stored_shapes
from pretrain.provenance import code_version
from pretrain.weights.consolidated import write_consolidated
from pretrain.weights.safetensors_io import SafetensorsWriter, parse_size, plan_shards, shard_file_names

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Selection-only state that rounding would change the routing of: kept in fp32 in every export (as
# transformers keeps Glm4Moe's e_score_correction_bias in fp32).
FP32_TENSORS = (".mlp.router.expert_bias",)


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
    model = weights.model
    trained = weights.config.model.moe.bias_update_rate > 0 if weights.config is not None else False
    family = export_family(model, expert_bias_moves=trained and model.moe.score_func == "softmax")
    out_dtype = _export_dtype(dtype, weights)
    if verify and (problem := missing_class_problem(family.architecture)) is not None:
        raise ConversionError(
            f"{problem}, or pass --no-verify and run `python -m pretrain.convert verify` where a newer "
            f"transformers is installed; nothing was written"
        )
    tmp = _fresh_output(output, overwrite)
    tmp.mkdir(parents=True)
    try:
        report = Report(output, [], dict(weights.provenance))
        report.notes.append(f"class: {family.architecture}")
        if family.router_bias:
            report.notes.append(
                "(DeepSeek-V3's router and MoE block; not DeepseekV3ForCausalLM, whose multi-head latent "
                "attention ours is not: docs/CONVERT.md)"
            )
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

        names = _write_hf_shards(tmp, weights, family, out_dtype, parse_size(max_shard_size))
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

        if model.moe.enabled and not model.moe.dropless:
            report.notes.append(
                "dropless=false: the Hugging Face class is dropless (no capacity); verification compares our "
                "model computing every (token, expert) pair, as it does at inference without a capacity"
            )
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
    tensors = ((n, t.to(_tensor_dtype(n, dtype))) for n, t in weights.tensors())
    return verify_export(folder, build_model(weights.model, tensors))


def _tensor_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.endswith(FP32_TENSORS) else dtype


def verify_hf(folder: str | Path, checkpoint: str | Path, config: str | Path | None = None) -> Any:
    """Check an existing export (e.g. one written with --no-verify) against the checkpoint it came from."""
    from pretrain.weights.consolidated import architecture_differences

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json; give the folder to-hf wrote")
    hf = json.loads((folder / "config.json").read_text())
    for architecture in hf.get("architectures") or []:
        if (problem := missing_class_problem(architecture)) is not None:
            raise ConversionError(problem)
    weights = open_weights(checkpoint, config)
    differences = architecture_differences(model_config_from_hf(hf, str(folder)), weights.model)
    if differences:
        raise ConversionError(
            f"{folder}/config.json does not describe the checkpoint's model:\n"
            + "\n".join(f"  - {d}" for d in differences)
        )
    names = {v: k for k, v in DTYPE_NAMES.items()}
    return _verify(folder, weights, names.get(hf.get("dtype") or hf.get("torch_dtype"), torch.float32))


def _write_hf_shards(
    folder: Path, weights: Weights, family: Family, dtype: torch.dtype, max_shard_bytes: int
) -> list[str]:
    shapes = stored_shapes(weights.model)
    entries = {n: hf_entries(family, weights.model, n, tuple(s), to_hf_name) for n, s in shapes.items()}
    sizes = [
        (name, sum(math.prod(s) for _, s, _ in entries[name]) * _tensor_dtype(name, dtype).itemsize)
        for name in shapes
    ]
    plan = plan_shards(sizes, max_shard_bytes)
    files = shard_file_names(len(plan))
    tensors = _checked(family, _Progress(len(shapes), "exported").wrap(weights.tensors()))
    weight_map, total = {}, 0
    for file, names in zip(files, plan, strict=True):
        header = [(hf, _tensor_dtype(n, dtype), s) for n in names for hf, s, _ in entries[n]]
        with SafetensorsWriter(folder / file, header, {"format": "pt"}) as writer:
            for expected in names:
                name, tensor = next(tensors)
                assert name == expected, (name, expected)
                tensor = tensor.to(_tensor_dtype(name, dtype))
                for hf, shape, part in entries[name]:
                    value = _part(tensor, shape, part)
                    writer.write(hf, value.contiguous())
                    weight_map[hf] = file
                    total += value.numel() * value.dtype.itemsize
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _part(tensor: torch.Tensor, shape: tuple[int, ...], part: int | str | None) -> torch.Tensor:
    """What a Hub tensor holds of ours: all of it, one expert, twice it, or nothing (zeros)."""
    if isinstance(part, int):
        return tensor[part]
    if part == "double":
        return tensor * 2
    return tensor if part is None else tensor.new_zeros(shape)


def _checked(
    family: Family, tensors: Iterator[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream, refused where a router's balancing bias would be lost (a softmax-routed class has none)."""
    for name, tensor in tensors:
        if name.endswith(".expert_bias") and not family.router_bias and tensor.any():
            raise ConversionError(f"{REFUSED}:\n  - {name} is not zero: {nonzero_bias_problem()}")
        yield name, tensor


def _tokenizer_beside(weights: Weights) -> Path | None:
    """Consolidated weights from `from-hf` keep the model's tokenizer files in their folder."""
    if weights.run_dir is not None and (weights.run_dir / "tokenizer.json").is_file():
        return weights.run_dir
    return None


def _max_positions(weights: Weights) -> int:
    return int(weights.provenance.get("max_position_embeddings", 4096))


# ---------------------------------------------------------------------------------------------


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


__all__ = ["DTYPES", "Report", "from_hf", "to_fp32", "to_hf", "training_overrides", "verify_hf"]
