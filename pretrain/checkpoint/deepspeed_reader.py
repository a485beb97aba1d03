"""A DeepSpeed checkpoint of any layout, read as the plain model's full tensors, one at a time.

Where the weights are, per layout (file names and keys from `pretrain.deepspeed_compat`, checked
against files our trainer writes by tests/test_deepspeed_compat.py):

| layout | file | what it holds |
| --- | --- | --- |
| ZeRO 0-2, pp = 1 | `mp_rank_{tp:02d}_model_states.pt` | `module`: this TP rank's weights, plain names |
| pp > 1 | `layer_{idx:02d}-model_{tp:02d}-model_states.pt` | one layer's weights (the tied head is not saved) |
| ZeRO 1-2, bf16/fp16 | `[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt` | fp32 masters, flat, split over DP ranks |
| ZeRO 3 | `zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt` | fp32 weights, each split over DP ranks |
| ZeRO 0, fp16 | `mp_rank_{mp:02d}_model_states.pt` | `optimizer.fp32_groups`: fp32 masters, unflattened |

`mp` = pipeline stage x tp + TP rank (DeepSpeed's model-parallel rank over our pipe/data/model
topology). The parameter order inside the flat buffers is `param_shapes` in the model-states file
(DeepSpeed's own `zero_to_fp32` reads them the same way).

Which copy is exported: the fp32 master weights, always. With fp32 training those are the module
weights (DeepSpeed updates them in place; the optimizer's flat copy is bitwise the same); with
bf16/fp16 they exist only in the optimizer partitions, and the module holds them rounded. ZeRO-3
keeps no full module copy at all. So bf16 runs read the partitions, fp32 runs the module files.

Files are opened with `torch.load(mmap=True, weights_only=True)`: nothing in them runs as code, and
only the bytes of the tensors taken are read; the optimizer moments stored beside the masters are
never touched. Tensor-parallel shards are merged along `pretrain.parallel.tp_plan.partition_dim`.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain import deepspeed_compat as compat
from pretrain.checkpoint.optimizer_files import FlatPartitions, Fp16OptimizerMasters, TorchOptimizerState
from pretrain.config import Config
from pretrain.errors import ConversionError
from pretrain.model.names import (
    VOCAB_PARAMETERS,
    is_routed_expert,
    layer_buffers,
    layer_name,
    layer_parameters,
)
from pretrain.model.transformer import num_layers
from pretrain.parallel.partition import partition_layers
from pretrain.parallel.pipeline import plain_parameter_name
from pretrain.parallel.topology import describe_layout
from pretrain.parallel.tp_plan import partition_dim

# What an optimizer holds per parameter: the fp32 master weight and AdamW's two moments.
STATE_KINDS = ("fp32", "exp_avg", "exp_avg_sq")


def load_file(path: Path) -> dict[str, Any]:
    """A checkpoint file, memory-mapped: tensors are read from disk only when their data is used."""
    if not path.is_file():
        raise ConversionError(
            f"{path} is missing: the checkpoint is incomplete (was the save interrupted?); "
            f"convert an earlier checkpoint (give its step directory)"
        )
    try:
        with torch.serialization.safe_globals(compat.pickled_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path} holds a pickled object the reader does not load ({str(e).splitlines()[0]}); "
            f"it was not written by this framework's DeepSpeed checkpointing"
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise ConversionError(f"{path} cannot be read ({e}); the file is truncated or corrupt") from e


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    ep: int = 1

    def describe(self) -> str:
        return describe_layout(self.dp, self.tp, self.pp, self.zero_stage, ep=self.ep)


_Partitions = FlatPartitions | Fp16OptimizerMasters | TorchOptimizerState


class DeepSpeedCheckpoint:
    """The checkpoint in `step_dir`, written by a run with config `cfg`."""

    def __init__(self, step_dir: Path, cfg: Config):
        self.dir, self.cfg = step_dir, cfg
        self._files: dict[Path, dict[str, Any]] = {}
        # ZeRO-3 names its model-states files differently; the files, not the config, decide.
        self._zero3 = not (step_dir / compat.model_states_file(0)).is_file() and any(
            step_dir.glob(compat.ZERO3_FIRST_MODEL_STATES_GLOB)
        )
        par = cfg.parallel
        first = self._model_states(0, dp_rank=0)
        states = self._load(first)
        dims = states.get(compat.Keys.PARALLEL_DIMENSIONS, {})
        tp, pp = dims.get(compat.Keys.TP_DEGREE, par.tp), dims.get(compat.Keys.PP_DEGREE, par.pp)
        if (tp, pp) != (par.tp, par.pp):
            raise ConversionError(
                f"{first} was saved with tp={tp}, pp={pp} but the run's config says parallel.tp={par.tp}, "
                f"parallel.pp={par.pp}; the config does not belong to this checkpoint: pass the run's own --config"
            )
        zero_stage = (
            states.get(compat.Keys.DS_CONFIG, {}).get("zero_optimization", {}).get("stage", par.zero_stage)
        )
        if self._zero3 != (zero_stage == 3):
            raise ConversionError(
                f"{first}: the files and the saved DeepSpeed config disagree on the ZeRO stage"
            )
        self.layout = Layout(tp, pp, int(states.get(compat.Keys.DP_WORLD_SIZE, 1)), zero_stage, par.ep)
        self.step = int(states.get("step", states.get(compat.Keys.GLOBAL_STEPS, 0)))
        self.tokens_seen = states.get("tokens_seen")
        self.masters = self.layout.zero_stage == 3 or self._module_dtype() != torch.float32
        self._partitions: dict[tuple[int, str], _Partitions] = {}
        self.check_rounding = False
        self._indices: dict[str, dict[tuple[str, int], tuple[int, str]]] = {}

    # ----- files

    def _load(self, path: Path) -> dict[str, Any]:
        if path not in self._files:
            self._files[path] = load_file(path)
        return self._files[path]

    def _model_states(self, mp_rank: int, dp_rank: int = 0) -> Path:
        return self.dir / compat.model_states_file(mp_rank, dp_rank, self._zero3)

    def _optim_states(self, mp_rank: int, dp_rank: int) -> Path:
        zero, bf16 = (self.dir / name for name in compat.optim_states_files(mp_rank, dp_rank))
        return bf16 if bf16.is_file() else zero

    def _layer_file(self, index: int, tp_rank: int) -> Path:
        return self.dir / compat.layer_file(index, tp_rank)

    def _module_dtype(self) -> torch.dtype:
        if self.layout.pp > 1:
            tensors = self._load(self._layer_file(0, 0))
        else:
            tensors = self._load(self._model_states(0))[compat.Keys.MODULE]
        return next(iter(tensors.values())).dtype

    def adam_step(self) -> int:
        """AdamW's step count (its bias correction) as saved; the same for every parameter."""
        optim_file = self._optim_states(0, 0)
        if optim_file.is_file():
            state = self._load(optim_file)[compat.OPTIMIZER_STATE_KEY]
            base = state.get(compat.base_optimizer_key(self.layout.zero_stage))
        else:
            optimizer = self._load(self._model_states(0)).get(compat.Keys.OPTIMIZER) or {}
            base = optimizer.get(
                compat.OPTIMIZER_STATE_KEY, optimizer
            )  # DeepSpeed's fp16 optimizer wraps torch's
        per_param = (base or {}).get("state") or {}
        if not per_param:
            return 0
        step = next(iter(per_param.values()))["step"]
        return int(step.item() if torch.is_tensor(step) else step)

    @property
    def source(self) -> str:
        if self.layout.zero_stage == 3:
            return "fp32 weights from the ZeRO-3 partitions"
        if self.masters:
            return "fp32 master weights from the optimizer partitions (the module holds them rounded)"
        return "fp32 module weights (fp32 training: the module weights are the master weights)"

    # ----- name bookkeeping for the flat buffers

    def _plain_name(self, module_name: str) -> str:
        return plain_parameter_name(self.cfg.model, module_name, self.layout.pp > 1)

    def _plain_name_index(self, kind: str) -> dict[tuple[str, int], tuple[int, str]]:
        """(plain name, TP rank) -> (model-parallel rank, name in the optimizer state) over every rank."""
        if kind not in self._indices:
            index: dict[tuple[str, int], tuple[int, str]] = {}
            for mp in range(self.layout.pp * self.layout.tp):
                flat = self._flat(mp, kind)
                for module_name in flat.names():
                    plain = module_name if flat.plain_names else self._plain_name(module_name)
                    index.setdefault((plain, mp % self.layout.tp), (mp, module_name))
            self._indices[kind] = index
        return self._indices[kind]

    def _shard_shape(self, name: str, shape: torch.Size) -> torch.Size:
        """The shape TP rank's piece of `name` had in training: vocabulary padded, split along partition_dim."""
        dims = list(shape)
        if name in VOCAB_PARAMETERS:
            dims[0] = self.cfg.padded_vocab_size
        dim = partition_dim(name)
        if dim is not None:
            dims[dim] //= self.layout.tp
        return torch.Size(dims)

    def _flat(self, mp: int, kind: str = "fp32") -> _Partitions:
        """Model-parallel rank `mp`'s optimizer-side tensors of `kind` (fp32 masters or a moment)."""
        if (mp, kind) not in self._partitions:
            states = self._load(self._model_states(mp))
            files = [self._optim_states(mp, dp) for dp in range(self.layout.dp)]
            optimizer = states.get(compat.Keys.OPTIMIZER) or {}
            flat: _Partitions
            if files[0].is_file():
                flat = FlatPartitions(
                    states[compat.Keys.PARAM_SHAPES],
                    files,
                    self.layout.zero_stage,
                    self._load,
                    kind,
                    self.layout.ep,
                )
            elif compat.Keys.FP16_MASTERS in optimizer:
                if kind != "fp32":
                    raise ConversionError(
                        f"{self.dir}: the optimizer moments of an fp16 checkpoint without ZeRO are not read; resume "
                        f"it in the layout it was saved in"
                    )
                flat = Fp16OptimizerMasters(optimizer[compat.Keys.FP16_MASTERS], self._module_order(mp))
                self.check_rounding = True
            elif kind != "fp32" and self.layout.zero_stage == 0 and "param_groups" in optimizer:
                flat = TorchOptimizerState(optimizer, self._module_order(mp), kind)
            else:
                raise ConversionError(
                    f"{self.dir}: the module weights are {self._module_dtype()} and this layout's {kind} tensors "
                    f"are in no format the reader knows (optimizer keys: {sorted(optimizer)})"
                )
            self._partitions[mp, kind] = flat
        return self._partitions[mp, kind]

    def _module_order(self, mp: int) -> list[tuple[str, int]]:
        """(plain name, ndim) of model-parallel rank `mp`'s parameters in module order: a pipeline
        stage registers its tied embedding first, then its layers in order; a tied head has none."""
        model, layout = self.cfg.model, self.layout
        total = num_layers(model)
        if layout.pp > 1:
            parts = partition_layers(self.cfg)
            stage = mp // layout.tp
            indices = list(range(parts[stage], parts[stage + 1]))
        else:
            indices = list(range(total))
        tied = {0, total - 1} if model.tie_embeddings else set()
        params = dict(layer_parameters(model))
        order = []
        if tied & set(indices) and layout.pp > 1:
            order += [(name, len(shape)) for name, shape in params[0]]
        for index in indices:
            if index in tied and (layout.pp > 1 or index == total - 1):
                continue
            order += [(name, len(shape)) for name, shape in params[index]]
        return order

    # ----- tensors

    def _shard(self, name: str, shape: torch.Size, index: int, tp_rank: int, kind: str) -> torch.Tensor:
        """This TP rank's piece of parameter `name` (of layer `index`), vocabulary padded as trained."""
        # Under expert parallelism the module file holds DP rank 0's experts only; every EP rank's
        # fp32 masters are in its ZeRO partition files (ZeRO 1-2 only: the config refuses others).
        experts_split = self.layout.ep > 1 and is_routed_expert(name)
        if self.masters or kind != "fp32" or experts_split:
            names = self._plain_name_index(kind)
            if (name, tp_rank) not in names:
                raise ConversionError(
                    f"{self.dir}: no optimizer partition of TP rank {tp_rank} holds {name}; "
                    f"the checkpoint is incomplete or not from this model"
                )
            mp, module_name = names[name, tp_rank]
            master = self._flat(mp, kind).get(module_name, self._shard_shape(name, shape))
            if self.check_rounding and kind == "fp32":
                module = self._module_shard(name, index, tp_rank)
                if not torch.equal(master.to(module.dtype), module):
                    raise ConversionError(
                        f"{self.dir}: the fp32 master of {name} does not round to the module's {module.dtype} "
                        f"weight; the optimizer state was matched to the wrong parameters"
                    )
            return master
        return self._module_shard(name, index, tp_rank)

    def _module_shard(self, name: str, index: int, tp_rank: int) -> torch.Tensor:
        if self.layout.pp > 1:
            tensors = self._load(self._layer_file(index, tp_rank))
            key = name.removeprefix(layer_name(self.cfg.model, index) + ".")
        else:
            tensors, key = self._load(self._model_states(tp_rank))[compat.Keys.MODULE], name
        if key not in tensors:
            raise ConversionError(
                f"{self.dir}: {name} is missing from the module weights of TP rank {tp_rank}"
            )
        return tensors[key]

    def buffer(self, index: int, name: str) -> torch.Tensor:
        """Persistent buffer `name` of layer `index` (a router's balancing bias): the same on every
        rank, read from the module weights of TP rank 0."""
        return self._module_shard(name, index, 0).float()

    def stored_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What consolidated weights hold (`pretrain.model.names.stored_shapes`): each layer's fp32
        masters, then its persistent buffers."""
        buffers = dict(layer_buffers(self.cfg.model))
        for index, params in layer_parameters(self.cfg.model):
            for name, shape in params:
                yield name, self.tensor(index, name, shape)
            for name, _ in buffers[index]:
                yield name, self.buffer(index, name)

    def tensors(self, kind: str = "fp32") -> Iterator[tuple[str, torch.Tensor]]:
        """(plain name, full unpadded tensor) for every stored parameter, in layer order: the fp32
        masters, or (kind exp_avg / exp_avg_sq) Adam's moments of them."""
        for index, params in layer_parameters(self.cfg.model):
            for name, shape in params:
                yield name, self.tensor(index, name, shape, kind)

    def tensor(self, index: int, name: str, shape: torch.Size, kind: str = "fp32") -> torch.Tensor:
        """Parameter `name` of layer `index` (unpadded `shape`), merged over TP ranks, vocabulary unpadded."""
        assert kind in STATE_KINDS, kind
        model = self.cfg.model
        shards = [self._shard(name, shape, index, t, kind) for t in range(self.layout.tp)]
        dim = partition_dim(name)
        if dim is None:
            for t, other in enumerate(shards[1:], 1):
                if not torch.equal(other, shards[0]):
                    raise ConversionError(
                        f"{self.dir}: the replicated parameter {name} ({kind}) differs between TP ranks 0 and {t}; "
                        f"the checkpoint is inconsistent"
                    )
            full = shards[0]
        else:
            full = torch.cat(shards, dim) if len(shards) > 1 else shards[0]
        if name in VOCAB_PARAMETERS:
            if full[model.vocab_size :].any():
                raise ConversionError(
                    f"{self.dir}: the padded vocabulary rows of {name} ({kind}, from row {model.vocab_size}) are not "
                    f"zero; the checkpoint does not match the config's model.vocab_size or layout"
                )
            full = full[: model.vocab_size]
        if tuple(full.shape) != tuple(shape):
            raise ConversionError(
                f"{self.dir}: {name} consolidates to shape {list(full.shape)} but the config's model needs "
                f"{list(shape)}; the config does not belong to this checkpoint"
            )
        return full.float()
