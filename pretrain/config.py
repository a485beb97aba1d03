"""The typed configuration tree.

One dataclass per component; every field has a docstring-style comment that `--help-config`
(and the README's reference) is generated from. Presets are YAML files in `configs/`; the command
line adds dotted overrides (`optim.lr=3e-4 parallel.zero_stage=2`). Loading is strict: unknown keys,
wrong types and impossible values are collected and reported together in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.errors import ConfigError


def _doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached (shown by `--help-config`)."""
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class ModelConfig:
    """Shape of the Llama-style decoder."""

    vocab_size: int = _doc(
        "Rows of the embedding and output layer; at least the tokenizer's vocabulary.", 32000
    )
    hidden_size: int = _doc("Width of the residual stream (d_model).", 768)
    num_layers: int = _doc("Number of decoder blocks.", 12)
    num_heads: int = _doc("Attention (query) heads.", 12)
    num_kv_heads: int | None = _doc(
        "Key/value heads for grouped-query attention; null means num_heads (plain multi-head).", None
    )
    ffn_hidden_size: int | None = _doc(
        "Inner width of the SwiGLU MLP; null derives Llama's rule: 8/3 x hidden, rounded up to ffn_multiple_of.",
        None,
    )
    ffn_multiple_of: int = _doc("Rounding for the derived ffn_hidden_size.", 256)
    norm_eps: float = _doc("Epsilon of RMSNorm.", 1e-5)
    rope_theta: float = _doc("Base of the rotary position embedding frequencies.", 10000.0)
    tie_embeddings: bool = _doc("Share the input embedding matrix with the output layer.", False)
    init_std: float = _doc(
        "Std of the normal init; output projections use init_std / sqrt(2 x num_layers) (GPT-2 scaled init).",
        0.02,
    )
    vocab_pad_multiple: int = _doc(
        "Embedding and output rows are padded to a multiple of this x parallel.tp (aligned matmuls, even "
        "tensor-parallel shards); padded rows stay zero, are never predicted, and are removed on export.",
        128,
    )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        raw = int(8 * self.hidden_size / 3)
        return self.ffn_multiple_of * math.ceil(raw / self.ffn_multiple_of)

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        multiple = self.vocab_pad_multiple * tensor_parallel
        return multiple * math.ceil(self.vocab_size / multiple)


@dataclass
class ParallelConfig:
    """How the model is spread over processes. World size = data-parallel x tp x pp."""

    zero_stage: int = _doc(
        "DeepSpeed ZeRO stage: 0 (plain DP), 1 (optimizer states), 2 (+gradients), 3 (+weights).", 1
    )
    tp: int = _doc("Tensor-parallel degree (model.num_heads and num_kv_heads must be divisible by it).", 1)
    pp: int = _doc("Pipeline-parallel degree (at most model.num_layers; needs zero_stage 0 or 1).", 1)
    offload_optimizer: bool = _doc("Keep optimizer states in CPU memory (ZeRO stage >= 1).", False)
    sequence_parallel: bool = _doc(
        "With tp > 1, split norms and the activations between tensor-parallel regions along the sequence "
        "(Megatron-LM sequence parallelism): activation memory / tp, same communication volume.",
        False,
    )
    activation_checkpointing: str = _doc(
        "Recompute activations in the backward pass: none; full (keep each block's input only); selective "
        "(keep matmul and attention outputs, recompute norms, rotary and activations).",
        "none",
    )
    check_replicas_interval: int = _doc(
        "Every this many steps, check that replicated parameters (data-parallel copies, norm weights on "
        "tensor-parallel ranks, the tied embedding on first and last stage) are still equal, and log the "
        "ones that differ by name; 0 disables it (a debugging aid: one small all-gather per group).",
        0,
    )
    pipeline_partition: str = _doc(
        "How decoder blocks are split over pipeline stages: layers (equal block counts; the embedding joins "
        "the first stage, the norm and head the last) or parameters (balance parameter counts).",
        "layers",
    )


@dataclass
class DataConfig:
    """Where the training tokens come from."""

    paths: list[str] = _doc(
        "Prepared datasets (folders written by `python -m pretrain.data prepare`, local or fsspec URLs). "
        "Empty: the built-in corpus, the Python standard library's own source read as bytes.",
        default_factory=list,
    )
    weights: list[float] | None = _doc(
        "Blend weights, one per path (normalised); null weights each dataset by its token count.", None
    )
    validation_fraction: float = _doc("Fraction of each dataset held out for validation loss.", 0.02)
    verify_checksums: bool = _doc(
        "Check every shard's sha256 against its manifest before training (reads all data once).", False
    )
    cache_dir: str | None = _doc(
        "Local cache for remote (fsspec URL) datasets; null: $PRETRAIN_CACHE or ~/.cache/pretrain.", None
    )


