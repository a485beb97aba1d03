"""`model.moe.*`: the sparse mixture-of-experts MLP (off when num_experts is 0), and its own checks.

Expert parallelism (`parallel.ep`) is checked with the other degrees, in `ParallelConfig.problems`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.fields import choices, documented, one_of, positive

ScoreFunc = Literal["softmax", "sigmoid"]
SCORE_FUNCS: tuple[ScoreFunc, ...] = choices(ScoreFunc)


@dataclass(unsafe_hash=True)  # hashable by value: pretrain.plan caches layer counts per model shape
class MoEConfig:
    """A mixture of SwiGLU experts in place of the dense MLP (DeepSeek-V3 / Qwen3-MoE style)."""

    num_experts: int = documented(
        "Routed experts per MoE block; 0 keeps every block dense (no MoE at all).", 0
    )
    top_k: int = documented("Routed experts each token is sent to.", 2)
    expert_ffn_hidden_size: int | None = documented(
        "Inner width of each routed (and each shared) expert's SwiGLU; null means model.ffn_hidden_size.",
        None,
    )
    num_shared_experts: int = documented(
        "Always-on experts every token also goes through (one SwiGLU of num_shared_experts x the expert width).",
        0,
    )
    first_dense_layers: int = documented(
        "The first this many blocks keep a dense MLP (DeepSeek-V3: 3, Kimi K2: 1).", 0
    )
    score_func: ScoreFunc = documented(
        "Router scores: softmax over the experts (Mixtral, Qwen3-MoE) or sigmoid per expert (DeepSeek-V3).",
        "softmax",
    )
    normalize_top_k: bool = documented(
        "Divide the k selected scores by their sum before they weight the expert outputs.", True
    )
    route_scale: float = documented("Factor on the (normalised) routing weights (DeepSeek-V3: 2.5).", 1.0)
    aux_loss_coeff: float = documented(
        "Weight of the load-balancing loss E/(k T) sum_i count_i P_i (Switch Transformer, per sequence as in "
        "DeepSeek-V3); 0 disables it.",
        0.01,
    )
    z_loss_coeff: float = documented(
        "Weight of the router z-loss mean(logsumexp(logits)^2) (ST-MoE, Zoph et al. 2022); 0 disables it.",
        0.0,
    )
    bias_update_rate: float = documented(
        "Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection "
        "only, moved by this much towards balance after every step; 0 disables it.",
        0.0,
    )
    dropless: bool = documented(
        "Every token reaches its k experts (no capacity limit). false: capacity_factor bounds each expert.",
        True,
    )
    capacity_factor: float | None = documented(
        "With dropless=false: each expert takes at most ceil(capacity_factor x tokens x k / num_experts) "
        "(token, slot) pairs per micro-batch and rank; the rest are dropped (counted in the metrics).",
        None,
    )

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def problems(self, num_layers: int) -> list[str]:
        if self.num_experts < 0:
            return [f"model.moe.num_experts must be >= 0 (0 is a dense model), got {self.num_experts}"]
        if not self.enabled:
            return []
        p: list[str] = positive("model.moe.top_k", self.top_k)
        if self.top_k > self.num_experts:
            p.append(
                f"model.moe.top_k ({self.top_k}) exceeds model.moe.num_experts ({self.num_experts}); each token "
                f"picks k distinct experts: use a top_k of at most {self.num_experts}"
            )
        if self.expert_ffn_hidden_size is not None:
            p += positive("model.moe.expert_ffn_hidden_size", self.expert_ffn_hidden_size)
        if self.num_shared_experts < 0:
            p.append(f"model.moe.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if not 0 <= self.first_dense_layers < num_layers:
            p.append(
                f"model.moe.first_dense_layers ({self.first_dense_layers}) must be in [0, model.num_layers = "
                f"{num_layers}): at least one block must be a mixture of experts (or set model.moe.num_experts=0)"
            )
        p += one_of("model.moe.score_func", self.score_func, SCORE_FUNCS)
        p += positive("model.moe.route_scale", self.route_scale)
        for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            if getattr(self, name) < 0:
                p.append(f"model.moe.{name} must be >= 0 (0 disables it), got {getattr(self, name)}")
        return p + self._capacity_problems()

    def _capacity_problems(self) -> list[str]:
        if self.dropless:
            if self.capacity_factor is not None:
                return [
                    f"model.moe.capacity_factor ({self.capacity_factor}) is set but model.moe.dropless=true, "
                    "which has no capacity: set model.moe.dropless=false to drop tokens beyond the capacity, "
                    "or model.moe.capacity_factor=null"
                ]
            return []
        if self.capacity_factor is None:
            return [
                "model.moe.dropless=false needs model.moe.capacity_factor (e.g. 1.25): each expert's share of "
                "the tokens is bounded by it"
            ]
        if self.capacity_factor < 1:
            return [
                f"model.moe.capacity_factor ({self.capacity_factor}) is below 1: even perfectly balanced routing "
                "would drop tokens; use a capacity_factor >= 1 (1.25 is common), or model.moe.dropless=true"
            ]
        return []
