"""Consolidated weights: one safetensors file holding the whole plain model, whatever the layout it
was trained in. `to-fp32` writes it, `from-hf` writes it, and the trainer starts from it
(`checkpoint.init_weights`).

- Tensor names are the plain `Transformer`'s parameter names (`embedding.weight`,
  `blocks.3.attn.q_proj.weight`, ..., `norm.weight`, `head.weight`), in layer order.
- Vocabulary rows are not padded: `embedding.weight` and `head.weight` have `model.vocab_size` rows
  (padding depends on the layout and is added back when loading).
- Tied embeddings are stored once, as `embedding.weight`; there is no `head.weight` and the model
  config says `tie_embeddings: true`.
- Persistent buffers follow their layer's parameters (a mixture of experts' router bias:
  `blocks.N.mlp.router.expert_bias`, which decides routing and so belongs to the weights).
- The header's `__metadata__` holds the model config (`pretrain.model_config`, JSON of `ModelConfig`)
  and where the weights came from (`pretrain.provenance`), so the file describes itself.

Reading is lazy (`safe_open`): a caller takes one tensor at a time and memory stays about one layer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pretrain.config import ModelConfig, MoEConfig
from pretrain.errors import ConfigError
from pretrain.model.names import VOCAB_PARAMETERS, is_routed_expert, layer_name, stored_shapes
from pretrain.model.transformer import build_layer, layer_kind

FORMAT = "pretrain-consolidated-v1"
WEIGHTS_FILE = "model.safetensors"  # inside a folder given as an init source
# The fields that decide what the weights compute; the rest of ModelConfig (init_std, padding
# multiples, ffn rounding) only shapes how a model is initialised or laid out.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "kv_heads",
    "head_size",
    "qk_norm",
    "ffn_size",
    "norm_eps",
    "rope_theta",
    "tie_embeddings",
)
# Of a mixture of experts (compared when either model has one; the balancing coefficients only
# steer training).
MOE_ARCHITECTURE_FIELDS = (
    "moe.num_experts",
    "moe.top_k",
    "expert_ffn_size",
    "moe.num_shared_experts",
    "moe.first_dense_layers",
    "moe.score_func",
    "moe.normalize_top_k",
    "moe.route_scale",
)
_OVERRIDE_KEY = {
    "kv_heads": "num_kv_heads",
    "head_size": "head_dim",
    "ffn_size": "ffn_hidden_size",
    "expert_ffn_size": "moe.expert_ffn_hidden_size",
}


def model_config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def model_config_from_dict(data: dict[str, Any], where: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            [f"{where}: unknown model config keys {unknown}; was it written by a newer version?"]
        )
    moe = data.get("moe", {})
    if isinstance(moe, dict):
        moe_known = {f.name for f in dataclasses.fields(MoEConfig)}
        if unknown := sorted(set(moe) - moe_known):
            raise ConfigError(
                [f"{where}: unknown model.moe keys {unknown}; was it written by a newer version?"]
            )
        data = {**data, "moe": MoEConfig(**moe)}
    return ModelConfig(**data)


def architecture_differences(saved: ModelConfig, wanted: ModelConfig) -> list[str]:
    """Each architectural field where the two disagree, with the override that makes `wanted` match."""
    problems = []
    moe = MOE_ARCHITECTURE_FIELDS if saved.moe.enabled or wanted.moe.enabled else ()
    for name in (*ARCHITECTURE_FIELDS, *moe):
        have, want = _field(saved, name), _field(wanted, name)
        if have != want:
            key = _OVERRIDE_KEY.get(name, name)
            value = json.dumps(have) if not isinstance(have, bool) else str(have).lower()
            problems.append(
                f"model.{key}: the weights have {have}, the config has {want}; set model.{key}={value}"
            )
    return problems


def _field(cfg: ModelConfig, dotted: str) -> Any:
    section, _, name = dotted.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def weights_file(path: str | Path) -> Path:
    """The safetensors file of an init source given as the file itself or a folder holding model.safetensors."""
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            [
                f"checkpoint.init_weights: no consolidated weights at {path} (expected a .safetensors file or a "
                f"folder holding {WEIGHTS_FILE}); write one with `python -m pretrain.convert from-hf` or `to-fp32`"
            ]
        )
    return file


class ConsolidatedWeights:
    """A consolidated safetensors file opened lazily, checked against the model it will initialise."""

    def __init__(self, path: str | Path):
        from safetensors import SafetensorError, safe_open

        self.path = weights_file(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(
                [
                    f"{self.path} is not a readable safetensors file ({e}); the file is truncated or corrupt: write it again"
                ]
            ) from e
        metadata = self._file.metadata() or {}
        if metadata.get("pretrain.format") != FORMAT or "pretrain.model_config" not in metadata:
            raise ConfigError(
                [
                    f"{self.path} is not a consolidated checkpoint of this framework (no pretrain.model_config in its "
                    f"metadata); convert Hugging Face folders with `python -m pretrain.convert from-hf`"
                ]
            )
        self.model_config = model_config_from_dict(
            json.loads(metadata["pretrain.model_config"]), str(self.path)
        )
        self.provenance: dict[str, Any] = json.loads(metadata.get("pretrain.provenance", "{}"))
        self.names = set(self._file.keys())

    def check_matches(self, cfg: ModelConfig) -> None:
        """Raise a ConfigError listing every architectural difference and every missing, unexpected or
        misshapen tensor, each with its fix."""
        problems = [f"{self.path}: {p}" for p in architecture_differences(self.model_config, cfg)]
        if problems:
            raise ConfigError(problems)
        expected = stored_shapes(cfg)
        for name in sorted(set(expected) - self.names):
            problems.append(f"{self.path}: tensor {name} is missing; the file is incomplete: write it again")
        for name in sorted(self.names - set(expected)):
            problems.append(
                f"{self.path}: unexpected tensor {name} for this model; the file is not from this model"
            )
        for name in sorted(set(expected) & self.names):
            found = tuple(self._file.get_slice(name).get_shape())
            if found != tuple(expected[name]):
                problems.append(
                    f"{self.path}: tensor {name} has shape {list(found)}, the model expects {list(expected[name])}; "
                    f"the model config in the file disagrees with its tensors: write it again"
                )
        if problems:
            raise ConfigError(problems)

    def get(self, name: str, padded_rows: int | None = None) -> torch.Tensor:
        """One tensor in fp32; vocabulary tensors get zero rows appended up to `padded_rows`."""
        tensor = self._file.get_tensor(name).float()
        if name in VOCAB_PARAMETERS and padded_rows is not None and padded_rows > tensor.shape[0]:
            padding = tensor.new_zeros(padded_rows - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat([tensor, padding])
        return tensor

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in stored_shapes(self.model_config):
            yield name, self.get(name)

    def get_rows(self, name: str, first: int, count: int) -> torch.Tensor:
        """Rows [first, first + count) of one tensor in fp32, reading only those from the file."""
        return self._file.get_slice(name)[first : first + count].float()

    @torch.no_grad()
    def build_layer(
        self,
        cfg: ModelConfig,
        index: int,
        padded_vocab_size: int,
        held_experts: tuple[int, int] | None = None,
    ) -> torch.nn.Module:
        """Layer `index` of the plain model (not yet sharded), holding this file's tensors; vocabulary
        rows padded with zeros. The tied output layer of a single-stage model takes the embedding's
        (the Transformer ties them anyway). With `held_experts` (first, count) an MoE block reads and
        holds only those routed experts."""
        with torch.device("meta"):  # shapes only: no random draws
            layer = build_layer(cfg, index, padded_vocab_size, seed=0, held_experts=held_experts)
        layer = layer.to_empty(device="cpu")
        source = 0 if layer_kind(cfg, index) == "head" and cfg.tie_embeddings else index
        prefix = layer_name(cfg, source)
        for name, param in layer.named_parameters():
            full = f"{prefix}.{name}"
            if held_experts is not None and is_routed_expert(full):
                value = self.get_rows(full, *held_experts)
            else:
                value = self.get(full, padded_rows=param.shape[0])
            if value.shape != param.shape:
                raise ConfigError(
                    [
                        f"{self.path}: tensor {full} has shape {list(value.shape)}, the model expects "
                        f"{list(param.shape)}; set model.* to the architecture the weights were made for"
                    ]
                )
            param.copy_(value)
        params = dict(layer.named_parameters())
        for name, buffer in layer.state_dict().items():  # persistent buffers: a router's bias
            if name not in params:
                buffer.copy_(self.get(f"{prefix}.{name}"))
        return layer


def open_init_weights(path: str, cfg: ModelConfig) -> ConsolidatedWeights:
    """checkpoint.init_weights opened and checked against the configured model."""
    weights = ConsolidatedWeights(path)
    weights.check_matches(cfg)
    return weights


def write_consolidated(
    path: str | Path,
    cfg: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    provenance: dict[str, Any],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Stream `tensors` (plain names, unpadded, in layer order) into a consolidated safetensors file."""
    from pretrain.weights.safetensors_io import SafetensorsWriter

    shapes = stored_shapes(cfg)
    metadata = {
        "format": "pt",
        "pretrain.format": FORMAT,
        "pretrain.model_config": model_config_to_json(cfg),
        "pretrain.provenance": json.dumps(provenance, sort_keys=True),
    }
    path = Path(path)
    with SafetensorsWriter(path, [(n, dtype, s) for n, s in shapes.items()], metadata) as writer:
        for name, tensor in tensors:
            writer.write(name, tensor.to(dtype))
    return path
