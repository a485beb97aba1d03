"""`from-hf`: a Hugging Face folder (Llama, Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral, Glm4Moe) as
consolidated fp32 weights the trainer starts from (`checkpoint.init_weights`), the routers'
balancing bias included."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pretrain.config import ModelConfig
from pretrain.convert.hf import IGNORED_HF_TENSORS, model_config_from_hf
from pretrain.convert.hf_moe import Entry, Family, family_of_hf, hf_entries
from pretrain.convert.output import Report, _fresh_output, _move_into_place, _Progress
from pretrain.errors import ConversionError
from pretrain.model.names import stored_shapes
from pretrain.provenance import code_version
from pretrain.weights.consolidated import WEIGHTS_FILE, model_config_to_json, write_consolidated


def from_hf(
    model: str | Path, output: str | Path, allow_pickle: bool = False, overwrite: bool = False
) -> Report:
    """A Hugging Face folder as consolidated fp32 weights the trainer starts from
    (`checkpoint.init_weights=OUTPUT`), with the folder's tokenizer files copied alongside."""
    folder = Path(model)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder} has no config.json; give a Hugging Face model folder")
    hf = json.loads(config_file.read_text())
    cfg = model_config_from_hf(hf, str(folder))
    family = family_of_hf(hf, [])
    assert family is not None  # model_config_from_hf refused anything else
    hf_tensors = _FusedExperts(_HFTensors(folder, allow_pickle), family)
    sources = {n: hf_entries(family, cfg, n, tuple(s)) for n, s in stored_shapes(cfg).items()}
    dropped = _check_hf_tensors(folder, cfg, sources, hf_tensors, hf)
    output = Path(output)
    tmp = _fresh_output(output, overwrite)
    tmp.mkdir(parents=True)
    provenance = {
        "framework": f"transformers ({family.architecture})",
        "source": str(folder.resolve()),
        "max_position_embeddings": hf.get("max_position_embeddings"),
        "source_dtype": hf.get("dtype") or hf.get("torch_dtype"),
        "imported_with": code_version(),
    }
    try:
        _write(folder, tmp, cfg, sources, hf_tensors, provenance)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    _move_into_place(tmp, output)
    report = Report(output, sorted(p.name for p in output.iterdir()), provenance)
    report.notes.append(
        "train from it with: " + " ".join(training_overrides(cfg)) + f" checkpoint.init_weights={output}"
    )
    if dropped:
        report.notes.append(f"not imported: the multi-token-prediction layers ({len(dropped)} tensors)")
    return report


def _write(
    folder: Path, tmp: Path, cfg: ModelConfig, sources: dict[str, list[Entry]], hf_tensors: _FusedExperts,
    provenance: dict[str, Any],
) -> None:  # fmt: skip
    from pretrain.convert.tokenizer import HF_TOKENIZER_FILES

    for name in HF_TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    shapes = stored_shapes(cfg)
    tensors = ((name, _assemble(sources[name], hf_tensors, tuple(shape))) for name, shape in shapes.items())
    write_consolidated(tmp / WEIGHTS_FILE, cfg, _Progress(len(shapes), "imported").wrap(tensors), provenance)
    (tmp / "model_config.json").write_text(model_config_to_json(cfg) + "\n")


def _assemble(entries: list[Entry], tensors: _FusedExperts, shape: tuple[int, ...]) -> torch.Tensor:
    """One of our tensors from its Hub tensors: itself, or one per expert stacked; a router bias the
    class does not have is zero (its routing is the bias-free one)."""
    entries = [e for e in entries if e[2] != "zeros"]
    if not entries:
        return torch.zeros(shape)
    if len(entries) == 1 and entries[0][2] in (None, "double"):
        value = tensors.get(entries[0][0])
        return value / 2 if entries[0][2] == "double" else value
    return torch.stack([tensors.get(name) for name, _, _ in entries])


