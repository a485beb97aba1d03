"""DeepSpeed's optimizer-side tensors of one model-parallel rank, by layout: the flat fp32 partitions
of ZeRO 1-3 and of the bf16 optimizer, the unflattened fp32 masters of the fp16 optimizer, torch's
own AdamW state without ZeRO. Each offers `names()` and `get(name, shape)`; `deepspeed_reader`
chooses which applies and merges the ranks' pieces into the plain model's tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pretrain import deepspeed_compat as compat
from pretrain.errors import ConversionError

_Piece = tuple[int, int, int, int]  # (rank, group, start, stop) in that rank's flat buffer of the group


class FlatPartitions:
    """One model-parallel rank's flat fp32 buffers split over data-parallel ranks, indexed by name.

    ZeRO 1-2: per parameter group, the concatenation of the ranks' partitions is the group's flat
    buffer, parameters back to back in `param_shapes` order (plus alignment padding).
    ZeRO 3: every parameter is split on its own, ceil(numel / dp) elements per rank, one after the
    other in each rank's buffer (groups concatenated).
    DeepSpeed's bf16 optimizer (bf16 without ZeRO, under pipeline parallelism) saves no param_shapes,
    but `param_slice_mappings`: where each parameter's fragment lies in each rank's partition.
    """

    plain_names = False  # indexed by DeepSpeed's module names

    def __init__(
        self,
        param_shapes: list[dict[str, torch.Size]] | None,
        rank_files: list[Path],
        zero_stage: int,
        load: Callable[[Path], dict[str, Any]],
        kind: str = "fp32",
        ep: int = 1,
    ):
        states = [load(p)[compat.OPTIMIZER_STATE_KEY] for p in rank_files]
        self.states = states
        # [rank][group]
        self.groups: list[list[torch.Tensor]] = [
            _flat_buffers(s, zero_stage, kind, path) for s, path in zip(states, rank_files, strict=True)
        ]
        # name -> pieces (rank, group, start, stop) whose concatenation is the parameter (+ padding)
        self.pieces: dict[str, list[_Piece]] = {}
        # routed experts under expert parallelism: name -> per EP rank, the pieces of its slice
        self.experts: dict[str, list[list[_Piece]]] = {}
        if param_shapes is None:
            for rank, state in enumerate(states):
                for group, mapping in enumerate(state.get(compat.Keys.SLICE_MAPPINGS) or []):
                    for name, fragment in mapping.items():
                        start = fragment.start
                        self.pieces.setdefault(name, []).append((rank, group, start, start + fragment.numel))
            if not self.pieces:
                raise ConversionError(
                    f"{rank_files[0]}: neither param_shapes nor param_slice_mappings were saved"
                )
        elif zero_stage == 3:
            self._index_zero3(param_shapes, rank_files[0])
        else:
            self._index_zero12(param_shapes, states, rank_files, ep)

    def _index_zero3(self, param_shapes: list[dict[str, torch.Size]], path: Path) -> None:
        sizes = [g.numel() for g in self.groups[0]]
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                part = -(-shape.numel() // len(self.groups))
                self.pieces[name] = [
                    (rank, group, start, stop)
                    for rank in range(len(self.groups))
                    for group, start, stop in _spans(sizes, offset, part)
                ]
                offset += part
        _check(offset, sum(sizes), path)

    def _index_zero12(
        self,
        param_shapes: list[dict[str, torch.Size]],
        states: list[dict[str, Any]],
        files: list[Path],
        ep: int,
    ) -> None:
        """Each group's flat buffer is split over its ranks: all data-parallel ranks, but for an expert
        group (expert parallelism) each EP rank's experts are their own buffer, split over the ranks
        holding those experts: data-parallel ranks e, e + ep, ... for EP rank e (DeepSpeed's
        expert-data-parallel groups; `pretrain.parallel.topology` checks the layout)."""
        paddings = states[0].get(compat.Keys.ALIGNMENT_PADDINGS)
        expert_groups = compat.expert_optimizer_groups(states[0]) if ep > 1 else set()
        for group, shapes in enumerate(param_shapes):
            if group not in expert_groups:
                self.pieces.update(
                    self._group_pieces(group, shapes, paddings, list(range(len(files))), files)
                )
                continue
            for e in range(ep):
                pieces = self._group_pieces(group, shapes, paddings, list(range(e, len(files), ep)), files)
                for name, piece in pieces.items():
                    self.experts.setdefault(name, []).append(piece)

    def _group_pieces(
        self,
        group: int,
        shapes: dict[str, torch.Size],
        paddings: list[list[int]] | None,
        ranks: list[int],
        files: list[Path],
    ) -> dict[str, list[_Piece]]:
        size = self.groups[ranks[0]][group].numel()  # every rank's partition of a group has this size
        counts = compat.partition_counts(self.states[ranks[0]])
        if counts is not None and counts[group] != len(ranks):
            raise ConversionError(
                f"{files[ranks[0]]}: parameter group {group} is split over {counts[group]} ranks, the config's "
                f"layout splits it over {len(ranks)}; the config (parallel.ep) does not belong to this checkpoint"
            )
        out, offset = {}, 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = shape.numel()
            out[name] = [
                (
                    ranks[p],
                    group,
                    max(offset, p * size) - p * size,
                    min(offset + numel, (p + 1) * size) - p * size,
                )
                for p in range(offset // size, (offset + numel - 1) // size + 1)
            ]
            offset += numel + (paddings[group][i] if paddings else 0)
        _check(offset, size * len(ranks), files[ranks[0]])
        return out

    def names(self) -> list[str]:
        return [*self.pieces, *self.experts]

    def get(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The parameter `name` of (training) `shape`; routed experts split over EP ranks come back
        whole, their slices concatenated along the expert dimension."""
        if name in self.experts:
            slices = self.experts[name]
            slice_shape = torch.Size([shape[0] // len(slices), *shape[1:]])
            return torch.cat([self._gather(name, pieces, slice_shape) for pieces in slices])
        return self._gather(name, self.pieces[name], shape)

    def _gather(self, name: str, pieces: list[_Piece], shape: torch.Size) -> torch.Tensor:
        flat = torch.cat([self.groups[r][g][a:b] for r, g, a, b in pieces])
        if flat.numel() < shape.numel():
            raise ConversionError(
                f"{name}: the optimizer partitions hold {flat.numel()} elements, the model needs {list(shape)}; "
                f"the checkpoint does not belong to this config"
            )
        return flat[: shape.numel()].view(shape)


def _flat_buffers(state: dict[str, Any], zero_stage: int, kind: str, path: Path) -> list[torch.Tensor]:
    """One rank's flat buffers of `kind` (fp32 masters or an Adam moment), one per parameter group.
    The moments live in the wrapped torch optimizer's state, one flat tensor per group, laid out
    exactly like the masters."""
    if kind == "fp32":
        key = compat.flat_masters_key(zero_stage)
        if key not in state:
            raise ConversionError(f"{path} has no {key}: not a ZeRO-{zero_stage} optimizer file")
        return list(state[key])
    base = state.get(compat.base_optimizer_key(zero_stage)) or {}
    per_group = base.get("state")
    if not per_group:
        raise ConversionError(
            f"{path} holds no optimizer moments (was the checkpoint saved before any step?)"
        )
    try:
        return [per_group[group][kind] for group in sorted(per_group)]
    except KeyError as e:
        raise ConversionError(
            f"{path}: the optimizer state has no {kind} (an optimizer other than Adam?)"
        ) from e


def _spans(sizes: list[int], start: int, length: int) -> list[tuple[int, int, int]]:
    """(group, start, stop) pieces of [start, start + length) in the concatenation of buffers of `sizes`."""
    spans, base = [], 0
    for group, size in enumerate(sizes):
        if start < base + size and start + length > base:
            spans.append((group, max(start, base) - base, min(start + length, base + size) - base))
        base += size
    return spans


def _check(used: int, available: int, path: Path) -> None:
    if used > available:
        raise ConversionError(
            f"{path}: the parameters need {used} elements but the flat buffers hold {available}; "
            f"the optimizer files do not belong to this model"
        )


def _module_order_names(
    groups_sizes: list[int], module_order: list[tuple[str, int]], where: str
) -> list[str]:
    """Plain names in the order our parameter groups list them (matrices, then vectors, each in module
    order), checked against the per-group counts found in a checkpoint."""
    matrices = [n for n, ndim in module_order if ndim >= 2]
    vectors = [n for n, ndim in module_order if ndim < 2]
    if groups_sizes != [len(matrices), len(vectors)]:
        raise ConversionError(
            f"{where} holds {groups_sizes} tensors per parameter group, the model "
            f"{[len(matrices), len(vectors)]}; the checkpoint does not belong to this config"
        )
    return [*matrices, *vectors]


class NamedTensors:
    """Optimizer-side tensors saved whole, one per parameter, under the plain model's names."""

    plain_names = True
    what = "the optimizer state"

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, shape: torch.Size) -> torch.Tensor:
        tensor = self.tensors[name]
        if tensor.shape != shape:
            raise ConversionError(
                f"{name}: {self.what} holds shape {list(tensor.shape)} where the model has "
                f"{list(shape)}; the checkpoint does not belong to this config"
            )
        return tensor


class TorchOptimizerState(NamedTensors):
    """fp32 without ZeRO: DeepSpeed saves torch's own AdamW state in the model-states file, keyed by
    the parameter's position in our parameter groups; its moments have the parameters' shapes."""

    def __init__(self, optimizer_state: dict[str, Any], module_order: list[tuple[str, int]], kind: str):
        sizes = [len(g["params"]) for g in optimizer_state["param_groups"]]
        names = _module_order_names(sizes, module_order, "torch's optimizer state")
        indices = [i for g in optimizer_state["param_groups"] for i in g["params"]]
        state = optimizer_state["state"]
        if not state:
            raise ConversionError("the optimizer state is empty (was the checkpoint saved before any step?)")
        super().__init__({name: state[i][kind] for name, i in zip(names, indices, strict=True)})


class Fp16OptimizerMasters(NamedTensors):
    """fp16 without ZeRO: DeepSpeed's fp16 optimizer keeps one fp32 copy per parameter, unflattened,
    in the model-states file (`optimizer.fp32_groups`), in the order the optimizer got them: our
    parameter groups (matrices, then vectors), each in module order. No names are saved, so each
    master is also checked to round to the module's fp16 weight exactly."""

    what = "DeepSpeed's fp16 optimizer state"

    def __init__(self, groups: list[list[torch.Tensor]], module_order: list[tuple[str, int]]):
        names = _module_order_names(
            [len(g) for g in groups], module_order, "DeepSpeed's fp16 optimizer state"
        )
        super().__init__(dict(zip(names, [t for g in groups for t in g], strict=True)))
