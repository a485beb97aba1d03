"""Conversion pieces that need no training run: the streaming safetensors writer, the byte-level
tokenizer, Hugging Face -> ours -> Hugging Face, what from-hf refuses, and init weights in the trainer."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pretrain.config import ConfigError, ModelConfig, load_config
from pretrain.convert import commands
from pretrain.data import ByteTokenizer
from pretrain.errors import ConversionError
from pretrain.model.names import parameter_shapes
from pretrain.weights.consolidated import open_init_weights, write_consolidated
from pretrain.weights.safetensors_io import SafetensorsWriter, plan_shards

transformers = pytest.importorskip("transformers")

SMALL_MODEL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 4, "max_position_embeddings": 64, "rope_theta": 50000.0,
               "rms_norm_eps": 1e-6}  # fmt: skip


def test_streamed_safetensors_read_back_with_the_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.float16).reshape(2, 3),
    }
    path = tmp_path / "x.safetensors"
    entries = [(n, t.dtype, t.shape) for n, t in tensors.items()]
    with SafetensorsWriter(path, entries, {"k": "v"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)

    with (
        pytest.raises(ValueError, match="expected tensor b"),
        SafetensorsWriter(tmp_path / "y.safetensors", entries) as w,
    ):
        w.write("a", tensors["a"])
        w.write("c", tensors["c"])
    with (
        pytest.raises(ValueError, match="were never written"),
        SafetensorsWriter(tmp_path / "y.safetensors", entries) as w,
    ):
        w.write("a", tensors["a"])
    assert not list(tmp_path.glob("*y.safetensors*"))  # nothing half-written is left behind


def test_shards_keep_order_and_respect_the_limit():
    sizes = [("a", 40), ("b", 40), ("c", 30), ("d", 100), ("e", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards(sizes, 1000) == [["a", "b", "c", "d", "e"]]


def test_byte_level_tokenizer_gives_the_ids_training_saw(tmp_path):
    from pretrain.convert.tokenizer import export_tokenizer

    export_tokenizer(None, tmp_path, model_vocab_size=320)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [
        "plain ascii",
        " leading and  double  spaces\n\t",
        "ünïcödé ∑ 😀",
        "<|eos|> is text here? no",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if "<|eos|>" not in text:
            assert ids == ByteTokenizer().encode(text), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 256 and len(tokenizer) == 257
    with pytest.raises(ConversionError, match="257 tokens but the model only 200 rows"):
        export_tokenizer(None, tmp_path, model_vocab_size=200)


def save_hf_model(folder, tied, kv_heads=2, dtype=torch.bfloat16, **saving):
    config = transformers.LlamaConfig(**SMALL_MODEL, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, **saving)
    return model


def hf_tensors(folder):
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_hugging_face_to_ours_to_hugging_face_is_bitwise(tmp_path, tied):
    """A model made by transformers itself (bf16, grouped-query attention, sharded files), imported
    and exported again: the same tensors to the bit, and a config that describes the same model."""
    save_hf_model(tmp_path / "hf", tied, max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    report = commands.from_hf(tmp_path / "hf", tmp_path / "init")
    assert "checkpoint.init_weights=" in report.notes[0] and "model.num_kv_heads=2" in report.notes[0]
    commands.to_hf(tmp_path / "init", tmp_path / "back", max_shard_size="40KB")  # auto: bf16 as it came

    before, after = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == torch.bfloat16 and torch.equal(after[name], tensor), name
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):  # fmt: skip
        assert exported[key] == original[key], key
    assert exported["rope_parameters"]["rope_theta"] == 50000.0


def test_from_hf_refuses_what_our_model_cannot_compute(tmp_path):
    save_hf_model(tmp_path / "hf", tied=False)
    config_file = tmp_path / "hf" / "config.json"
    good = json.loads(config_file.read_text())

    def refused(changes, *patterns):
        config_file.write_text(json.dumps({**good, **changes}))
        with pytest.raises(ConversionError) as error:
            commands.from_hf(tmp_path / "hf", tmp_path / "out", overwrite=True)
        for pattern in patterns:
            assert pattern in str(error.value)
        assert not (tmp_path / "out").exists()

    refused({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rotary scaling")
    refused({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rotary scaling")
    refused({"attention_bias": True, "hidden_act": "gelu"}, "attention_bias is true", "hidden_act is 'gelu'")
    refused(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
        "model_type is 'gpt2'",
        "these convert: llama",
    )
    refused({"head_dim": 33}, "head_dim 33 is not a positive even width")
    # A head_dim other than hidden / heads is model.head_dim (these weights are 16 wide: refused by shape).
    refused({"head_dim": 32}, "q_proj.weight has shape [64, 64], config.json implies [128, 64]")
    refused(
        {"intermediate_size": 128}, "mlp.gate_proj.weight has shape [96, 64], config.json implies [128, 64]"
    )
    refused({"num_hidden_layers": 3}, "tensor model.layers.2.self_attn.q_proj.weight is missing")
    refused({"num_hidden_layers": 1}, "unexpected tensor model.layers.1.")


def test_pickled_weights_need_allow_pickle(tmp_path):
    reference = save_hf_model(tmp_path / "hf", tied=False, dtype=torch.float32)
    # The format of older checkpoints (transformers 5 writes only safetensors).
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(reference.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"only pickled weights.*runs code.*--allow-pickle"):
        commands.from_hf(tmp_path / "hf", tmp_path / "init")
    commands.from_hf(tmp_path / "hf", tmp_path / "init", allow_pickle=True)
    with safe_open(str(tmp_path / "init" / "model.safetensors"), framework="pt") as f:
        assert torch.equal(
            f.get_tensor("blocks.1.mlp.up_proj.weight"), reference.model.layers[1].mlp.up_proj.weight
        )


def consolidated_file(path, cfg):
    tensors = {n: torch.randn(s) for n, s in parameter_shapes(cfg).items()}
    write_consolidated(path, cfg, iter(tensors.items()), {"test": True})
    return tensors


SMALL_CFG = ModelConfig(
    vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96
)


def test_init_weights_that_do_not_fit_the_model_are_a_config_error_with_the_fix(tmp_path):
    consolidated_file(tmp_path / "w.safetensors", SMALL_CFG)
    wider = ModelConfig(**{**SMALL_CFG.__dict__, "hidden_size": 128, "rope_theta": 5e5})
    with pytest.raises(ConfigError) as error:
        open_init_weights(str(tmp_path / "w.safetensors"), wider)
    message = str(error.value)
    assert "model.hidden_size: the weights have 64, the config has 128; set model.hidden_size=64" in message
    assert "model.rope_theta: the weights have 10000.0, the config has 500000.0" in message

    # Weights of Qwen3-style attention (an imported Qwen3) started without its two settings.
    qwen = ModelConfig(**{**SMALL_CFG.__dict__, "head_dim": 32, "qk_norm": True})
    consolidated_file(tmp_path / "qwen.safetensors", qwen)
    with pytest.raises(ConfigError) as error:
        open_init_weights(str(tmp_path / "qwen.safetensors"), SMALL_CFG)
    message = str(error.value)
    assert "set model.head_dim=32" in message and "set model.qk_norm=true" in message, message

    # A file whose tensors disagree with its own model config: the tensor is named with both shapes.
    tensors = {n: torch.randn(s) for n, s in parameter_shapes(SMALL_CFG).items()}
    tensors["blocks.1.mlp.up_proj.weight"] = torch.randn(100, 64)
    metadata = {
        "pretrain.format": "pretrain-consolidated-v1",
        "pretrain.model_config": json.dumps(dataclasses.asdict(SMALL_CFG)),
    }
    with SafetensorsWriter(
        tmp_path / "bad.safetensors", [(n, t.dtype, t.shape) for n, t in tensors.items()], metadata
    ) as w:
        for name, tensor in tensors.items():
            w.write(name, tensor)
    with pytest.raises(
        ConfigError, match=r"blocks.1.mlp.up_proj.weight has shape \[100, 64\], the model expects \[96, 64\]"
    ):
        open_init_weights(str(tmp_path / "bad.safetensors"), SMALL_CFG)

    with pytest.raises(ConfigError, match=r"no consolidated weights at .*nothing.*from-hf"):
        open_init_weights(str(tmp_path / "nothing"), SMALL_CFG)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:5000])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        open_init_weights(str(tmp_path / "cut.safetensors"), SMALL_CFG)
    with pytest.raises(ConfigError, match=r"checkpoint.init_weights must be a path"):
        load_config(None, ["checkpoint.init_weights=''"])


def test_the_trainer_builds_its_layers_from_init_weights_padding_the_vocabulary(tmp_path):
    """parallelize_model (one process) with checkpoint.init_weights: the model holds exactly the file's
    tensors, the vocabulary rows padded with zeros to the training layout's size."""
    from pretrain.parallel import parallelize_model
    from pretrain.parallel.topology import single_process_context

    for tied in (False, True):
        model_cfg = ModelConfig(**{**SMALL_CFG.__dict__, "tie_embeddings": tied})
        tensors = consolidated_file(tmp_path / f"{tied}.safetensors", model_cfg)
        overrides = [f"model.{k}={v}" for k, v in model_cfg.__dict__.items() if v is not None and k != "moe"]
        cfg = load_config(None, [*overrides, f"checkpoint.init_weights={tmp_path / f'{tied}.safetensors'}"])
        model = parallelize_model(cfg, single_process_context(), torch.device("cpu"))
        params = dict(model.named_parameters())
        assert model.embedding.weight.shape == (384, 64) and not model.embedding.weight[300:].any()
        assert torch.equal(model.embedding.weight[:300], tensors["embedding.weight"])
        assert (model.head.weight is model.embedding.weight) == tied
        for name, tensor in tensors.items():
            if name not in ("embedding.weight", "head.weight"):
                assert torch.equal(params[name], tensor), name


