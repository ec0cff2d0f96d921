"""The layered-model protocol: a decoder-only model seen as prologue -> layers -> head.

The exporter exports each *kind* of decoder layer once and stamps it out per layer (see
:mod:`exporters.layer_graphs`); any model that satisfies :class:`LayeredModel` can be exported that
way: the reference ``exporters.reference_model.MoETransformer``, or a Hugging Face checkpoint wrapped to
fit. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class LayeredModel(Protocol):
    """A decoder-only model seen as prologue -> layers -> head, for layer-wise export.

    forward(input_ids) must equal head(layers[n-1](...layers[0](prologue(input_ids)))) and return
    (logits, tuple_of_expert_ids_per_moe_layer[, tuple_of_dropped]) -- the same outputs as portable_moe's reference
    MoETransformer, so the monolithic exporter and golden-data code work on it unchanged.
    """

    config: Any  # portable_moe.config.ModelConfig-like; moe_layer_indices lists the MoE layers

    def prologue(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(hidden [B, S, H], *shared): shared are the tensors every layer takes (e.g. rotary cos/sin,
        an additive causal mask), computed once from input_ids."""

    def layer_modules(self) -> list[torch.nn.Module]:
        """One module per decoder layer; module(hidden, *shared) -> (hidden, expert_ids or None,
        dropped or None), as exporters.reference_model.DecoderLayer returns today: expert_ids is
        [B, S, top_k] int64 for MoE layers and None for dense ones; dropped is the int64 scalar count
        of dropped token-slots of a capacity-limited lowering, else None."""

    def layer_kind(self, index: int) -> Hashable:
        """Layers with equal kinds have the same structure and the same parameter names relative
        to their module, so one exported graph serves them all with the weights swapped."""

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: logits [B, S, vocab]."""

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]: ...
