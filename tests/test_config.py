"""Strict config loading: the messages users see for the mistakes they make."""

import subprocess
import sys

import pytest

from conftest import REPO, TINY
from pretrain.config import Config, ConfigError, all_keys, describe_fields, load_config
from pretrain.errors import DataError


def problems(overrides, world_size=2, path=TINY):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, world_size=world_size)
    return info.value.problems


def test_tiny_preset_loads_with_overrides():
    cfg = load_config(TINY, ["train.steps=70", "optim.lr=1e-3", "parallel.zero_stage=3"], world_size=2)
    assert (cfg.train.steps, cfg.optim.lr, cfg.parallel.zero_stage) == (70, 1e-3, 3)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.grad_accum_steps(2) == 16 // (4 * 2)


def test_unknown_key_names_it_and_suggests_the_closest():
    assert problems(["optim.lrr=1"]) == ["unknown key 'optim.lrr'; did you mean 'optim.lr'?"]


def test_key_in_the_wrong_section_points_to_where_it_lives():
    assert problems(["train.lr=1"]) == ["unknown key 'train.lr'; it exists as 'optim.lr'"]


def test_unknown_section_lists_valid_ones():
    (message,) = problems(["trian.steps=3"])
    assert message == "unknown key 'trian'; did you mean 'train'?"


def test_wrong_types_are_named_with_the_value():
    assert problems(["train.steps=abc"]) == ["train.steps: expected an integer, got 'abc'"]
    assert problems(["optim.lr=fast"]) == ["optim.lr: expected a number, got 'fast'"]
    assert problems(["logging.tensorboard=maybe"]) == [
        "logging.tensorboard: expected true or false, got 'maybe'"
    ]