@dataclass
class OptimConfig:
    """AdamW and gradient clipping."""

    lr: float = _doc("Peak learning rate.", 3e-4)
    weight_decay: float = _doc("Decoupled weight decay on matrices (not on norms or biases).", 0.1)
    beta1: float = _doc("AdamW beta1.", 0.9)
    beta2: float = _doc("AdamW beta2.", 0.95)
    eps: float = _doc("AdamW epsilon.", 1e-8)
    grad_clip: float = _doc("Clip the global gradient norm to this value; 0 disables clipping.", 1.0)


SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine decay, warmup-stable-decay, or constant."""

    kind: str = _doc("One of: cosine, wsd (warmup-stable-decay), constant.", "cosine")
    warmup_steps: int = _doc("Steps of linear warmup from 0 to optim.lr.", 100)
    min_lr_ratio: float = _doc("Final learning rate as a fraction of optim.lr.", 0.1)
    decay_fraction: float = _doc("wsd only: fraction of train.steps spent in the final linear decay.", 0.2)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
RECOMPUTE_MODES = ("none", "full", "selective")
PIPELINE_PARTITIONS = ("layers", "parameters")


@dataclass
class TrainConfig:
    """Batch, length and duration of training."""

    steps: int = _doc("Optimizer steps to train for.", 1000)
    global_batch_size: int = _doc("Sequences per optimizer step, over all data-parallel ranks.", 32)
    micro_batch_size: int = _doc("Sequences per forward/backward on one rank.", 4)
    grad_accum_steps: int | None = _doc(
        "Micro-batches per step; null derives it as global_batch_size / (micro_batch_size x data-parallel size).",
        None,
    )
    seq_len: int = _doc("Tokens per training sequence.", 1024)
    precision: str = _doc("auto (bf16 on GPUs that support it, else fp32), bf16, fp16 or fp32.", "auto")
    compile: bool = _doc(
        "Compile each decoder block with torch.compile (fused norms, rotary, SwiGLU and their backward; "
        "the same weights and checkpoints). Costs compile time at the first steps (about a minute on a GPU).",
        False,
    )
    eval_interval: int = _doc("Compute validation loss every this many steps; 0 disables it.", 100)
    eval_batches: int = _doc("Global batches of validation data per evaluation.", 4)
    on_nonfinite: str = _doc(
        "When a step's gradient norm is not finite (its update is never applied): fail (stop, exit 3), skip "
        "(log the step and its sample ids, go on), or rollback (reload the newest complete checkpoint and skip "
        "the offending batches).",
        "fail",
    )
    max_nonfinite_events: int = _doc(
        "With skip or rollback: stop (exit 3) after this many non-finite steps, so a diverged run ends.", 10
    )


NONFINITE_POLICIES = ("fail", "skip", "rollback")
RESUME_VERIFICATION = ("checksum", "size")
# Settings a resumed run must share with its checkpoint, unless listed in checkpoint.allow_changes:
# each changes which tokens the following steps train on. Model shapes can never change (the weights
# would not fit); everything else (LR, schedule, steps, layout, logging) may change freely.
RESUME_GUARDED_KEYS = (
    "train.global_batch_size",
    "train.seq_len",
    "data.paths",
    "data.weights",
    "data.validation_fraction",
    "seed",
)


@dataclass
class CheckpointConfig:
    """When to write checkpoints into run.dir/checkpoints, how many to keep, and where to resume from."""

    interval: int = _doc("Save every this many steps; 0 saves only at the end (if save_final).", 500)
    save_final: bool = _doc("Save when training finishes.", True)
    resume: str = _doc(
        "auto: continue from the newest complete checkpoint in run.dir/checkpoints (a fresh start if there is "
        "none); none: start fresh (refused if run.dir already holds a run, unless run.overwrite); or a path: that "
        "checkpoint (a step folder), or the newest complete one in that run or checkpoints folder. A different "
        "layout (DP, TP, PP, ZeRO stage) is resharded automatically, optimizer state included.",
        "auto",
    )
    keep_last: int = _doc(
        "Keep the newest this many complete checkpoints and delete older ones after each save; 0 keeps all. "
        "The newest complete checkpoint is never deleted.",
        3,
    )
    keep_every: int = _doc(
        "Also keep, permanently, every checkpoint whose step is a multiple of this; 0: none.", 0
    )
    async_save: bool = _doc(
        "Write checkpoints in a background thread: training pauses only while the state is copied to host "
        "memory (one save in flight at a time, so host memory holds at most one extra copy of the state).",
        True,
    )
    verify: str = _doc(
        "What resuming checks before it trusts a checkpoint: checksum (every file against the manifest's "
        "checksum, the reading spread over all ranks) or size (file sizes only; for huge checkpoints).",
        "checksum",
    )
    allow_changes: list[str] = _doc(
        "Settings allowed to differ from the checkpoint's when resuming, among: "
        + ", ".join(RESUME_GUARDED_KEYS)
        + " (each changes which data the following steps see; a difference not listed here stops the resume).",
        default_factory=list,
    )
    init_weights: str | None = _doc(
        "Start from these weights instead of the seeded init: consolidated safetensors written by `python -m "
        "pretrain.convert from-hf` (its folder) or `to-fp32` (the file). Weights only: optimizer, LR schedule and "
        "data start fresh. Any layout; model.* must describe the same architecture (checked, with the fix).",
        None,
    )


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl, TensorBoard and plots."""

    interval: int = _doc("Log metrics every this many steps.", 10)
    tensorboard: bool = _doc("Write TensorBoard event files to run.dir/tensorboard.", True)
    plot: bool = _doc("Write run.dir/metrics.png (loss, LR, tokens/s) at the end of the run.", True)
    peak_tflops: float | None = _doc(
        "Peak TFLOP/s per device for MFU; null looks the detected GPU up in a table (n/a when unknown).", None
    )