def training_overrides(cfg: ModelConfig) -> list[str]:
    """The model.* overrides that make a training config match `cfg`."""
    values: dict[str, Any] = {
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
    if cfg.head_dim is not None:
        values["head_dim"] = cfg.head_dim
    if cfg.qk_norm:
        values["qk_norm"] = "true"
    moe = cfg.moe
    if moe.enabled:
        values.update({
            "moe.num_experts": moe.num_experts, "moe.top_k": moe.top_k, "moe.expert_ffn_hidden_size": cfg.expert_ffn_size,
            "moe.num_shared_experts": moe.num_shared_experts, "moe.first_dense_layers": moe.first_dense_layers,
            "moe.score_func": moe.score_func, "moe.normalize_top_k": str(moe.normalize_top_k).lower(),
            "moe.route_scale": moe.route_scale,
        })  # fmt: skip
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

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """`name`[index], reading only that slice from a safetensors file."""
        if self._pickled:
            return self._pickled[name][index].float()
        return self._files[self._where[name]].get_slice(name)[index].float()


_FUSED = re.compile(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_FUSED_ROUTER = re.compile(r"(model\.layers\.\d+)\.mlp\.(gate\..+)")


class _FusedExperts:
    """A folder's tensors under the Hub's per-expert names, also where it holds transformers 5's
    in-memory layout: 3-D `mlp.experts.gate_up_proj` (experts, 2 x width, hidden; gate rows, then up)
    and `mlp.experts.down_proj`, and Mixtral's router as `mlp.gate`."""

    def __init__(self, tensors: _HFTensors, family: Family):
        self._tensors = tensors
        self._parts: dict[str, tuple[str, int, slice | None]] = {}  # name -> fused name, expert, rows
        self._renamed: dict[str, str] = {}
        for name in sorted(tensors.names):
            match = _FUSED.fullmatch(name)
            if match:
                self._split(name, f"{match.group(1)}.{family.moe_module}.experts", match.group(2), family)
        for name in sorted(tensors.names) if self._parts and family.moe_module != "mlp" else []:
            if match := _FUSED_ROUTER.fullmatch(name):
                self._renamed[f"{match.group(1)}.{family.moe_module}.{match.group(2)}"] = name
        fused = {fused for fused, _, _ in self._parts.values()}
        self.names = (
            (tensors.names - fused - set(self._renamed.values())) | set(self._parts) | set(self._renamed)
        )

    def _split(self, name: str, prefix: str, kind: str, family: Family) -> None:
        experts, rows = self._tensors.shape(name)[:2]
        gate, up, down = family.experts
        for e in range(experts):
            if kind == "down_proj":
                self._parts[f"{prefix}.{e}.{down}.weight"] = (name, e, None)
            else:
                self._parts[f"{prefix}.{e}.{gate}.weight"] = (name, e, slice(0, rows // 2))
                self._parts[f"{prefix}.{e}.{up}.weight"] = (name, e, slice(rows // 2, rows))

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._parts:
            return self._tensors.shape(self._renamed.get(name, name))
        fused, _, rows = self._parts[name]
        shape = self._tensors.shape(fused)[1:]
        return shape if rows is None else (rows.stop - rows.start, *shape[1:])

    def get(self, name: str) -> torch.Tensor:
        if name not in self._parts:
            return self._tensors.get(self._renamed.get(name, name))
        fused, expert, rows = self._parts[name]
        value = self._tensors.get_row(fused, expert)
        return value if rows is None else value[rows].contiguous()


def _check_hf_tensors(
    folder: Path,
    cfg: ModelConfig,
    sources: dict[str, list[Entry]],
    tensors: _FusedExperts,
    hf: dict[str, Any],
) -> list[str]:
    """Every tensor the model needs is there with its shape; nothing else is (R2.4: no silent loss),
    but for the multi-token-prediction layers after the last block (returned: dropped)."""
    entries = [entry for per_name in sources.values() for entry in per_name]
    expected = {name: shape for name, shape, part in entries if part != "zeros"}
    optional = {name: shape for name, shape, part in entries if part == "zeros"}
    problems = [f"tensor {name} is missing" for name in sorted(set(expected) - tensors.names)]
    mtp = _mtp_layers(hf, cfg)
    dropped = sorted(n for n in tensors.names if mtp.match(n)) if mtp else []
    extra = sorted(tensors.names - set(expected) - set(optional) - set(dropped))
    for name in extra:
        if IGNORED_HF_TENSORS.fullmatch(name):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:  # some exports store the tied copy too
            if not torch.equal(tensors.get(name), tensors.get("model.embed_tokens.weight")):
                problems.append(
                    "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
                )
            continue
        problems.append(f"unexpected tensor {name} (not part of the model config.json describes)")
    wanted = {**expected, **optional}
    for name in sorted(set(wanted) & tensors.names):
        found = tensors.shape(name)
        if found != tuple(wanted[name]):
            problems.append(
                f"tensor {name} has shape {list(found)}, config.json implies {list(wanted[name])}"
            )
        elif name in optional and tensors.get(name).any():
            problems.append(f"tensor {name} is not zero: {_NOT_OURS[name.split('.')[-2]]}")
    if problems:
        raise ConversionError(
            f"{folder} does not match its config.json:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return dropped


# Why a tensor our model has only as zeros cannot be anything else.
_NOT_OURS = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj"), "our attention has no biases"),
    **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "a shared expert of width 0 computes nothing"),
    "shared_expert_gate": "Qwen2-MoE's learned shared-expert gate, sigmoid(gate x), is not in our model (a zero "
    "gate, sigmoid 0 = 1/2, is: what our export writes); sigmoid routing with shared experts is Glm4Moe",
}


def _mtp_layers(hf: dict[str, Any], cfg: ModelConfig) -> re.Pattern[str] | None:
    """GLM-4.5's multi-token-prediction modules: layers numbered from num_hidden_layers on, which
    transformers does not load either."""
    if not hf.get("num_nextn_predict_layers"):
        return None
    last = cfg.num_layers + int(hf["num_nextn_predict_layers"])
    numbers = "|".join(str(i) for i in range(cfg.num_layers, last))
    return re.compile(rf"model\.layers\.({numbers})\.")