def test_a_run_on_prepared_data_exports_the_tokenizer_it_was_prepared_with(tmp_path):
    """The dataset's manifest names the tokenizer and its hash: the export copies that tokenizer, and
    refuses a moved or different one unless --tokenizer names the same tokenizer."""
    from pretrain.convert.tokenizer import export_tokenizer, run_tokenizer
    from pretrain.data.prepare import prepare
    from pretrain.data.tokenizer import train_tokenizer

    texts = [f"def function_{i}(x):\n    return x * {i}\n" for i in range(60)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer(texts, 300, tmp_path / "tok")
    train_tokenizer(texts[:30], 300, tmp_path / "other")
    prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "tok"), tmp_path / "data")
    cfg = load_config(None, [f"data.paths=[{tmp_path / 'data'}]", "model.vocab_size=320"])

    source = run_tokenizer(cfg)
    exported = export_tokenizer(source, tmp_path / "hf", model_vocab_size=320)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert ours(texts[7])["input_ids"] == reference(texts[7])["input_ids"]
    assert exported.special_tokens["eos"] == ours.eos_token_id == reference.convert_tokens_to_ids("<|eos|>")

    with pytest.raises(ConversionError, match=r"is not the one .* was prepared with.*--tokenizer"):
        run_tokenizer(cfg, tmp_path / "other")
    (tmp_path / "tok").rename(tmp_path / "moved")
    with pytest.raises(ConversionError, match=r"is not there any more; pass --tokenizer"):
        run_tokenizer(cfg)
    assert run_tokenizer(cfg, tmp_path / "moved") == tmp_path / "moved"
    with pytest.raises(ConversionError, match="300 tokens but the model only 200 rows"):
        export_tokenizer(tmp_path / "moved", tmp_path / "hf2", model_vocab_size=200)
