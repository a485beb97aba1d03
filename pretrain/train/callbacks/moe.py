"""Mixture-of-experts bookkeeping: the load every expert received, the balancing losses, the
auxiliary-loss-free bias update (DeepSeek-V3), and their metrics.

After every step each rank reads what its MoE blocks measured (`MixtureOfExperts.take_statistics`),
and one all-reduce over all ranks gives every rank the step's totals of every MoE block of the model
(a pipeline stage fills in only its own blocks' rows; tensor-parallel ranks route the same tokens, so
their counts are divided by tp). From those totals, identical on every rank:

- the bias of each block's router moves by bias_update_rate towards balance:
  b_i += rate * sign(mean load - load_i), so every replica keeps the same bias;
- every logging.interval steps a record: mean aux loss and z-loss, and per block the tokens of the
  most and least loaded expert against the mean, which experts those are, how many got no token at
  all, and the (token, slot) pairs dropped by the capacity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pretrain.model.moe import MixtureOfExperts
from pretrain.parallel.pipeline import plain_parameter_name
from pretrain.train.callbacks.base import MEASURE, Callback, TrainerView, due

_AUX, _Z, _DROPPED, _FORWARDS = range(4)  # columns after the per-expert counts


class ExpertBalance(Callback):
    priority = MEASURE - 1  # after the step and its loss record, before any save (the bias is saved state)

    def __init__(self, interval: int, block_names: list[str], num_experts: int, bias_update_rate: float):
        self.interval, self.block_names, self.num_experts = interval, block_names, num_experts
        self.rate = bias_update_rate
        self._totals: torch.Tensor | None = None  # summed over the steps since the last record

    def on_restore(self, trainer: TrainerView) -> None:
        """After a rollback: the undone step's counts (the trainer stops telling callbacks about a
        step it undoes, so they are still in the blocks) must not move the bias of the next one."""
        self._totals = None
        for module in self._modules(trainer).values():
            module.take_statistics()

    def on_step_end(self, trainer: TrainerView) -> None:
        modules = self._modules(trainer)
        step_totals = self._reduce(modules, trainer)
        if self.rate > 0 and not trainer.engine.last_step_skipped:  # a skipped step changes no state
            self._update_bias(modules, step_totals)
        self._totals = step_totals if self._totals is None else self._totals + step_totals
        step = trainer.state.step
        if step == 1 or due(step, self.interval, trainer.cfg.train.steps):
            trainer.log(self._record(step, self._totals))
            self._totals = None

    def _modules(self, trainer: TrainerView) -> dict[int, MixtureOfExperts]:
        """Row of the model's MoE blocks -> this rank's module of it."""
        rows = {name: row for row, name in enumerate(self.block_names)}
        found = {}
        for name, module in trainer.engine.module.named_modules():
            if isinstance(module, MixtureOfExperts):
                plain = plain_parameter_name(trainer.cfg.model, name, trainer.engine.pipelined)
                found[rows[plain.removesuffix(".mlp")]] = module
        return found

    def _reduce(self, modules: dict[int, MixtureOfExperts], trainer: TrainerView) -> torch.Tensor:
        device = trainer.engine.device
        table = torch.zeros(len(self.block_names), self.num_experts + 4, dtype=torch.float64, device=device)
        for row, module in modules.items():
            stats = module.take_statistics()
            table[row, : self.num_experts] = stats.tokens_per_expert.to(device)
            table[row, self.num_experts + _AUX] = float(stats.aux_loss)
            table[row, self.num_experts + _Z] = float(stats.z_loss)
            table[row, self.num_experts + _DROPPED] = float(stats.dropped)
            table[row, self.num_experts + _FORWARDS] = stats.forwards
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(table)
        table[:, : self.num_experts] /= trainer.engine.ctx.tp
        table[:, self.num_experts + _DROPPED] /= trainer.engine.ctx.tp
        return table.cpu()

    def _update_bias(self, modules: dict[int, MixtureOfExperts], totals: torch.Tensor) -> None:
        for row, module in modules.items():
            update_expert_bias(module, totals[row, : self.num_experts], self.rate)

    def _record(self, step: int, totals: torch.Tensor) -> dict[str, Any]:
        forwards = totals[:, self.num_experts + _FORWARDS].clamp(min=1)
        layers = {}
        for row, name in enumerate(self.block_names):
            load = totals[row, : self.num_experts]
            mean = float(load.mean())
            layers[name] = {
                "max_over_mean": float(load.max()) / mean if mean else None,
                "min_over_mean": float(load.min()) / mean if mean else None,
                "most_loaded": int(load.argmax()),
                "least_loaded": int(load.argmin()),
                "idle_experts": int((load == 0).sum()),
                "dropped": int(totals[row, self.num_experts + _DROPPED]),
            }
        worst = max((v["max_over_mean"] or 0.0 for v in layers.values()), default=0.0)
        return {
            "step": step,
            "moe_aux_loss": float((totals[:, self.num_experts + _AUX] / forwards).mean()),
            "moe_z_loss": float((totals[:, self.num_experts + _Z] / forwards).mean()),
            "moe_max_load_over_mean": worst,
            "moe_idle_experts": sum(v["idle_experts"] for v in layers.values()),
            "moe_dropped": sum(v["dropped"] for v in layers.values()),
            "moe_layers": layers,
        }


@torch.no_grad()
def update_expert_bias(module: MixtureOfExperts, load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's update: b_i += rate * sign(mean load - load_i)."""
    if rate <= 0:
        return
    step = rate * torch.sign(load.mean() - load)
    bias = module.router.get_buffer("expert_bias")
    bias.add_(step.to(bias.device, bias.dtype))
