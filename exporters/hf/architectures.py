"""The Hugging Face architectures portable-moe exports, and how each one routes.

Each entry says where the architecture keeps its MoE block and expert weights, how its router
turns hidden states into (expert ids, weights), what shared experts it adds, and how its config
maps onto :class:`portable_moe.config.ModelConfig` (the summary a bundle's manifest carries).

The routers follow transformers' modeling files (5.x) operation by operation; the one deliberate
difference is selection: ``stable_topk_indices`` gives ties to the lower expert index (ONNX TopK's
rule) where ``torch.topk`` promises no order. With real-valued weights exact ties do not happen in
practice, and the golden expert ids always come from transformers' own routers.

To add an architecture: read its ``modeling_*.py``, write its router below, and add an entry to
:data:`ARCHITECTURES` (docs/hugging-face.md walks through it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from portable_moe.config import ModelConfig
from portable_moe.errors import ExportError

# (router module, hidden [T, H]) -> (expert_ids [T, k] int64, expert_weights [T, k])
Router = Callable[[Any, Any], tuple[Any, Any]]
# (MoE block, hidden [T, H]) -> what the block adds beside the routed experts ([T, H])
SharedExperts = Callable[[Any, Any], Any]


def route_deepseek_v3(gate: Any, hidden: Any) -> tuple[Any, Any]:
    """DeepseekV3TopkRouter: sigmoid scores, bias for selection only, group-limited top-k.

    Group scores are the sum of each group's two best biased scores; the ``topk_group`` best groups
    stay eligible. Weights are the unbiased scores of the chosen experts, divided by their sum plus
    1e-20 when ``norm_topk_prob``, times ``routed_scaling_factor``.
    """
    import torch
    from torch.nn import functional

    from exporters.reference_model import stable_topk_indices

    logits = functional.linear(hidden.type(torch.float32), gate.weight.type(torch.float32))
    scores = logits.sigmoid()
    for_choice = scores + gate.e_score_correction_bias
    per_group = gate.num_experts // gate.num_group
    group_scores = for_choice.view(-1, gate.num_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_index = stable_topk_indices(group_scores, gate.topk_group)
    group_mask = torch.zeros_like(group_scores).scatter(1, group_index, 1.0)
    score_mask = group_mask.unsqueeze(-1).expand(-1, gate.num_group, per_group).reshape(-1, gate.num_experts)
    for_choice = for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    expert_ids = stable_topk_indices(for_choice, gate.top_k)
    weights = scores.gather(1, expert_ids)
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return expert_ids, weights * gate.routed_scaling_factor


def route_softmax_topk(gate: Any, hidden: Any) -> tuple[Any, Any]:
    """Qwen2MoeTopKRouter / Qwen3MoeTopKRouter: softmax over all experts in float32, top-k, and
    renormalised over the top-k when ``norm_topk_prob``; weights cast back to the logits' dtype."""
    import torch
    from torch.nn import functional

    from exporters.reference_model import stable_topk_indices

    logits = functional.linear(hidden, gate.weight)
    probabilities = functional.softmax(logits, dtype=torch.float, dim=-1)
    expert_ids = stable_topk_indices(probabilities, gate.top_k)
    weights = probabilities.gather(1, expert_ids)
    if gate.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return expert_ids, weights.to(logits.dtype)


def route_mixtral(gate: Any, hidden: Any) -> tuple[Any, Any]:
    """MixtralTopKRouter: softmax in float32, top-k, always renormalised over the top-k (the same as a
    softmax over the top-k logits)."""
    from torch.nn import functional

    from exporters.reference_model import stable_topk_indices

    logits = functional.linear(hidden, gate.weight)
    probabilities = functional.softmax(logits.float(), dim=-1)
    expert_ids = stable_topk_indices(probabilities, gate.top_k)
    weights = probabilities.gather(1, expert_ids)
    return expert_ids, weights / weights.sum(dim=-1, keepdim=True)