@dataclass
class RunConfig:
    """Where the run writes everything."""

    dir: str = _doc(
        "Run directory: config, metrics, TensorBoard, plots and checkpoints go here.", "runs/default"
    )
    overwrite: bool = _doc(
        "Start fresh in a run.dir that already holds a run, deleting its metrics, TensorBoard events and checkpoints.",
        False,
    )


@dataclass
class WatchdogConfig:
    """Deadlines for joining, the first step and every later step; what happens past them."""

    join_timeout: float = _doc(
        "Seconds rank 0 waits for every rank to join the rendezvous; past it every rank that joined exits "
        "(code 7) with the missing ranks and the nodes they should have come from.",
        300.0,
    )
    first_step_timeout: float = _doc(
        "Seconds from the start of the training loop (after data loading and any resume) to the end of the "
        "first step (compilation, warm-up); past it the job is treated as hung, as for step_timeout. 0 disables.",
        1800.0,
    )
    step_timeout: float = _doc(
        "Seconds without a completed step (its evaluation and checkpoint save included); past it every rank "
        "writes its Python stacks to run.dir/hang/<time>/, report.txt names the ranks that are behind, and "
        "the job exits with code 6. 0 disables.",
        600.0,
    )


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    seed: int = _doc("Seed for weight init and data order.", 1234)

    # ----- derived quantities (not config keys) -----

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tp * self.parallel.pp)

    def grad_accum_steps(self, world_size: int) -> int:
        if self.train.grad_accum_steps is not None:
            return self.train.grad_accum_steps
        return self.train.global_batch_size // (
            self.train.micro_batch_size * self.data_parallel_size(world_size)
        )

    @property
    def padded_vocab_size(self) -> int:
        return self.model.padded_vocab_size(self.parallel.tp)

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.train.seq_len

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), world_size: int | None = None
) -> Config:
    """Read a YAML preset, apply dotted overrides, and return a validated `Config`.

    `world_size` enables the checks that need it (batch arithmetic, layout); None skips them.
    """
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            presets = sorted(
                p.name for p in Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml")
            )
            raise ConfigError(
                [f"config file {str(path)!r} does not exist (presets in configs/: {', '.join(presets)})"]
            )
        try:
            raw = _plain(OmegaConf.load(path))
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError([f"{path}: cannot parse YAML: {e}"]) from e
        if not isinstance(raw, dict):
            raise ConfigError(
                [f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"]
            )
    for item in overrides:
        if "=" not in item or item.startswith("="):
            problems.append(f"override {item!r} is not of the form key=value (for example optim.lr=3e-4)")
            continue
        try:
            raw = _merge(raw, _plain(OmegaConf.from_dotlist([item])))
        except (OmegaConfBaseException, ValueError) as e:
            problems.append(f"override {item!r} cannot be parsed: {e}")
    try:
        raw = _plain(OmegaConf.create(raw), resolve=True)  # resolve ${...} interpolations
    except OmegaConfBaseException as e:
        problems.append(f"cannot resolve an interpolation: {e}")
    cfg = _build(Config, raw, "", problems)
    # Values that failed to parse keep their defaults, so value checks still run and report the rest;
    # the layout checks need every number right and wait until the rest is clean.
    problems.extend(validate(cfg, world_size if not problems else None))
    if problems:
        raise ConfigError(problems)
    return cfg


def _plain(node: Any, resolve: bool = False) -> Any:
    return OmegaConf.to_container(node, resolve=resolve) if OmegaConf.is_config(node) else node


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. 'optim.lr'."""
    keys = []
    for f in dataclasses.fields(cls):
        ftype = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys.extend(all_keys(ftype, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, path: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{path}{close[0]}'?"
    elsewhere = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; it exists as {elsewhere[0]!r}"
    return f"; valid keys here: {', '.join(valid)}"


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Turn a plain dict into `cls`, recording unknown keys and type errors instead of stopping."""
    where = path.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            problems.append(f"unknown key '{path}{key}'" + _suggest(str(key), path, names))
    values = {}
    for name in names:
        if name not in raw:
            continue
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype):
            values[name] = _build(ftype, raw[name], f"{path}{name}.", problems)  # type: ignore[arg-type]
        else:
            try:
                values[name] = _coerce(raw[name], ftype)
            except (TypeError, ValueError) as e:
                problems.append(f"{path}{name}: {e}")
    return cls(**values)


