"""Conversion of real checkpoints: the small model trained by DeepSpeed in six layouts (2 and 4 CPU
processes), consolidated, exported to Hugging Face, checked against `transformers`, imported back
and trained from in another layout.

Each layout is trained once per module (2 steps, then saved); the in-memory fp32 masters at save
time, gathered from DeepSpeed's optimizer by `safe_get_full_fp32_param`, are the ground truth."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert_runs import run_convert_cli, train_and_capture_masters
from pretrain.config import load_config
from pretrain.convert import commands
from pretrain.convert.verify import LOGIT_TOLERANCE, build_model
from pretrain.errors import ConversionError
from pretrain.parallel.tp_plan import partition_dim
from pretrain.testing import run_distributed
from training_runs import step_records, train_and_read_metrics

pytestmark = pytest.mark.slow

LAYOUTS = {
    # ZeRO-3: the weights exist only as fp32 partitions, each parameter split over 2 DP ranks.
    "zero3-bf16": (2, ["parallel.zero_stage=3", "train.precision=bf16"]),
    # ZeRO-2 with bf16: the module holds bf16 copies; the fp32 masters are flat, split over DP ranks.
    "zero2-bf16": (2, ["parallel.zero_stage=2", "train.precision=bf16"]),
    # fp32 module weights in two TP shards (vocabulary padded to 512 for tp=2), tied embeddings.
    "tp2-tied": (2, ["parallel.tp=2", "model.tie_embeddings=true"]),
    # Pipeline layer files, the tied head living on the last stage; plain multi-head attention.
    "pp2-tied-mha": (2, ["parallel.pp=2", "model.tie_embeddings=true", "model.num_kv_heads=4"]),
    # fp16 without ZeRO: the masters are DeepSpeed's fp16 optimizer's unflattened, unnamed fp32 copies.
    "pp2-tied-fp16-zero0": (
        2,
        ["parallel.pp=2", "model.tie_embeddings=true", "parallel.zero_stage=0", "train.precision=fp16"],
    ),
    # 4 model-parallel ranks, fp32 masters from their optimizer partitions, pipeline names.
    "tp2xpp2-bf16": (4, ["parallel.tp=2", "parallel.pp=2", "train.precision=bf16"]),
}
VOCAB = 320  # configs/tiny.yaml; padded to 384 (tp=1) or 512 (tp=2) in training


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# DeepSpeed's CPU accelerator trains fp16 only where oneDNN has fp16 kernels (AVX512-FP16 / AMX-FP16
# CPUs, e.g. Intel Sapphire Rapids); elsewhere the fp16 layout cannot be trained, so it is not tested.
FP16_ON_THIS_CPU = pytest.mark.skipif(
    not _fp16_supported(), reason="this CPU has no fp16 kernels (oneDNN): DeepSpeed refuses fp16 here"
)
LAYOUT_PARAMS = [pytest.param(name, marks=FP16_ON_THIS_CPU) if "fp16" in name else name for name in LAYOUTS]


def merge_truth(results, cfg):
    """Full unpadded tensors from every rank's masters: TP shards joined along the plan's dimension."""
    shards = {}
    for result in results:
        if result["dp_rank"] != 0:
            continue
        for name, value in result["masters"].items():
            shards.setdefault(name, {})[result["tp_rank"]] = torch.from_numpy(value)
    truth = {}
    for name, by_rank in shards.items():
        parts = [by_rank[t] for t in sorted(by_rank)]
        dim = partition_dim(name)
        full = torch.cat(parts, dim) if dim is not None and len(parts) > 1 else parts[0]
        if name in ("embedding.weight", "head.weight"):
            assert not full[VOCAB:].any(), "padded rows are zero in training"
            full = full[:VOCAB]
        truth[name] = full
    if cfg.model.tie_embeddings:
        truth.pop("head.weight", None)
    return truth


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(layout) -> (run directory, config, fp32 masters at save time); each layout trains once."""
    cache = {}

    def get(layout):
        if layout not in cache:
            world, overrides = LAYOUTS[layout]
            run_dir = tmp_path_factory.mktemp(layout) / "run"
            results = run_distributed(train_and_capture_masters, world, overrides, str(run_dir))
            cfg = load_config(run_dir / "config.yaml")
            cache[layout] = (run_dir, cfg, merge_truth(results, cfg))
        return cache[layout]

    return get


