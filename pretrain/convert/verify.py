"""Proof that an export computes what the framework's own model computes.

`transformers` loads the exported folder in fp32; our `Transformer` is built from the same weights
(rounded to the export dtype, so both hold identical numbers). On fixed token ids:

- logits: max |difference| must be at most LOGIT_TOLERANCE x max(1, max |logit|). Both models run
  the same fp32 arithmetic in a different order (fused SDPA against eager softmax, fused rsqrt):
  observed differences are ~1e-6 of the logit scale. A wrong export is not a rounding effect: a
  transposed, swapped or misnamed tensor moves logits by far more than 1e-4 of their scale. The
  check is on the maximum over every logit, not on a KL divergence, which averages a localised
  error away (a KL of 3e-6 once passed a broken export).
- every layer's output is compared the same way, so a failure names the first layer that differs,
  and within a block whether its attention or its MLP (dense or mixture of experts) differs.
- greedy generation of GENERATED_TOKENS tokens with `generate` (its KV cache and incremental rotary
  positions, which a single forward pass does not exercise) must give our tokens exactly; a
  position where our top two logits are within the tolerance is reported as a tie, not a failure.

The folder is loaded with `AutoModelForCausalLM`: the class its config.json names (Llama, Qwen3,
Qwen3-MoE, Qwen2-MoE, Mixtral, Glm4Moe; pretrain.convert.hf_moe). Those classes are dropless, so a model
trained with an expert capacity (model.moe.dropless=false) is compared as our model computes without
one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model import Transformer

LOGIT_TOLERANCE = 1e-4
GENERATED_TOKENS = 32
SAMPLE_SHAPE = (2, 64)  # batch, positions
PROMPT_TOKENS = 8


@dataclass
class Verification:
    passed: bool
    max_abs_diff: float
    max_rel_diff: float  # max |difference| / max |logit|
    tolerance: float
    where: str  # the largest logit difference: batch, position, token
    first_bad_layer: str | None
    generated_equal: bool
    generation_note: str
    details: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [
            f"verification {verdict}: logits max |diff| {self.max_abs_diff:.3g} ({self.max_rel_diff:.3g} of the "
            f"largest logit; tolerance {self.tolerance:g}) at {self.where}; greedy {GENERATED_TOKENS} tokens: "
            f"{self.generation_note}"
        ]
        if self.first_bad_layer:
            lines.append(f"first layer that differs: {self.first_bad_layer}")
        return "\n".join(lines + self.details)


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> Transformer:
    """Our plain model holding exactly `tensors` (plain names, unpadded vocabulary, routers' buffers
    included), in fp32; a mixture of experts without a capacity (as every Hugging Face class)."""
    if cfg.moe.enabled and not cfg.moe.dropless:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dropless=True, capacity_factor=None))
    with torch.device("meta"):
        model = Transformer(cfg, padded_vocab_size=cfg.vocab_size)
    state = {name: tensor.float() for name, tensor in tensors}
    if cfg.tie_embeddings:
        state["head.weight"] = state["embedding.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.head.weight = model.embedding.weight
    return model.eval()


def _layer_outputs(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    outputs, x = [], tokens
    for layer in model.layers():
        x = layer(x)
        outputs.append(x)
    return outputs


def _hf_layer_outputs(hf: Any, tokens: torch.Tensor) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    modules = [hf.model.embed_tokens, *hf.model.layers, hf.model.norm]
    handles = [m.register_forward_hook(keep) for m in modules]
    try:
        logits = hf(tokens, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return [*captured, logits]


def _bad_part(model: Transformer, hf: Any, tokens: torch.Tensor, index: int) -> str:
    """Which of block `index`'s attention and MLP differs first (each seeing its own model's input)."""
    ours: Any = model.blocks[index]
    theirs = hf.model.layers[index]
    pairs = [("attention", ours.attn, theirs.self_attn, "self_attn"), ("MLP", ours.mlp, theirs.mlp, "mlp")]
    moe = "mixture-of-experts block" if ours.mlp.__class__.__name__ == "MixtureOfExperts" else "dense MLP"
    for what, a, b, hf_name in pairs:
        got = _outputs_of({"ours": a, "theirs": b}, lambda: (model(tokens), hf(tokens, use_cache=False)))
        diff = (got["ours"] - got["theirs"]).abs().max().item()
        if diff > LOGIT_TOLERANCE * max(1.0, got["ours"].abs().max().item()):
            label = moe if what == "MLP" else what
            return f", in its {label} (HF model.layers.{index}.{hf_name}; max |diff| {diff:.3g})"
    return ""


def _outputs_of(modules: dict[str, nn.Module], run: Any) -> dict[str, torch.Tensor]:
    """The output of each of `modules` during `run()`."""
    got: dict[str, torch.Tensor] = {}

    def hook(key: str) -> Any:
        return lambda _m, _a, out: got.setdefault(key, out[0] if isinstance(out, tuple) else out)

    handles = [m.register_forward_hook(hook(key)) for key, m in modules.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return got


def _first_bad_layer(ours: list[torch.Tensor], theirs: list[torch.Tensor], names: list[str]) -> str | None:
    for name, a, b in zip(names, ours, theirs, strict=True):
        diff = (a - b).abs().max().item()
        scale = max(1.0, a.abs().max().item())
        if a.shape != b.shape or diff > LOGIT_TOLERANCE * scale:
            return f"{name} (max |diff| {diff:.3g}, scale {scale:.3g})"
    return None


@torch.no_grad()
def _greedy(model: Transformer, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    tokens, logits = prompt, []
    for _ in range(steps):
        last = model(tokens)[:, -1]
        logits.append(last[0])
        tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
    return tokens[0, prompt.shape[1] :], logits


def missing_class_problem(architecture: str) -> str | None:
    """Why the installed transformers cannot verify an export of class `architecture`, if it cannot."""
    import transformers

    if hasattr(transformers, architecture):
        return None
    return (
        f"the installed transformers {transformers.__version__} has no {architecture}, which verification "
        f"loads the export with: upgrade it (pip install -U transformers)"
    )


def _load_fp32(folder: Path) -> Any:
    """The export through `AutoModelForCausalLM`, in fp32: transformers 4.56 renamed `torch_dtype`
    to `dtype` (4.x before it stores an unknown `dtype` in the config, which then fails to save)."""
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(folder, **{key: torch.float32}).eval()


@torch.no_grad()
def verify_export(folder: Path, model: Transformer, seed: int = 0) -> Verification:
    """Compare the export in `folder` with `model` (see `build_model`) on fixed inputs."""
    from transformers import GenerationConfig

    hf = _load_fp32(folder)
    cfg = model.cfg
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, SAMPLE_SHAPE, generator=generator)

    ours = _layer_outputs(model, tokens)
    theirs = _hf_layer_outputs(hf, tokens)
    names = [f"{n} (HF {h})" for n, h in _layer_names(cfg)] + ["logits"]
    ours_logits, hf_logits = ours[-1], theirs[-1]
    if ours_logits.shape != hf_logits.shape:
        return Verification(
            False, float("inf"), float("inf"), LOGIT_TOLERANCE, f"shapes {list(ours_logits.shape)} vs "
            f"{list(hf_logits.shape)}", "logits", False, "not run",
        )  # fmt: skip
    diff = (ours_logits - hf_logits).abs()
    max_diff = diff.max().item()
    scale = max(1.0, ours_logits.abs().max().item())
    b, p, t = (int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    where = (
        f"batch {b}, position {p}, token {t} (ours {ours_logits[b, p, t]:.6g}, HF {hf_logits[b, p, t]:.6g})"
    )
    logits_ok = max_diff <= LOGIT_TOLERANCE * scale
    bad_layer = None if logits_ok else _first_bad_layer(ours, theirs, names)
    if bad_layer is not None and bad_layer.startswith("blocks."):
        bad_layer += _bad_part(model, hf, tokens, int(bad_layer.split(".")[1].split(" ")[0]))

    prompt = tokens[:1, :PROMPT_TOKENS]
    our_tokens, our_step_logits = _greedy(model, prompt, GENERATED_TOKENS)
    generation = GenerationConfig(
        do_sample=False,
        max_new_tokens=GENERATED_TOKENS,
        min_new_tokens=GENERATED_TOKENS,
        eos_token_id=None,
        pad_token_id=0,
    )
    # An explicit mask: without one, transformers masks every prompt token equal to pad_token_id.
    mask = torch.ones_like(prompt)
    hf_tokens = hf.generate(prompt, attention_mask=mask, generation_config=generation)[0, PROMPT_TOKENS:]
    generated_equal, note = _compare_generations(our_tokens, hf_tokens, our_step_logits, scale)
    return Verification(
        logits_ok and generated_equal,
        max_diff,
        max_diff / max(ours_logits.abs().max().item(), 1e-30),
        LOGIT_TOLERANCE,
        where,
        bad_layer,
        generated_equal,
        note,
    )


def _compare_generations(
    ours: torch.Tensor, theirs: torch.Tensor, our_logits: list[torch.Tensor], scale: float
) -> tuple[bool, str]:
    if ours.shape == theirs.shape and torch.equal(ours, theirs):
        return True, "identical"
    n = min(len(ours), len(theirs))
    mismatch = next((i for i in range(n) if ours[i] != theirs[i]), n)
    if mismatch < n:
        logits = our_logits[mismatch]
        margin = (logits[ours[mismatch]] - logits[theirs[mismatch]]).item()
        if margin <= LOGIT_TOLERANCE * scale:
            return True, (
                f"identical up to token {mismatch}, where our top two logits tie within the tolerance "
                f"({margin:.3g}); the rest follows a different but equally greedy path"
            )
    return False, (
        f"differ from generated token {mismatch}: ours {ours[mismatch : mismatch + 5].tolist()}..., "
        f"transformers {theirs[mismatch : mismatch + 5].tolist()}..."
    )


def _layer_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    blocks = [(f"blocks.{i}", f"model.layers.{i}") for i in range(cfg.num_layers)]
    return [("embedding", "model.embed_tokens"), *blocks, ("norm", "model.norm")]