def test_scientific_notation_is_a_float_even_where_yaml_reads_a_string(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 3e-4\n")  # YAML 1.1 reads 3e-4 (no dot) as a string
    assert load_config(preset).optim.lr == 3e-4


def test_every_problem_is_reported_at_once():
    found = problems(["optim.lrr=1", "train.steps=abc", "model.num_kv_heads=3", "schedule.kind=cosin"])
    assert found == [
        "unknown key 'optim.lrr'; did you mean 'optim.lr'?",
        "train.steps: expected an integer, got 'abc'",
        "model.num_heads (4) must be divisible by model.num_kv_heads (3) for grouped-query attention",
        "schedule.kind must be one of cosine, wsd, constant, got 'cosin'; did you mean 'cosine'?",
    ]


def test_impossible_values():
    found = problems(["optim.lr=-1", "train.seq_len=0", "parallel.zero_stage=4", "optim.beta2=1.5"])
    assert "optim.lr must be positive, got -1.0" in found
    assert "train.seq_len must be positive, got 0" in found
    assert "parallel.zero_stage must be 0, 1, 2 or 3, got 4" in found
    assert "optim.beta2 must be in [0, 1), got 1.5" in found


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    # 2 ranks x micro 4 = 8 sequences per round; 20 is not a multiple
    assert problems(["train.global_batch_size=20"]) == [
        "train.global_batch_size (20) is not divisible by train.micro_batch_size (4) x data-parallel size (2) = 8, "
        "so gradient accumulation cannot be derived; use a global batch of 16 or 24, or another micro batch"
    ]


def test_explicit_accumulation_that_disagrees_names_all_numbers():
    assert problems(["train.grad_accum_steps=4"]) == [
        "train.global_batch_size (16) != train.micro_batch_size (4) x train.grad_accum_steps (4) x "
        "data-parallel size (2) = 32; set train.grad_accum_steps=null to derive it"
    ]
    assert load_config(TINY, ["train.grad_accum_steps=2"], world_size=2).grad_accum_steps(2) == 2


def test_layout_rules():
    # The example: tp=3 on 4 processes. The model cannot be split three ways, and says how.
    assert problems(["parallel.tp=3"], world_size=4) == [
        "model.num_heads (4) must be divisible by parallel.tp (3): each tensor-parallel rank holds whole heads; "
        "use a parallel.tp that divides 4",
        "model.num_kv_heads (2) must be divisible by parallel.tp (3): each tensor-parallel rank holds whole heads; "
        "use a parallel.tp that divides 2",
        "the SwiGLU width (352, model.ffn_hidden_size) must be divisible by parallel.tp (3); choose a width "
        "that is a multiple of 3",
    ]
    # A model that splits three ways still needs a world size that does.
    (message,) = problems(["parallel.tp=3", "model.num_heads=6", "model.num_kv_heads=3", "model.hidden_size=192",
                           "model.ffn_hidden_size=384"], world_size=4)  # fmt: skip
    assert message == (
        "world size 4 is not divisible by parallel.tp x parallel.pp = 3 x 1 = 3; launch a multiple of 3 "
        "processes or change the layout"
    )
    assert problems(
        ["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=255"], world_size=2
    ) == [
        "train.seq_len (255) must be divisible by parallel.tp (2) with parallel.sequence_parallel=true (each rank "
        "holds an equal slice of the sequence)"
    ]
    assert problems(["parallel.activation_checkpointing=ful", "parallel.pipeline_partition=even"]) == [
        "parallel.activation_checkpointing must be one of none, full, selective, got 'ful'",
        "parallel.pipeline_partition must be one of layers, parameters, got 'even'",
    ]
    (message,) = problems(["parallel.pp=2", "parallel.zero_stage=3"], world_size=4)
    assert "cannot be combined with pipeline parallelism" in message and "parallel.zero_stage=1" in message
    assert problems(["parallel.pp=8"], world_size=8) == [
        "parallel.pp (8) exceeds model.num_layers (4); each stage needs a layer"
    ]
    (message,) = problems(["parallel.tp=2"], world_size=3)
    assert message.startswith("world size 3 is not divisible by parallel.tp x parallel.pp = 2 x 1 = 2")
    # A valid 3D layout passes validation: 8 ranks = dp 2 x tp 2 x pp 2
    cfg = load_config(TINY, ["parallel.tp=2", "parallel.pp=2"], world_size=8)
    assert cfg.data_parallel_size(8) == 2 and cfg.grad_accum_steps(8) == 2


def test_missing_preset_lists_the_available_ones():
    (message,) = problems([], path=REPO / "configs" / "nope.yaml")
    assert "does not exist" in message and "tiny.yaml" in message


def test_malformed_override():
    assert problems(["optim.lr"]) == [
        "override 'optim.lr' is not of the form key=value (for example optim.lr=3e-4)"
    ]


def test_yaml_syntax_errors_name_the_file_line_and_column(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  hidden_size: 64\n   num_layers: 2\n")
    (message,) = problems([], path=preset)
    assert message.startswith(f"{preset}, line 3, column 14: invalid YAML: mapping values are not allowed")
    assert "indent the keys of one section alike" in message
    preset.write_text("model:\n  vocab_size: [1, 2\ntrain:\n  steps: 3\n")
    (message,) = problems([], path=preset)
    assert message.startswith(f"{preset}, line 3, column 6: invalid YAML: did not find expected ',' or ']'")
    assert "(while parsing a flow sequence that starts at line 2, column 15)" in message
    preset.write_text("seed: 1\nseed: 2\n")
    (message,) = problems([], path=preset)
    assert message.startswith(f"{preset}, line 2, column 1: invalid YAML: found duplicate key seed")
    assert message.endswith("keep one of them")


def test_a_malformed_override_value_names_the_override_and_the_position_in_it():
    assert problems(["data.paths=[a,b"]) == [
        "override 'data.paths=[a,b' cannot be parsed: did not find expected ',' or ']' at character 16, the end "
        "of it (while parsing a flow sequence that starts at character 12); close its brackets and quotes, and "
        "quote the whole override for the shell (for example data.paths='[a, b]')"
    ]
    (message,) = problems(["model.vocab_size={a: [1}"])
    assert "at character 24 (while parsing a flow sequence that starts at character 22)" in message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n", "{}\n"])
def test_a_preset_without_settings_is_refused_not_trained_with_the_defaults(tmp_path, text):
    preset = tmp_path / "empty.yaml"
    preset.write_text(text)
    (message,) = problems([], path=preset)
    assert message.startswith(f"{preset} holds no settings (it is empty, or only comments or null)")
    assert "leave out --config to train the built-in defaults" in message


@pytest.mark.parametrize(
    ("text", "got"), [("- model\n- train\n", "got a list"), ("3\n", "got a single value")]
)
def test_a_preset_that_is_not_a_mapping_is_refused(tmp_path, text, got):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    (message,) = problems([], path=preset)
    assert message.startswith(f"{preset}: the top level must be a mapping of sections")
    assert message.endswith(got)


def test_cli_yaml_syntax_error_exits_2_without_a_traceback(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train: [1\n")
    for args in (["--config", str(preset)], ["--config", str(TINY), "data.paths=[a,b"]):
        result = run_main(*args, "--dry-run")
        assert result.returncode == 2, result.stderr
        assert "invalid YAML" in result.stderr or "cannot be parsed" in result.stderr
        assert "Traceback" not in result.stderr


def test_every_field_is_documented():
    rows = describe_fields()
    assert [key for key, *_ in rows] == all_keys()
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert not undocumented
    for key in ("run.dir", "train.steps", "train.global_batch_size", "train.micro_batch_size", "train.seq_len",
                "optim.lr", "parallel.zero_stage", "parallel.tp", "parallel.pp", "checkpoint.interval",
                "logging.interval", "seed"):  # fmt: skip
        assert key in all_keys()


def test_resolved_yaml_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(TINY, ["optim.lr=1e-3", "model.num_kv_heads=null"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved) == cfg
    assert load_config(None) == Config()


def run_main(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "pretrain" / "main.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_misspelled_key_exits_nonzero_and_suggests():
    result = run_main("--config", str(TINY), "optim.lrr=1")
    assert result.returncode == 2
    assert "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in result.stderr


def test_cli_dry_run_prints_config_deepspeed_config_and_counts():
    result = run_main("--config", str(TINY), "--dry-run", "--world-size", "2", "parallel.zero_stage=2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# resolved config" in out and "zero_stage: 2" in out
    assert (
        '"train_batch_size": 16' in out and '"gradient_accumulation_steps": 2' in out and '"stage": 2' in out
    )
    assert "parameters: 820,352" in out  # matches the hand count in test_model.py
    assert "FLOPs per token (training, seq_len 256): 6,242,304" in out


def test_readme_config_reference_is_current():
    from pretrain.config import reference_markdown

    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, (
        "regenerate the README table from pretrain.config.reference_markdown()"
    )


def write_dataset(folder, num_tokens, vocab_size=1000, tokenizer_hash="a" * 64):
    """A prepared dataset of one document, written the way `prepare` writes one (without a tokenizer)."""
    import numpy as np

    from pretrain.data.indexed import IndexedDatasetWriter
    from pretrain.data.manifest import Manifest, ShardRecord, sha256_file

    folder.mkdir()
    shards = []
    if num_tokens:
        writer = IndexedDatasetWriter(folder / "shard_00000", np.uint16)
        writer.add_document(np.arange(num_tokens) % vocab_size)
        writer.finalize()
        digests = [sha256_file(folder / f"shard_00000.{ext}") for ext in ("bin", "idx")]
        shards.append(ShardRecord("shard_00000", num_tokens, 1, *digests))
    Manifest(tokenizer_hash, vocab_size, 0, "uint16", num_tokens, len(shards), shards).save(folder)
    return str(folder)


def refusal(action):
    from pretrain.errors import PretrainError

    with pytest.raises(PretrainError) as info:
        action()
    return type(info.value), str(info.value)


def dry_run_cases(tmp_path):
    big, small = write_dataset(tmp_path / "big", 5000), write_dataset(tmp_path / "small", 300)
    other = write_dataset(tmp_path / "other", 5000, tokenizer_hash="b" * 64)
    empty = write_dataset(tmp_path / "empty", 0)
    return {
        "vocabulary": [f"data.paths=[{big}]", "model.vocab_size=640"],
        "seq_len": [f"data.paths=[{big},{small}]", "model.vocab_size=1024", "train.seq_len=512"],
        "tokenizers": [f"data.paths=[{big},{other}]", "model.vocab_size=1024"],
        "empty": [f"data.paths=[{empty}]", "model.vocab_size=1024"],
        "builtin vocabulary": ["model.vocab_size=200"],
        "builtin seq_len": [
            "train.seq_len=20000000",
            "train.global_batch_size=4",
            "train.micro_batch_size=1",
        ],
    }


def test_dry_run_refuses_what_loading_the_data_refuses_with_the_same_message(tmp_path):
    """--dry-run reads the manifests (or the built-in corpus's file sizes); the real run opens the data.
    Both must refuse the same configs alike."""
    import torch

    from pretrain.data.checks import check_from_metadata
    from pretrain.parallel import DistInfo
    from pretrain.train.build import _load_data

    one_process = DistInfo(0, 0, 1, torch.device("cpu"))
    expected = {
        "vocabulary": (ConfigError, "set model.vocab_size >= 1000"),
        "seq_len": (
            DataError,
            f"dataset {tmp_path / 'small'} holds 300 tokens, fewer than one training sample",
        ),
        "tokenizers": (
            DataError,
            "tokenized with different tokenizers (big: aaaaaaaaaaaa; other: bbbbbbbbbbbb)",
        ),
        "empty": (DataError, f"dataset {tmp_path / 'empty'} holds no tokens"),
        "builtin vocabulary": (ConfigError, "(257, datasets python-stdlib); set model.vocab_size >= 257"),
        "builtin seq_len": (DataError, "dataset python-stdlib holds 1"),
    }
    for name, overrides in dry_run_cases(tmp_path).items():
        cfg = load_config(TINY, overrides)
        dry = refusal(lambda cfg=cfg: check_from_metadata(cfg))
        assert dry == refusal(lambda cfg=cfg: _load_data(cfg, one_process)), name
        assert dry[0] is expected[name][0] and expected[name][1] in dry[1], (name, dry)
    check_from_metadata(load_config(TINY, [f"data.paths=[{tmp_path / 'big'}]", "model.vocab_size=1024"]))


def test_cli_dry_run_checks_the_data(tmp_path):
    big = write_dataset(tmp_path / "big", 5000)
    result = run_main("--config", str(TINY), "--dry-run", f"data.paths=[{big}]", "model.vocab_size=640")
    assert result.returncode == 2 and "set model.vocab_size >= 1000" in result.stderr, result.stderr
    result = run_main("--config", str(TINY), "--dry-run", f"data.paths=[{big}]", "model.vocab_size=1024",
                      "train.seq_len=8192")  # fmt: skip
    assert result.returncode == 4 and "add data or shorten train.seq_len" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_dry_run_fetches_only_the_manifest_of_a_remote_dataset(tmp_path):
    import fsspec

    from pretrain.data.checks import check_from_metadata

    write_dataset(tmp_path / "d", 5000)
    fs = fsspec.filesystem("memory")
    for name in ("manifest.json", "shard_00000.bin", "shard_00000.idx"):
        fs.pipe(f"/remote-d/{name}", (tmp_path / "d" / name).read_bytes())
    cache = tmp_path / "cache"
    cfg = load_config(
        TINY, ["data.paths=[memory://remote-d]", "model.vocab_size=640", f"data.cache_dir={cache}"]
    )
    kind, message = refusal(lambda: check_from_metadata(cfg))
    assert kind is ConfigError and "set model.vocab_size >= 1000" in message
    assert not cache.exists()  # nothing of the dataset was copied


def test_offload_optimizer_takes_a_device_and_still_reads_the_old_booleans(tmp_path):
    assert load_config(TINY, ["parallel.offload_optimizer=true"]).parallel.offload_optimizer == "cpu"
    assert load_config(TINY, ["parallel.offload_optimizer=false"]).parallel.offload_optimizer == "none"
    old = tmp_path / "old.yaml"  # a config.yaml saved beside a checkpoint before the key took a device
    old.write_text("parallel:\n  zero_stage: 2\n  offload_optimizer: true\n")
    cfg = load_config(old)
    assert cfg.parallel.offload_optimizer == "cpu" and "offload_optimizer: cpu" in cfg.to_yaml()
    # Strict as before: only true/false translate, not numbers standing for them
    assert problems(["parallel.offload_optimizer=1"]) == [
        "parallel.offload_optimizer must be one of none, cpu, nvme, got '1'"
    ]
    assert problems(["parallel.offload_optimizer=gpu"]) == [
        "parallel.offload_optimizer must be one of none, cpu, nvme, got 'gpu'"
    ]


def test_offload_and_gradient_dtype_combinations_deepspeed_cannot_run_name_the_fix():
    assert problems(["parallel.offload_optimizer=cpu", "parallel.zero_stage=0"]) == [
        "parallel.offload_optimizer=cpu needs parallel.zero_stage >= 1 (DeepSpeed offloads ZeRO's optimizer "
        "partitions); set parallel.zero_stage=1, or parallel.offload_optimizer=none"
    ]
    (message,) = problems(["parallel.offload_optimizer=nvme", "parallel.zero_stage=3"])
    assert (
        "offload_optimizer=nvme is not supported" in message and "parallel.offload_optimizer=cpu" in message
    )
    assert problems(["train.precision=fp32", "train.grad_accum_dtype=bf16"]) == [
        "train.grad_accum_dtype=bf16 needs bf16 training (train.precision=fp32 keeps fp32 gradients); set "
        "train.precision=bf16, or train.grad_accum_dtype=fp32"
    ]
    (message,) = problems(["train.precision=bf16", "parallel.pp=2", "parallel.zero_stage=0"])
    assert "needs parallel.zero_stage=1" in message and "train.grad_accum_dtype=bf16" in message
    assert problems(["train.grad_accum_dtype=fp16"]) == [
        "train.grad_accum_dtype must be one of fp32, bf16, got 'fp16'"
    ]
    # What DeepSpeed can do loads: a bf16 pipeline accumulating in bf16, or with ZeRO-1 in fp32
    load_config(TINY, ["train.precision=bf16", "parallel.pp=2", "parallel.zero_stage=0",
                       "train.grad_accum_dtype=bf16"], world_size=2)  # fmt: skip
    load_config(TINY, ["train.precision=bf16", "parallel.pp=2", "parallel.zero_stage=1"], world_size=2)


def test_the_deepspeed_config_asks_for_fp32_gradients_and_cpu_offload():
    from pretrain.parallel.deepspeed_config import build_deepspeed_config

    cfg = load_config(TINY, ["parallel.zero_stage=2", "parallel.offload_optimizer=cpu"], world_size=2)
    ds = build_deepspeed_config(cfg, 2, "bf16")
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    bf16_sums = load_config(TINY, ["train.grad_accum_dtype=bf16"], world_size=2)
    assert build_deepspeed_config(bf16_sums, 2, "bf16")["communication_data_type"] == "bf16"
    plain = build_deepspeed_config(load_config(TINY, world_size=2), 2, "fp32")
    assert "data_types" not in plain and "offload_optimizer" not in plain["zero_optimization"]


def test_cli_refuses_nvme_offload_with_exit_2_before_starting():
    result = run_main(
        "--config", str(TINY), "--dry-run", "parallel.zero_stage=3", "parallel.offload_optimizer=nvme"
    )
    assert result.returncode == 2 and "parallel.offload_optimizer=nvme is not supported" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_auto_precision_that_resolves_to_bf16_is_checked_before_any_layer_is_built():
    # precision=auto passes pretrain.config (it cannot know the device); once a GPU resolves it to
    # bf16, a pipeline at ZeRO-0 with fp32 accumulation is DeepSpeed's "unsupported mix": refused by
    # build_trainer's precision check, which runs before the model is built.
    import torch

    from pretrain.parallel import DistInfo
    from pretrain.train.build import _check_precision

    cfg = load_config(TINY, ["train.precision=auto", "parallel.pp=2", "parallel.zero_stage=0"], world_size=2)
    cpu = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    _check_precision(cfg, "fp32", cpu)  # what 'auto' is on a CPU: fine
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=1"):
        _check_precision(cfg, "bf16", cpu)