def read_safetensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_consolidated_fp32_weights_equal_the_in_memory_masters_bitwise(layout, trained, tmp_path):
    run_dir, cfg, truth = trained(layout)
    out = tmp_path / "weights.safetensors"
    commands.to_fp32(run_dir, out)
    tensors, metadata = read_safetensors(out)
    assert sorted(tensors) == sorted(truth)  # nothing lost, nothing extra; a tied head is stored once
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, truth[name]), name
    assert json.loads(metadata["pretrain.model_config"])["tie_embeddings"] == cfg.model.tie_embeddings
    assert json.loads(metadata["pretrain.provenance"])["step"] == 2


@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_export_computes_what_our_model_computes_in_transformers(layout, trained, tmp_path):
    from transformers import LlamaForCausalLM

    run_dir, cfg, truth = trained(layout)
    out = tmp_path / "hf"
    shard_size = "150KB" if layout == "tp2xpp2-bf16" else "5GB"  # one layout also exercises sharding
    report = commands.to_hf(run_dir, out, max_shard_size=shard_size)
    assert report.verification.passed and report.verification.generated_equal
    assert report.verification.max_abs_diff <= LOGIT_TOLERANCE

    config = json.loads((out / "config.json").read_text())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    assert config["vocab_size"] == VOCAB  # the padding rows are gone
    assert config["num_key_value_heads"] == cfg.model.kv_heads and config["head_dim"] == 16
    assert config["tie_word_embeddings"] == cfg.model.tie_embeddings
    assert config["max_position_embeddings"] == 64 and config["rope_theta"] == 10000.0
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")  # auto: the precision trained in
    assert config["pretrain_provenance"]["step"] == 2
    if layout == "tp2xpp2-bf16":
        assert len(report.files) > 1 and (out / "model.safetensors.index.json").is_file()

    # The files hold the masters, rounded to the export dtype, under Hugging Face's names.
    exported = {}
    for file in report.files:
        exported.update(read_safetensors(out / file)[0])
    assert exported["model.embed_tokens.weight"].shape == (VOCAB, 64)
    assert ("lm_head.weight" in exported) != cfg.model.tie_embeddings
    assert torch.equal(
        exported["model.layers.1.self_attn.o_proj.weight"], truth["blocks.1.attn.o_proj.weight"].to(dtype)
    )

    # Independently of the built-in verification: transformers' logits against our model built
    # straight from the in-memory masters (rounded the same way). Tolerance as in verify.py.
    ours = build_model(cfg.model, ((n, t.to(dtype)) for n, t in truth.items()))
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=LOGIT_TOLERANCE)


def test_ours_to_hf_to_ours_is_bitwise(trained, tmp_path):
    for layout in ("tp2-tied", "zero3-bf16"):
        run_dir, _, truth = trained(layout)
        commands.to_hf(run_dir, tmp_path / layout / "hf", dtype="fp32", verify=False)
        commands.from_hf(tmp_path / layout / "hf", tmp_path / layout / "init")
        back, _ = read_safetensors(tmp_path / layout / "init" / "model.safetensors")
        assert sorted(back) == sorted(truth)
        for name, tensor in back.items():
            assert torch.equal(tensor, truth[name]), (layout, name)


def test_a_swapped_q_and_k_export_is_refused_naming_the_layer(trained, tmp_path, monkeypatch):
    """A naming bug of the kind verification exists for: q written as k and k as q. The shapes agree
    (multi-head attention), so the files load; only the numbers betray it."""
    run_dir, _, _ = trained("pp2-tied-mha")
    correct = commands.to_hf_name

    def swapped(name):
        for a, b in (("q_proj", "k_proj"), ("k_proj", "q_proj")):
            if f".{a}." in name:
                return correct(name.replace(a, b))
        return correct(name)

    monkeypatch.setattr(commands, "to_hf_name", swapped)
    out = tmp_path / "hf"
    with pytest.raises(ConversionError) as error:
        commands.to_hf(run_dir, out)
    message = str(error.value)
    assert "verification FAILED" in message and "first layer that differs: blocks.0" in message
    assert not out.exists() and (tmp_path / "hf.rejected" / "config.json").is_file()