def shared_deepseek_v3(block: Any, hidden: Any) -> Any:
    """DeepseekV3MoE adds its shared experts (one MLP as wide as ``n_shared_experts`` experts)."""
    return block.shared_experts(hidden)


def shared_qwen2_moe(block: Any, hidden: Any) -> Any:
    """Qwen2MoeSparseMoeBlock adds one shared expert scaled by a per-token sigmoid gate."""
    import torch

    return torch.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _common(config: Any, name: str) -> dict[str, Any]:
    return dict(
        name=name,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_experts_per_tok=config.num_experts_per_tok,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=_rope_theta(config),
    )


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face MoE architecture maps onto portable-moe.

    Attributes:
        name: the ``architectures`` entry of config.json.
        router: computes (expert ids, weights) from the block's ``gate`` module, as transformers does.
        shared_modules: names of the block's submodules that ``shared`` uses (kept in the export).
        shared: what the block adds to the routed experts' output, or None.
        scoring_func: the score function, for the summary config.
        checkpoint_block: the MoE block's name in checkpoint tensor names (Mixtral's files say
            ``block_sparse_moe`` where the module says ``mlp``).
        expert_projections: per-expert tensor names in checkpoints: (gate, up, down).
    """

    name: str
    router: Router
    shared_modules: tuple[str, ...]
    shared: SharedExperts | None
    scoring_func: str
    checkpoint_block: str = "mlp"
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def summary_config(self, config: Any, moe_layers: list[int], name: str) -> ModelConfig:
        """The :class:`ModelConfig` a bundle carries for this checkpoint (sizes and routing rules).

        Raises:
            ExportError: the config does not fit the summary's consistency rules.
        """
        fields = _common(config, name)
        experts = config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts
        expert_width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        shared = 0
        if self.name == "DeepseekV3ForCausalLM":
            shared = config.n_shared_experts or 0
        elif self.shared is not None:
            shared = max(1, round(config.shared_expert_intermediate_size / expert_width))
        fields.update(
            intermediate_size=config.intermediate_size,
            moe_intermediate_size=expert_width,
            n_routed_experts=experts,
            n_shared_experts=shared,
            n_group=getattr(config, "n_group", None) or 1,
            topk_group=getattr(config, "topk_group", None) or 1,
            routed_scaling_factor=float(getattr(config, "routed_scaling_factor", None) or 1.0),
            first_k_dense_replace=moe_layers[0] if moe_layers else config.num_hidden_layers,
            scoring_func=self.scoring_func,
            norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)),
            notes=f"Summary of a Hugging Face {self.name} checkpoint; its full config is in the manifest's source.",
        )
        try:
            return ModelConfig(**fields)
        except Exception as error:
            raise ExportError(f"{self.name} config does not fit portable-moe's model summary: {error}") from None


ARCHITECTURES: dict[str, Architecture] = {
    architecture.name: architecture
    for architecture in (
        Architecture(
            "DeepseekV3ForCausalLM",
            route_deepseek_v3,
            ("shared_experts",),
            shared_deepseek_v3,
            "sigmoid",
        ),
        Architecture("Qwen3MoeForCausalLM", route_softmax_topk, (), None, "softmax"),
        Architecture(
            "Qwen2MoeForCausalLM",
            route_softmax_topk,
            ("shared_expert", "shared_expert_gate"),
            shared_qwen2_moe,
            "softmax",
        ),
        Architecture(
            "MixtralForCausalLM",
            route_mixtral,
            (),
            None,
            "softmax",
            checkpoint_block="block_sparse_moe",
            expert_projections=("w1", "w3", "w2"),
        ),
    )
}


def get_architecture(config: dict[str, Any], where: str) -> Architecture:
    """The table entry for a checkpoint's config.json.

    Raises:
        ExportError: the config names no architecture or one that is not supported (the message
            lists the supported ones).
    """
    names = config.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(map(str, names)) or "none"
    raise ExportError(f"{where}: architecture {found} is not supported; supported architectures: {supported}")
