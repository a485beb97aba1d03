"""`parallel.*`: how the model is spread over processes, and the checks of the degrees against the
model's shape and the sequence length (the layout against the world size is `Config.world_size_problems`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.fields import choices, documented, one_of, positive
from pretrain.config.model import ModelConfig
from pretrain.config.training import TrainConfig

ZeroStage = Literal[0, 1, 2, 3]
RecomputeMode = Literal["none", "full", "selective"]
PipelinePartition = Literal["layers", "parameters"]
OffloadDevice = Literal["none", "cpu", "nvme"]
ZERO_STAGES: tuple[ZeroStage, ...] = choices(ZeroStage)
RECOMPUTE_MODES: tuple[RecomputeMode, ...] = choices(RecomputeMode)
PIPELINE_PARTITIONS: tuple[PipelinePartition, ...] = choices(PipelinePartition)
OFFLOAD_DEVICES: tuple[OffloadDevice, ...] = choices(OffloadDevice)


@dataclass
class ParallelConfig:
    """How the model is spread over processes. World size = data-parallel x tp x pp."""

    zero_stage: ZeroStage = documented(
        "DeepSpeed ZeRO stage: 0 (plain DP), 1 (optimizer states), 2 (+gradients), 3 (+weights).", 1
    )
    tp: int = documented(
        "Tensor-parallel degree (model.num_heads and num_kv_heads must be divisible by it).", 1
    )
    ep: int = documented(
        "Expert-parallel degree: the routed experts of each MoE block are split over this many data-parallel "
        "ranks (it must divide the data-parallel size and model.moe.num_experts; needs zero_stage 1 or 2).",
        1,
    )
    pp: int = documented("Pipeline-parallel degree (at most model.num_layers; needs zero_stage 0 or 1).", 1)
    offload_optimizer: OffloadDevice = documented(
        "Where the fp32 masters and Adam moments live and are updated: none (the device), cpu (host memory, "
        "DeepSpeed's CPU Adam; ZeRO stage >= 1) or nvme (refused: see docs/PARALLELISM.md). Configs that "
        "say true/false mean cpu/none.",
        "none",
        legacy=((True, "cpu"), (False, "none")),
    )
    sequence_parallel: bool = documented(
        "With tp > 1, split norms and the activations between tensor-parallel regions along the sequence "
        "(Megatron-LM sequence parallelism): activation memory / tp, same communication volume.",
        False,
    )
    activation_checkpointing: RecomputeMode = documented(
        "Recompute activations in the backward pass: none; full (keep each block's input only); selective "
        "(keep matmul and attention outputs, recompute norms, rotary and activations).",
        "none",
    )
    check_replicas_interval: int = documented(
        "Every this many steps, check that replicated parameters (data-parallel copies, norm weights on "
        "tensor-parallel ranks, the tied embedding on first and last stage) are still equal, and log the "
        "ones that differ by name; 0 disables it (a debugging aid: one small all-gather per group).",
        0,
    )
    pipeline_partition: PipelinePartition = documented(
        "How decoder blocks are split over pipeline stages: layers (equal block counts; the embedding joins "
        "the first stage, the norm and head the last) or parameters (balance parameter counts).",
        "layers",
    )

    def problems(self, model: ModelConfig, train: TrainConfig) -> list[str]:
        """Impossible degrees and choices, and degrees the model's shape (or, with sequence parallelism,
        train.seq_len) cannot be split by."""
        p: list[str] = []
        if self.zero_stage not in ZERO_STAGES:
            *first, last = ZERO_STAGES
            p.append(
                f"parallel.zero_stage must be {', '.join(map(str, first))} or {last}, got {self.zero_stage}"
            )
        p += positive("parallel.tp", self.tp)
        p += positive("parallel.pp", self.pp)
        p += positive("parallel.ep", self.ep)
        p += self._expert_problems(model, train)
        # Here rather than with model.*: the vocabulary is padded to vocab_pad_multiple x tp.
        p += positive("model.vocab_pad_multiple", model.vocab_pad_multiple)
        if self.tp > 1:
            p += self._tensor_parallel_problems(model, train)
        if self.check_replicas_interval < 0:
            p.append(
                "parallel.check_replicas_interval must be >= 0 (0 disables it), "
                f"got {self.check_replicas_interval}"
            )
        p += one_of("parallel.activation_checkpointing", self.activation_checkpointing, RECOMPUTE_MODES)
        p += one_of("parallel.pipeline_partition", self.pipeline_partition, PIPELINE_PARTITIONS)
        if self.pp > 1:
            p += self._pipeline_problems(model)
        p += self._offload_problems()
        p += self.data_type_problems(train, train.precision)
        return p

    def _expert_problems(self, model: ModelConfig, train: TrainConfig) -> list[str]:
        """MoE and expert parallelism against the other choices (docs/MOE.md, 'Layouts')."""
        moe = model.moe
        if not moe.enabled:
            if self.ep > 1:
                return [
                    f"parallel.ep={self.ep} needs a mixture-of-experts model: set model.moe.num_experts (a multiple "
                    f"of {self.ep}), or parallel.ep=1"
                ]
            return []
        p: list[str] = []
        if self.ep > 0 and moe.num_experts % self.ep:
            p.append(
                f"model.moe.num_experts ({moe.num_experts}) is not divisible by parallel.ep ({self.ep}): each "
                f"expert-parallel rank holds num_experts / ep whole experts; use a parallel.ep that divides "
                f"{moe.num_experts}"
            )
        if self.zero_stage == 3:
            p.append(
                "model.moe with parallel.zero_stage=3 is not supported: DeepSpeed 0.19 partitions expert weights "
                "under ZeRO-3 only for its own AutoEP layers; use parallel.zero_stage=1 or 2 (expert optimizer "
                "state is then partitioned over the expert-data-parallel ranks)"
            )
        elif self.ep > 1 and self.zero_stage == 0:
            p.append(
                f"parallel.ep={self.ep} needs parallel.zero_stage 1 or 2: without ZeRO, DeepSpeed writes the "
                "optimizer state of data-parallel rank 0 only, which holds 1/ep of the experts, so a resume would "
                "lose the others' Adam moments; set parallel.zero_stage=1"
            )
        if self.sequence_parallel and self.tp > 1:
            p.append(
                "model.moe with parallel.sequence_parallel=true is not supported yet (the router balances whole "
                "sequences, which sequence parallelism splits over tensor-parallel ranks); set "
                "parallel.sequence_parallel=false"
            )
        if train.precision == "fp16":
            p.append(
                "model.moe with train.precision=fp16 is not supported (the load-balancing gradient is not "
                "loss-scaled); use train.precision=bf16"
            )
        width = model.expert_ffn_size * moe.num_shared_experts
        if self.tp > 1 and width % self.tp:
            p.append(
                f"the shared experts' width ({width} = model.moe.num_shared_experts x expert width) must be "
                f"divisible by parallel.tp ({self.tp}); they are split over tensor-parallel ranks like the dense MLP"
            )
        return p

    def _offload_problems(self) -> list[str]:
        p = one_of("parallel.offload_optimizer", self.offload_optimizer, OFFLOAD_DEVICES)
        if self.offload_optimizer == "nvme":
            # Measured with DeepSpeed 0.19.8's CPU build (async_io op, libaio-dev): it trains and saves,
            # but its load_checkpoint restored neither masters nor moments (docs/PARALLELISM.md).
            p.append(
                "parallel.offload_optimizer=nvme is not supported: DeepSpeed swaps optimizer states to NVMe "
                "under ZeRO-3 only, and its load_checkpoint with NVMe swapping restores neither the fp32 "
                "masters nor the Adam moments it saved, so a resumed run would silently restart its "
                "optimizer (docs/PARALLELISM.md, 'Optimizer offload'); use parallel.offload_optimizer=cpu"
            )
        elif self.offload_optimizer == "cpu" and self.zero_stage == 0:
            p.append(
                "parallel.offload_optimizer=cpu needs parallel.zero_stage >= 1 (DeepSpeed offloads ZeRO's "
                "optimizer partitions); set parallel.zero_stage=1, or parallel.offload_optimizer=none"
            )
        return p

    def data_type_problems(self, train: TrainConfig, precision: str) -> list[str]:
        """train.grad_accum_dtype against what DeepSpeed builds for this layout at `precision` (the
        resolved one; 'auto' is checked again by build_engine once the device is known)."""
        if train.grad_accum_dtype == "bf16" and precision == "fp32":
            return [
                "train.grad_accum_dtype=bf16 needs bf16 training (train.precision=fp32 keeps fp32 gradients); "
                "set train.precision=bf16, or train.grad_accum_dtype=fp32"
            ]
        if precision == "bf16" and train.grad_accum_dtype == "fp32" and self.zero_stage == 0 and self.pp > 1:
            # DeepSpeed's engine raises "unsupported mix of model_dtype and grad_accum_dtype" here: only
            # its ZeRO path builds the bf16 optimizer with fp32 gradient buffers.
            return [
                "bf16 with train.grad_accum_dtype=fp32 under a pipeline needs parallel.zero_stage=1 (DeepSpeed "
                "accumulates bf16 gradients in fp32 only through ZeRO; it is the same bf16 optimizer, with "
                "fp32 gradient buffers); set parallel.zero_stage=1, or train.grad_accum_dtype=bf16"
            ]
        return []

    def _tensor_parallel_problems(self, model: ModelConfig, train: TrainConfig) -> list[str]:
        p: list[str] = []
        for name, heads in (("num_heads", model.num_heads), ("num_kv_heads", model.kv_heads)):
            if heads > 0 and heads % self.tp:
                p.append(
                    f"model.{name} ({heads}) must be divisible by parallel.tp ({self.tp}): each tensor-parallel "
                    f"rank holds whole heads; use a parallel.tp that divides {heads}"
                )
        if model.ffn_size > 0 and model.ffn_size % self.tp:
            p.append(
                f"the SwiGLU width ({model.ffn_size}, model.ffn_hidden_size) must be divisible by parallel.tp "
                f"({self.tp}); choose a width that is a multiple of {self.tp}"
            )
        if self.sequence_parallel and train.seq_len > 0 and train.seq_len % self.tp:
            p.append(
                f"train.seq_len ({train.seq_len}) must be divisible by parallel.tp ({self.tp}) with "
                f"parallel.sequence_parallel=true (each rank holds an equal slice of the sequence)"
            )
        return p

    def _pipeline_problems(self, model: ModelConfig) -> list[str]:
        p: list[str] = []
        if model.num_layers < self.pp:
            p.append(
                f"parallel.pp ({self.pp}) exceeds model.num_layers ({model.num_layers}); each stage needs a layer"
            )
        if self.zero_stage >= 2:
            p.append(
                f"parallel.zero_stage={self.zero_stage} cannot be combined with pipeline parallelism "
                f"(parallel.pp={self.pp}): DeepSpeed's pipeline engine supports ZeRO stage 0 or 1. "
                f"Use parallel.zero_stage=1, or parallel.pp=1 to keep ZeRO-{self.zero_stage}"
            )
        return p
