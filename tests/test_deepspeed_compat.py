"""Every DeepSpeed internal the framework relies on (`pretrain/deepspeed_compat/`), checked against
the installed DeepSpeed with real engines: when a DeepSpeed release moves one, a test here names it.

To try a newer DeepSpeed: install it into the venv, run this file, then `make check`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pretrain import deepspeed_compat as compat
from pretrain.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=128", "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
         "train.eval_interval=0", "logging.tensorboard=false", "logging.plot=false", "checkpoint.interval=0",
         "checkpoint.save_final=false", "train.steps=1"]  # fmt: skip


def test_the_installed_deepspeed_is_in_the_tested_range():
    import deepspeed

    assert compat.version_warning() is None, (
        f"DeepSpeed {deepspeed.__version__} is outside {compat.TESTED_DEEPSPEED}: the other tests of "
        f"tests/test_deepspeed_compat.py name the internals that changed"
    )


def test_a_missing_internal_fails_with_a_message_naming_it():
    class NotAnEngine:
        pass

    with pytest.raises(compat.DeepSpeedIncompatible) as error:
        compat.engine_counters(NotAnEngine())
    message = str(error.value)
    assert "has no attribute NotAnEngine.global_steps (the engine's step counters)" in message
    assert "deepspeed>=" in message and "pretrain/deepspeed_compat/" in message


def engine_internals(overrides: list[str], run_dir: str) -> dict[str, Any]:
    """One optimizer step (and the final save) of the real trainer, then every engine-side internal
    exercised on its engine."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer

    cfg = load_config(
        REPO / "configs/tiny.yaml",
        [*SMALL, *overrides, "checkpoint.save_final=true", f"run.dir={run_dir}"],
        dist.get_world_size(),
    )
    trainer = build_trainer(cfg, init_distributed())
    trainer.fit()
    ds, out = trainer.engine.ds, {}
    counters = compat.engine_counters(ds)
    compat.set_engine_counters(ds, {**counters, "global_steps": 7})
    out["counters"] = counters, compat.engine_counters(ds)["global_steps"]
    out["adam_step"] = compat.adam_step(ds.optimizer)
    compat.set_adam_step(ds.optimizer, 5)
    out["adam_step_set"] = compat.adam_step(ds.optimizer)
    out["flat_partitions"] = [a for a in compat.FLAT_PARTITION_ATTRIBUTES if hasattr(ds.optimizer, a)]
    compat.create_optimizer_state(ds.optimizer, 5)  # state exists after a step: must leave it alone
    out["adam_step_kept"] = compat.adam_step(ds.optimizer)
    param = next(iter(ds.module.parameters()))
    out["zero3_partitioned"] = compat.is_zero3_partitioned(param)
    shape = param.ds_shape if out["zero3_partitioned"] else param.shape  # ZeRO-3: the full shape
    value = torch.arange(shape.numel(), dtype=torch.float32).view(shape) / 1000
    compat.set_full_state(ds, param, "fp32", value, 5)
    full = safe_get_full_fp32_param(param) if out["flat_partitions"] else param.detach()
    out["set_full_fp32"] = bool(torch.equal(full.float(), value))
    out["sharding"] = sharding = compat.optimizer_sharding(param)
    if sharding != "whole":  # one rank: its partition or fragment is the whole parameter (ZeRO-3: padded)
        start, size = compat.zero3_partition(param) if sharding == "zero3" else compat.fragment_range(param)
        moment = torch.arange(size, dtype=torch.float32) / 7
        with compat.Zero3Partitioned(ds.optimizer):
            compat.set_local_state(param, "exp_avg", moment)
        got = safe_get_full_optimizer_state(param, "exp_avg").flatten()
        out["set_local_moment"] = start == 0 and bool(torch.equal(got, moment[: got.numel()]))
    out["tied"] = [n for n, _, _ in compat.tied_weights(ds.module)]
    out["parts"] = getattr(ds.module, "parts", None)
    out["skipped"] = compat.skipped_steps(ds)
    grid = trainer.engine.ctx.grid
    out["tp_group_size"] = None if grid is None else dist.get_world_size(compat.tensor_parallel_group(grid))
    # The files DeepSpeed wrote for the final save are where the names say, with the keys the reader takes.
    folder = Path(run_dir) / "checkpoints" / "step00000001"
    out["files"] = sorted(p.name for p in folder.iterdir())
    zero = cfg.parallel.zero_stage
    keys = compat.Keys
    if not getattr(ds.module, "parts", None):  # one stage: the model-states file of model-parallel rank 0
        with torch.serialization.safe_globals(compat.pickled_globals()):
            states = torch.load(folder / compat.model_states_file(0, 0, zero == 3), weights_only=True)
        wanted = [
            keys.MODULE,
            keys.PARALLEL_DIMENSIONS,
            keys.DS_CONFIG,
            keys.DP_WORLD_SIZE,
            keys.GLOBAL_STEPS,
        ]
        wanted += [keys.PARAM_SHAPES] if out["flat_partitions"] else [keys.OPTIMIZER]
        out["model_state_keys"] = [k for k in wanted if k not in states]
        dims = states[keys.PARALLEL_DIMENSIONS]
        out["degrees"] = dims[keys.TP_DEGREE], dims[keys.PP_DEGREE]
    zero_file, bf16_file = compat.optim_states_files(0, 0)
    optim = folder / (bf16_file if (folder / bf16_file).is_file() else zero_file)
    if optim.is_file():
        with torch.serialization.safe_globals(compat.pickled_globals()):
            state = torch.load(optim, map_location="cpu", weights_only=True)[compat.OPTIMIZER_STATE_KEY]
        out["optim_keys"] = [
            k in state for k in (compat.flat_masters_key(zero), compat.base_optimizer_key(zero))
        ]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("zero", "extra"),
    [(0, []), (1, []), (3, []), (1, ["train.precision=bf16"])],
    ids=["zero0", "zero1", "zero3", "bf16"],
)
def test_engine_internals_of_each_zero_stage(zero, extra, tmp_path):
    (out,) = run_distributed(engine_internals, 1, [f"parallel.zero_stage={zero}", *extra], str(tmp_path))
    counters, steps_after_set = out["counters"]
    assert counters["global_steps"] == 1 and counters["skipped_steps"] == 0 and steps_after_set == 7
    assert (
        out["adam_step"] == 1 and out["adam_step_set"] == out["adam_step_kept"] == 5 and out["skipped"] == 0
    )
    assert out["set_full_fp32"]
    assert out["zero3_partitioned"] == (zero == 3)
    expected = "zero3" if zero == 3 else "whole" if zero == 0 and not extra else "fragments"
    assert out["sharding"] == expected and out.get("set_local_moment", True)
    assert bool(out["flat_partitions"]) == (zero > 0 or "train.precision=bf16" in extra)
    assert compat.model_states_file(0, 0, zero3=zero == 3) in out["files"]
    assert out["model_state_keys"] == [] and out["degrees"] == (1, 1)  # [] : no key missing
    if zero > 0:
        assert out["optim_keys"] == [True, True]


@pytest.mark.slow
def test_pipeline_stage_boundaries_and_tied_weights(tmp_path):
    from pretrain.config import load_config
    from pretrain.parallel.partition import partition_layers

    overrides = ["parallel.pp=2", "model.tie_embeddings=true"]
    outs = run_distributed(engine_internals, 2, overrides, str(tmp_path))
    cfg = load_config(REPO / "configs/tiny.yaml", [*SMALL, *overrides], 2)
    for out in outs:
        assert out["parts"] == partition_layers(cfg)  # our boundaries, not DeepSpeed's own
        assert out["tied"] == ["embedding.weight"] and out["tp_group_size"] == 1
    files = set(outs[0]["files"]) | set(outs[1]["files"])
    assert compat.layer_file(1, 0) in files and compat.layer_file(2, 0) in files