def _coerce(value: Any, ftype: Any) -> Any:
    args = typing.get_args(ftype)
    if typing.get_origin(ftype) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (ftype,) = [a for a in args if a is not type(None)]
    if typing.get_origin(ftype) is list:
        (item_type,) = typing.get_args(ftype)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # data.paths=shards/web means a list of one
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list, got {value!r}")
        return [_coerce(item, item_type) for item in value]
    if ftype is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {value!r}")
    if ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise TypeError(f"expected an integer, got {value!r}")
    if ftype is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '3e-4' as a string; we read it as the number it is
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {value!r}")
    if ftype is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"expected a string, got {value!r}")
    raise TypeError(f"unsupported field type {ftype}")  # a schema bug, not a user error


# ---------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config, world_size: int | None = None) -> list[str]:
    """Impossible values and cross-field disagreements, all of them, as messages with a fix."""
    p: list[str] = []
    m, par, t, o, s = cfg.model, cfg.parallel, cfg.train, cfg.optim, cfg.schedule

    def positive(name: str, value: float) -> None:
        if value <= 0:
            p.append(f"{name} must be positive, got {value}")

    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_multiple_of"):
        positive(f"model.{name}", getattr(m, name))
    if m.num_kv_heads is not None:
        positive("model.num_kv_heads", m.num_kv_heads)
    if m.ffn_hidden_size is not None:
        positive("model.ffn_hidden_size", m.ffn_hidden_size)
    positive("model.norm_eps", m.norm_eps)
    positive("model.rope_theta", m.rope_theta)
    positive("model.init_std", m.init_std)
    if m.num_heads > 0 and m.hidden_size % m.num_heads:
        p.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads}); "
            f"head_dim would not be an integer"
        )
    elif m.num_heads > 0 and m.head_dim % 2:
        p.append(f"head_dim = hidden_size / num_heads = {m.head_dim} must be even for rotary embeddings")
    if m.num_kv_heads and m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
        p.append(
            f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads ({m.num_kv_heads}) "
            f"for grouped-query attention"
        )

    if par.zero_stage not in (0, 1, 2, 3):
        p.append(f"parallel.zero_stage must be 0, 1, 2 or 3, got {par.zero_stage}")
    positive("parallel.tp", par.tp)
    positive("parallel.pp", par.pp)
    positive("model.vocab_pad_multiple", m.vocab_pad_multiple)
    if par.tp > 1:
        for name, heads in (("num_heads", m.num_heads), ("num_kv_heads", m.kv_heads)):
            if heads > 0 and heads % par.tp:
                p.append(
                    f"model.{name} ({heads}) must be divisible by parallel.tp ({par.tp}): each tensor-parallel "
                    f"rank holds whole heads; use a parallel.tp that divides {heads}"
                )
        if m.ffn_size > 0 and m.ffn_size % par.tp:
            p.append(
                f"the SwiGLU width ({m.ffn_size}, model.ffn_hidden_size) must be divisible by parallel.tp "
                f"({par.tp}); choose a width that is a multiple of {par.tp}"
            )
        if par.sequence_parallel and t.seq_len > 0 and t.seq_len % par.tp:
            p.append(
                f"train.seq_len ({t.seq_len}) must be divisible by parallel.tp ({par.tp}) with "
                f"parallel.sequence_parallel=true (each rank holds an equal slice of the sequence)"
            )
    if par.check_replicas_interval < 0:
        p.append(
            f"parallel.check_replicas_interval must be >= 0 (0 disables it), got {par.check_replicas_interval}"
        )
    if par.activation_checkpointing not in RECOMPUTE_MODES:
        p.append(
            f"parallel.activation_checkpointing must be one of {', '.join(RECOMPUTE_MODES)}, "
            f"got {par.activation_checkpointing!r}"
        )
    if par.pipeline_partition not in PIPELINE_PARTITIONS:
        p.append(
            f"parallel.pipeline_partition must be one of {', '.join(PIPELINE_PARTITIONS)}, "
            f"got {par.pipeline_partition!r}"
        )
    if par.pp > 1:
        if m.num_layers < par.pp:
            p.append(
                f"parallel.pp ({par.pp}) exceeds model.num_layers ({m.num_layers}); each stage needs a layer"
            )
        if par.zero_stage >= 2:
            p.append(
                f"parallel.zero_stage={par.zero_stage} cannot be combined with pipeline parallelism "
                f"(parallel.pp={par.pp}): DeepSpeed's pipeline engine supports ZeRO stage 0 or 1. "
                f"Use parallel.zero_stage=1, or parallel.pp=1 to keep ZeRO-{par.zero_stage}"
            )
    if par.offload_optimizer and par.zero_stage == 0:
        p.append("parallel.offload_optimizer needs parallel.zero_stage >= 1")

    d = cfg.data
    if d.weights is not None:
        if len(d.weights) != len(d.paths):
            p.append(
                f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}; give one weight per "
                f"path, or data.weights=null to weight by token count"
            )
        if any(w < 0 for w in d.weights) or not sum(d.weights) > 0:
            p.append(f"data.weights must be >= 0 with a positive sum, got {d.weights}")
    if len(set(d.paths)) != len(d.paths):
        p.append(f"data.paths lists a dataset twice: {d.paths}; use data.weights to sample one more often")
    if not 0.0 <= cfg.data.validation_fraction < 1.0:
        p.append(f"data.validation_fraction must be in [0, 1), got {cfg.data.validation_fraction}")

    positive("optim.lr", o.lr)
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            p.append(f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    positive("optim.eps", o.eps)
    if o.grad_clip < 0:
        p.append(f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}")

    if s.kind not in SCHEDULES:
        close = difflib.get_close_matches(s.kind, SCHEDULES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        p.append(f"schedule.kind must be one of {', '.join(SCHEDULES)}, got {s.kind!r}{hint}")
    if s.warmup_steps < 0:
        p.append(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        p.append(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    if not 0.0 < s.decay_fraction <= 1.0:
        p.append(f"schedule.decay_fraction must be in (0, 1], got {s.decay_fraction}")

    for name in ("steps", "global_batch_size", "micro_batch_size", "seq_len"):
        positive(f"train.{name}", getattr(t, name))
    if t.grad_accum_steps is not None:
        positive("train.grad_accum_steps", t.grad_accum_steps)
    if t.precision not in PRECISIONS:
        p.append(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.eval_interval < 0:
        p.append(f"train.eval_interval must be >= 0 (0 disables evaluation), got {t.eval_interval}")
    positive("train.eval_batches", t.eval_batches)
    if t.global_batch_size > 0 and t.micro_batch_size > 0 and t.global_batch_size % t.micro_batch_size:
        p.append(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )

    c = cfg.checkpoint
    if not c.resume.strip():
        p.append("checkpoint.resume must be auto, none or a checkpoint path; got an empty string")
    if c.keep_last < 0:
        p.append(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {c.keep_last}")
    if c.keep_every < 0:
        p.append(f"checkpoint.keep_every must be >= 0 (0: none), got {c.keep_every}")
    if c.verify not in RESUME_VERIFICATION:
        p.append(f"checkpoint.verify must be one of {', '.join(RESUME_VERIFICATION)}, got {c.verify!r}")
    for key in c.allow_changes:
        if key not in RESUME_GUARDED_KEYS:
            hint = (
                "model settings can never change on resume (the weights would not fit)"
                if key.startswith("model.")
                else f"only these need it: {', '.join(RESUME_GUARDED_KEYS)}; other settings may change freely"
            )
            p.append(f"checkpoint.allow_changes lists {key!r}: {hint}")
    if t.on_nonfinite not in NONFINITE_POLICIES:
        p.append(f"train.on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {t.on_nonfinite!r}")
    elif t.on_nonfinite == "rollback" and c.interval == 0:
        p.append(
            "train.on_nonfinite=rollback needs periodic checkpoints to roll back to: set checkpoint.interval > 0"
        )
    positive("train.max_nonfinite_events", t.max_nonfinite_events)
    if cfg.checkpoint.init_weights is not None and not cfg.checkpoint.init_weights.strip():
        p.append("checkpoint.init_weights must be a path, or null for the seeded init; got an empty string")
    if cfg.checkpoint.interval < 0:
        p.append(f"checkpoint.interval must be >= 0 (0 saves only at the end), got {cfg.checkpoint.interval}")
    positive("logging.interval", cfg.logging.interval)
    if cfg.logging.peak_tflops is not None:
        positive("logging.peak_tflops", cfg.logging.peak_tflops)
    if not cfg.run.dir:
        p.append("run.dir must not be empty")
    positive("watchdog.join_timeout", cfg.watchdog.join_timeout)
    for name in ("first_step_timeout", "step_timeout"):
        if getattr(cfg.watchdog, name) < 0:
            p.append(
                f"watchdog.{name} must be >= 0 seconds (0 disables it), got {getattr(cfg.watchdog, name)}"
            )

    if world_size is not None and not p:
        p.extend(_validate_layout(cfg, world_size))
    return p


def _validate_layout(cfg: Config, world_size: int) -> list[str]:
    par, t = cfg.parallel, cfg.train
    model_parallel = par.tp * par.pp
    if world_size % model_parallel:
        return [
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {par.tp} x {par.pp} = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes or change the layout"
        ]
    if par.pp > 1:
        from pretrain.parallel.partition import partition_layers  # needs the model; imported only here

        try:
            partition_layers(cfg)
        except ConfigError as e:
            return e.problems
    dp = world_size // model_parallel
    per_step = t.micro_batch_size * dp
    if t.grad_accum_steps is not None:
        if t.micro_batch_size * t.grad_accum_steps * dp != t.global_batch_size:
            return [
                f"train.global_batch_size ({t.global_batch_size}) != train.micro_batch_size ({t.micro_batch_size}) "
                f"x train.grad_accum_steps ({t.grad_accum_steps}) x data-parallel size ({dp}) = "
                f"{t.micro_batch_size * t.grad_accum_steps * dp}; set train.grad_accum_steps=null to derive it"
            ]
    elif t.global_batch_size % per_step:
        lower = max(per_step, t.global_batch_size // per_step * per_step)
        return [
            f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({dp}) = {per_step}, so gradient accumulation "
            f"cannot be derived; use a global batch of {lower} or {lower + per_step}, or another micro batch"
        ]
    return []


def _type_name(ftype: Any) -> str:
    if typing.get_origin(ftype) is list:
        return f"list[{_type_name(typing.get_args(ftype)[0])}]"
    if typing.get_origin(ftype) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(ftype))
    return "null" if ftype is type(None) else ftype.__name__


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf: the config reference in README and `--help-config`."""
    rows = []
    hints = _field_types(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            rows.extend(describe_fields(ftype, f"{prefix}{f.name}."))  # type: ignore[arg-type]
            continue
        tname = _type_name(ftype)
        value = getattr(default, f.name)
        rows.append((f"{prefix}{f.name}", tname, json.dumps(value), f.metadata.get("doc", "")))
    return rows


def reference_markdown() -> str:
    """The README's config reference table."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tname, default, doc in describe_fields():
        lines.append(f"| `{key}` | {tname.replace(' | ', ' or ')} | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)