def test_command_line_export_loads_and_generates_with_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.data import ByteTokenizer

    run_dir, _, _ = trained("tp2-tied")
    out = tmp_path / "hf"
    result = run_convert_cli("to-hf", "--checkpoint", run_dir, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "verification passed" in result.stdout and "greedy 32 tokens: identical" in result.stdout

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x  # ünïcode"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)
    assert tokenizer.eos_token_id == ByteTokenizer.eod_id
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("def ", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 20) and isinstance(tokenizer.decode(generated[0]), str)

    again = run_convert_cli("to-hf", "--checkpoint", run_dir, "--output", out, "--no-verify")
    assert again.returncode == 1 and "already exists" in again.stderr and "--overwrite" in again.stderr
    unverified = run_convert_cli(
        "to-hf", "--checkpoint", run_dir, "--output", tmp_path / "hf2", "--no-verify"
    )
    assert unverified.returncode == 0 and "not verified (--no-verify)" in unverified.stdout

    # A transposed tensor in an existing export: `verify` fails, names the layer, exits non-zero.
    weights = load_file(tmp_path / "hf2" / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    weights[name] = weights[name].t().contiguous()
    save_file(weights, tmp_path / "hf2" / "model.safetensors", metadata={"format": "pt"})
    checked = run_convert_cli("verify", "--checkpoint", run_dir, "--hf", tmp_path / "hf2")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "verification FAILED" in checked.stdout and "first layer that differs: blocks.1" in checked.stdout


def first_batch(cfg):
    """The global batch of training step 1, as (inputs, labels) over all micro-batches."""
    from pretrain.data import DistributedBatches, load_training_data

    data = load_training_data(cfg.data, cfg.train.seq_len)
    batches = DistributedBatches(
        data.train, cfg.seed, cfg.train.global_batch_size, cfg.train.micro_batch_size, 0, 1
    ).next_step()
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.zero_stage=3"]], ids=["tp2", "zero3"])
def test_training_from_an_imported_model_starts_from_its_loss_in_another_layout(trained, tmp_path, layout):
    """HF export of the ZeRO-3 run (bf16 weights) -> from-hf -> 2 steps with TP=2 (another layout,
    padded vocabulary 512 instead of 384), or with ZeRO-3 over 2 ranks (each layer read from the
    file, then cut into the rank's partitions). Step 1's loss is computed before any update, so it
    must be the Hugging Face model's loss on that batch."""
    from transformers import LlamaForCausalLM

    run_dir, cfg, _ = trained("zero3-bf16")
    commands.to_hf(run_dir, tmp_path / "hf", verify=False)
    commands.from_hf(tmp_path / "hf", tmp_path / "init")
    records, _ = run_distributed(
        train_and_read_metrics, 2,
        [*layout, "train.steps=2", f"checkpoint.init_weights={tmp_path / 'init'}"], str(tmp_path / "run"),
    )  # fmt: skip
    losses = [r["loss"] for r in step_records(records)]

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    inputs, labels = first_batch(cfg)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(hf(inputs).logits.flatten(0, 1), labels.flatten()).item()
    # fp32 on both sides; TP=2 sums the attention and MLP outputs of two shards and computes the loss
    # over a split vocabulary, ZeRO-3 averages two ranks' losses: reordered fp32 sums, observed ~1e-7
    # relative.
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[1] < losses[0]
    assert abs(losses[0] - np.log(VOCAB)) > 0.05  # not a fresh init: that would start at ln(320)


def test_damaged_or_unfinished_checkpoints_are_refused_naming_the_file(trained, tmp_path):
    run_dir, _, _ = trained("tp2-tied")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    step = copy / "checkpoints" / "step00000002"

    # The trainer's manifest is what makes a checkpoint complete: a damaged file is found before reading.
    shard = step / "mp_rank_01_model_states.pt"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:1000])
    with pytest.raises(
        ConversionError, match=r"holds no complete checkpoint; it holds step00000002, none complete"
    ):
        commands.to_fp32(copy, tmp_path / "a.safetensors")
    with pytest.raises(
        ConversionError, match=r"mp_rank_01_model_states.pt has 1,000 bytes, the manifest says"
    ):
        commands.to_fp32(step, tmp_path / "a.safetensors")
    shard.write_bytes(intact)

    # Without a manifest (a checkpoint of plain DeepSpeed) DeepSpeed's `latest` names the complete one,
    # and the reader itself names what is damaged.
    (step / "manifest.json").unlink()
    commands.to_fp32(copy, tmp_path / "a.safetensors")
    (copy / "checkpoints" / "latest").unlink()
    with pytest.raises(
        ConversionError, match=r"holds no complete checkpoint; it holds step00000002, none complete"
    ):
        commands.to_fp32(copy, tmp_path / "a1.safetensors")
    commands.to_fp32(step, tmp_path / "a2.safetensors")  # naming the step directory works

    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(
        ConversionError, match=r"mp_rank_01_model_states.pt cannot be read.*truncated or corrupt"
    ):
        commands.to_fp32(step, tmp_path / "b.safetensors")
    shard.unlink()
    with pytest.raises(
        ConversionError, match=r"mp_rank_01_model_states.pt is missing: the checkpoint is incomplete"
    ):
        commands.to_fp32(step, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
