"""Exports and `train-tokenizer` folders work with the lowest transformers the pyproject allows as well
as the venv's own: `AutoTokenizer` + `AutoModelForCausalLM` + `model.generate(**tokenizer(...))`.

The lowest version lives beside the venv (`make setup` installs it into VENV/transformers-lowest with
pip --target) and is put first on PYTHONPATH of a subprocess; everything else comes from the venv."""

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from conftest import REPO
from convert_runs import run_convert_cli
from pretrain.config import ModelConfig
from pretrain.config.moe import MoEConfig
from pretrain.convert.tokenizer import export_tokenizer
from pretrain.data import ByteTokenizer
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer
from pretrain.model.names import parameter_shapes
from pretrain.weights.consolidated import write_consolidated

LOWEST_DIR = Path(sys.prefix) / "transformers-lowest"
TEXTS = [f"def function_{i}(x):\n    return x * {i}\n" for i in range(60)]
MODEL = ModelConfig(
    vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96
)

# Run by the transformers under test: load each tokenizer folder, tokenize a text and a padded batch,
# generate from both with the tokenizer's whole output as the model's keyword arguments.
GENERATE = """
import json, sys, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
results = {"version": transformers.__version__}
for folder in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(folder)
    one = tok("def f(x):", return_tensors="pt")
    out = model.generate(**one, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    result = {"keys": sorted(one.keys()), "ids": one["input_ids"][0].tolist(), "eos": tok.eos_token_id,
              "generated": out.shape[1] - one["input_ids"].shape[1]}
    if tok.pad_token is not None:
        batch = tok(["def f(x):", "return"], return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        result["batch_generated"] = out.shape[1] - batch["input_ids"].shape[1]
        result["batch_padding_side"] = tok.padding_side
    results[folder.rpartition("/")[2]] = result
print(json.dumps(results))
"""
# The tokenizer folders: an export's, `train-tokenizer`'s, the byte-level one an export of a run on
# the built-in corpus carries, and an export of a tokenizer folder without model_input_names (one
# written before they were, or another project's).
TOKENIZERS = ("hf", "tok", "bytes", "hf-old")


def lowest_allowed() -> str:
    """The transformers lower bound of pyproject.toml's dev extra, e.g. "4.45"."""
    found = re.search(r'"transformers>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert found, "pyproject.toml states no transformers>= bound"
    return found.group(1)


def lowest_transformers() -> Path:
    """VENV/transformers-lowest, checked to hold the pyproject's lowest transformers."""
    installed = {
        d.metadata["Name"].lower(): d.version for d in metadata.distributions(path=[str(LOWEST_DIR)])
    }
    if "transformers" not in installed:
        pytest.fail(
            f"{LOWEST_DIR} holds no transformers (an older `make setup` made this venv); re-run `make setup`"
        )
    bound = lowest_allowed()
    if not (installed["transformers"] + ".").startswith(bound + "."):
        pytest.fail(
            f"{LOWEST_DIR} holds transformers {installed['transformers']} but pyproject.toml allows >= {bound}; "
            f"update TRANSFORMERS_LOWEST in the Makefile and re-run `make setup`"
        )
    return LOWEST_DIR


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A real `to-hf` export of random weights, and the tokenizer folders of TOKENIZERS."""
    root = tmp_path_factory.mktemp("exports")
    train_tokenizer(TEXTS, MODEL.vocab_size, root / "tok")
    torch.manual_seed(0)
    weights = {n: torch.randn(s) * 0.02 for n, s in parameter_shapes(MODEL).items()}
    write_consolidated(root / "w.safetensors", MODEL, iter(weights.items()), {"test": True})
    command = [
        "to-hf",
        "--checkpoint",
        root / "w.safetensors",
        "--output",
        root / "hf",
        "--tokenizer",
        root / "tok",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.convert", *map(str, command)],
        cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    export_tokenizer(None, root / "bytes", MODEL.vocab_size)

    old = root / "old"
    old.mkdir()
    (old / "tokenizer.json").write_bytes((root / "tok" / "tokenizer.json").read_bytes())
    config = json.loads((root / "tok" / "tokenizer_config.json").read_text())
    for key in ("model_input_names", "padding_side"):
        config.pop(key, None)
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    export_tokenizer(old, root / "hf-old", MODEL.vocab_size)
    return root


def generate_with(transformers_dir: Path | None, folders: Path) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    if transformers_dir is not None:  # first on the path: it shadows the venv's transformers
        env["PYTHONPATH"] = os.pathsep.join([str(transformers_dir), env.get("PYTHONPATH", "")])
    tokenizers = [str(folders / name) for name in TOKENIZERS]
    result = subprocess.run(
        [sys.executable, "-c", GENERATE, str(folders / "hf"), *tokenizers],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["lowest", "venv"])
def test_generate_takes_the_tokenizers_output(folders, which):
    transformers_dir = lowest_transformers() if which == "lowest" else None
    results = generate_with(transformers_dir, folders)

    if which == "lowest":
        assert results["version"].startswith(lowest_allowed() + ".")
    else:
        assert not results["version"].startswith("4.")  # the venv's is the newest: 5.x
    trained = load_tokenizer(folders / "tok").encode_batch(["def f(x):"])[0]
    for name in TOKENIZERS:
        result = results[name]
        assert result["keys"] == ["attention_mask", "input_ids"], name
        assert result["generated"] == 6, name
        if name == "bytes":  # no pad token: the batch is not tried
            assert result["ids"] == ByteTokenizer().encode("def f(x):")
            assert result["eos"] == ByteTokenizer.eod_id
        else:
            assert result["ids"] == trained, name  # the ids the data was prepared with
            assert result["batch_generated"] == 6 and result["batch_padding_side"] == "left", name


def test_to_hf_verifies_under_the_lowest_transformers_and_names_a_class_it_lacks(folders, tmp_path):
    """With transformers 4.45: a dense export is verified (4.45 takes `torch_dtype`; the `dtype` that
    5.x takes once broke it with a raw TypeError), and an MoE export whose class 4.45 does not have
    (Glm4Moe) is refused up front, naming the class and the upgrade, nothing written."""
    lowest = lowest_transformers()
    dense = run_convert_cli(
        "to-hf",
        "--checkpoint",
        folders / "w.safetensors",
        "--output",
        tmp_path / "d",
        transformers_dir=lowest,
    )
    assert dense.returncode == 0, dense.stderr[-3000:]
    assert "verification passed" in dense.stdout + dense.stderr

    from pretrain.model.names import stored_shapes

    experts = MoEConfig(
        num_experts=4, top_k=2, score_func="sigmoid", first_dense_layers=1, expert_ffn_hidden_size=32
    )
    moe = ModelConfig(**{**MODEL.__dict__, "num_layers": 2, "moe": experts})
    weights = {n: torch.randn(s) * 0.02 for n, s in stored_shapes(moe).items()}
    write_consolidated(tmp_path / "moe.safetensors", moe, iter(weights.items()), {"test": True})
    refused = run_convert_cli(
        "to-hf",
        "--checkpoint",
        tmp_path / "moe.safetensors",
        "--output",
        tmp_path / "m",
        transformers_dir=lowest,
    )
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "has no Glm4MoeForCausalLM" in refused.stderr and "pip install -U transformers" in refused.stderr
    assert not (tmp_path / "m").exists()
