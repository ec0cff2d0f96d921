"""Model configurations: a DeepSeek-V3-style MoE decoder, and its named presets.

This module needs no torch: bundles carry their config, and a machine that only runs bundles
reads it here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from portable_moe.errors import ConfigError

SCORING_FUNCTIONS = ("sigmoid", "sqrtsoftplus", "softmax")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and routing rules of a DeepSeek-style MoE decoder.

    Field names follow DeepSeek-V3's published configuration where one exists.
    """

    name: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # width of the dense feed-forward of the first layers
    moe_intermediate_size: int  # width of each routed (and shared) expert
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int  # top-k
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    first_k_dense_replace: int
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Presets with real sizes exist for cost estimates only: building them would need hundreds of GB.
    cost_estimate_only: bool = False
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the decoder layers whose feed-forward is an MoE block."""
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    def validate(self) -> None:
        """Check that the sizes are consistent.

        Raises:
            ConfigError: naming the first inconsistent field and what it must satisfy.
        """
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "moe_intermediate_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config {self.name!r}: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config {self.name!r}: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.scoring_func not in SCORING_FUNCTIONS:
            raise ConfigError(
                f"config {self.name!r}: scoring_func {self.scoring_func!r} is not one of {', '.join(SCORING_FUNCTIONS)}"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"config {self.name!r}: n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"config {self.name!r}: topk_group {self.topk_group} exceeds n_group {self.n_group}")
        eligible = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > eligible:
            raise ConfigError(
                f"config {self.name!r}: num_experts_per_tok {self.num_experts_per_tok} exceeds the {eligible} experts "
                f"eligible after group selection (topk_group x experts per group)"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"config {self.name!r}: first_k_dense_replace {self.first_k_dense_replace} must be between 0 and "
                f"num_hidden_layers {self.num_hidden_layers}"
            )
        if self.n_shared_experts < 0:
            raise ConfigError(f"config {self.name!r}: n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if not (math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
            raise ConfigError(
                f"config {self.name!r}: routed_scaling_factor must be a positive number, got {self.routed_scaling_factor}"
            )

    def parameter_count(self) -> dict[str, int]:
        """Count parameters without building the model.

        Returns:
            ``total`` (all weights) and ``active_per_token`` (what one token touches: dense parts,
            shared experts and top-k routed experts).
        """
        hidden = self.hidden_size
        attention = 4 * hidden * hidden
        norms = 2 * hidden
        dense_mlp = 3 * hidden * self.intermediate_size
        expert = 3 * hidden * self.moe_intermediate_size
        router = self.n_routed_experts * hidden + self.n_routed_experts
        shared = self.n_shared_experts * expert
        n_moe = len(self.moe_layer_indices)
        n_dense = self.num_hidden_layers - n_moe
        embeddings = 2 * self.vocab_size * hidden + hidden  # input embedding, output head, final norm
        common = embeddings + self.num_hidden_layers * (attention + norms) + n_dense * dense_mlp
        total = common + n_moe * (router + shared + self.n_routed_experts * expert)
        active = common + n_moe * (router + shared + self.num_experts_per_tok * expert)
        return {"total": total, "active_per_token": active}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild a config from :meth:`to_dict` output (as stored in a bundle manifest).

        Raises:
            ConfigError: if fields are missing, unknown or inconsistent.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as error:
            raise ConfigError(f"incomplete model config: {error}") from None
        except (OverflowError, ValueError) as error:  # e.g. a number too large for a float
            raise ConfigError(f"invalid model config value: {error}") from None


_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    moe_intermediate_size=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        notes="Tests and the demo: 3 layers (1 dense, 2 MoE), 8 routed experts in 2 groups, top-2, V3 routing.",
        **_TINY,
    ),
    "tiny-v4": ModelConfig(
        name="tiny-v4",
        notes="DeepSeek-V4-style routing on the tiny sizes: sqrtsoftplus scores, no group limiting.",
        **{**_TINY, "n_group": 1, "topk_group": 1, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5},
    ),
    "tiny-softmax": ModelConfig(
        name="tiny-softmax",
        notes="Mixtral/Qwen-style routing on the tiny sizes: softmax scores, no group limiting.",
        **{**_TINY, "n_group": 1, "topk_group": 1, "scoring_func": "softmax", "routed_scaling_factor": 1.0},
    ),
    "small": ModelConfig(
        name="small",
        vocab_size=4096,
        hidden_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        intermediate_size=2816,
        moe_intermediate_size=512,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        notes="Benchmarks: 2 layers (1 dense, 1 MoE), 64 routed experts of width 512, top-6.",
    ),
    "deepseek-v3": ModelConfig(
        name="deepseek-v3",
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=128,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        first_k_dense_replace=3,
        cost_estimate_only=True,
        notes=(
            "DeepSeek-V3's published sizes, for cost estimates only. Attention here is plain multi-head "
            "attention, not DeepSeek's MLA, so attention parameter counts differ from the real model."
        ),
    ),
}


def get_preset(name: str) -> ModelConfig:
    """Return the named preset.

    Raises:
        ConfigError: if no preset has that name (the message lists the names that exist).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


def runnable_presets() -> list[str]:
    """The presets that can be built and run: every one except those for cost estimates only."""
    return [name for name, config in PRESETS.items() if not config.cost_estimate_only]
