"""``dense`` lowering: every expert runs on every token; a gate that is zero except at the selected
experts weights the results. Simple and exact, but its cost grows with the number of experts."""

from exporters.reference_model import routed_experts_dense as routed_experts

__all__ = ["routed_experts"]
