"""What a bundle is exported from (a model and its golden data), and the output names of its graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from portable_moe.config import ModelConfig


def output_names(config: ModelConfig, reports_drops: bool = False) -> tuple[list[str], dict[str, int]]:
    """The exported graph's output names, and which of them carry routing (name -> layer index)."""
    routing = {f"expert_ids_layer{layer}": layer for layer in config.moe_layer_indices}
    dropped = [f"dropped_slots_layer{layer}" for layer in config.moe_layer_indices] if reports_drops else []
    return ["logits", *routing, *dropped], routing


@dataclass
class ExportSource:
    """What a bundle is exported from: a model and its golden data.

    Attributes:
        model: a :class:`~exporters.layered.LayeredModel` with ``set_routed_experts`` (the
            reference model, or the Hugging Face wrapper).
        config: its :class:`ModelConfig` (recorded in the manifest).
        golden_ids / second_ids: the golden inputs and the second shape validation runs on.
        golden_out: expected outputs on ``golden_ids`` (logits and expert ids).
        second_out: expected outputs on ``second_ids``, or None to take them from the lowered model.
        manifest: extra manifest entries describing the source.
        continuation: the source's own golden greedy continuation and its logits (see
            :func:`exporters.decode_graph.export_decoder`), or None to compute it with the torch decoder.
    """

    model: Any
    config: ModelConfig
    golden_ids: Any
    second_ids: Any
    golden_out: dict[str, np.ndarray]
    second_out: dict[str, np.ndarray] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    continuation: tuple[dict[str, Any], np.ndarray] | None = None
