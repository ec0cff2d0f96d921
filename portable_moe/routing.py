"""Routing diagnostics per MoE layer: agreement, top-k margins of disagreeing tokens, expert load.

A routing flip is the typical cross-vendor failure, but not every flip is a bug: when the k-th and
(k+1)-th biased router scores of a token are nearly equal, any rounding difference may swap them.
The *margin* (k-th minus (k+1)-th biased score, on the oracle) tells the two apart: a flip at a
margin below the backend's precision is a near-tie, a flip at a large margin is a real disagreement.

The margins come from the exported graph itself: each ``expert_ids_layerN`` output is produced by
an ONNX TopK node (found by walking back from the output); that node's data input holds the masked
biased scores. A copy of the model exposes those inputs as graph outputs and runs on the ``cpu``
backend (ONNX Runtime).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from portable_moe.compare import routing_agreement, split_weights

# A flip whose reference margin is at most this is a near-tie, keyed by the backend's precision mode.
# float32 backends ("exact", "must_keep_origin_dtype") perturb router scores (~1, sigmoid outputs plus a
# bias) by ~1e-7..1e-6 through reordered sums, so 1e-5 keeps ~10x headroom. The float16/bfloat16 modes
# perturb them by up to 2.4e-3 (measured, see the npu-sim rows of portable_moe.compare.TOLERANCES) and
# bfloat16 by ~4e-3 relative: 1e-2 covers those. Any mode not listed is reduced precision.
NEAR_TIE_MARGINS: dict[str, float] = {"exact": 1e-5, "must_keep_origin_dtype": 1e-5}
REDUCED_PRECISION_NEAR_TIE = 1e-2
NEAR_TIE, REAL_DISAGREEMENT = "near-tie", "real disagreement"
CASCADED = "after an earlier layer's flip"

# Nodes a routing output may pass through between its TopK and the graph output.
_PASS_THROUGH = {"Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity", "Flatten", "Transpose"}
_MAX_WALK = 16


# The same for a bundle's weight format: it perturbs the hidden state the router reads, so router scores
# move more than the format's own rounding. About twice the largest perturbation of the first MoE layer's
# router scores (no earlier flip can reach it) measured on the tiny preset, golden + 24 random sets
# (docs/benchmarks.md#weight-formats): float16 5.8e-4, bfloat16 5.2e-3, int8 2.1e-2 (per channel) and
# 2.9e-2 (blocks), int4 0.27; the small preset stays inside these (scripts/benchmark_weights.py).
WEIGHT_NEAR_TIE_MARGINS: dict[str, float] = {
    "float16": 1e-3,
    "bfloat16": 1e-2,
    "int8/channel": 5e-2,
    "int8/block": 5e-2,
    "int4/block": 0.5,
}


def near_tie_margin(precision: str) -> float:
    """The margin at or below which a routing flip counts as a near-tie for ``precision``.

    A precision carrying a weight format (``compare.with_weights``) takes the larger of the mode's
    and the format's margins.
    """
    mode, weights = split_weights(precision)
    margin = NEAR_TIE_MARGINS.get(mode, REDUCED_PRECISION_NEAR_TIE)
    if weights != "float32":
        margin = max(margin, WEIGHT_NEAR_TIE_MARGINS.get(weights, REDUCED_PRECISION_NEAR_TIE))
    return margin


def router_score_values(proto: onnx.ModelProto, routing_outputs: Sequence[str]) -> dict[str, tuple[str, int | None]]:
    """For each routing output, the value holding the scores its TopK selects from, and k.

    Walks back from the output through shape-only nodes to the TopK whose indices (output 1)
    it carries. k is read from the TopK's constant ``K`` input when it is an initializer or a
    Constant node, else left None (then taken from the routing output's last axis).

    Returns:
        routing output name -> (score value name, k); outputs whose TopK is not found are left out.
    """
    producers = {output: node for node in proto.graph.node for output in node.output}
    constants = {tensor.name: tensor for tensor in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    found: dict[str, tuple[str, int | None]] = {}
    for name in routing_outputs:
        value = name
        for _ in range(_MAX_WALK):
            node = producers.get(value)
            if node is None:
                break
            if node.op_type == "TopK":
                if len(node.output) > 1 and node.output[1] == value:
                    k_tensor = constants.get(node.input[1]) if len(node.input) > 1 else None
                    k = int(onnx.numpy_helper.to_array(k_tensor).reshape(-1)[0]) if k_tensor is not None else None
                    found[name] = (node.input[0], k)
                break
            if node.op_type not in _PASS_THROUGH:
                break
            value = node.input[0]
    return found


def topk_margins(scores: np.ndarray, k: int) -> np.ndarray:
    """The k-th minus the (k+1)-th largest score along the last axis, per token.

    A (k+1)-th score of -inf (a masked group) gives an infinite margin: no finite rounding can
    promote a masked expert. When the k-th score is -inf too, the pick among masked experts is
    arbitrary: margin 0. With k equal to the number of experts every expert is chosen: infinite.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if k >= scores.shape[-1]:
        return np.full(scores.shape[:-1], np.inf)
    ordered = -np.sort(-scores, axis=-1)
    kth, next_score = ordered[..., k - 1], ordered[..., k]
    with np.errstate(invalid="ignore"):
        margin = kth - next_score
    margin = np.where(next_score == -np.inf, np.inf, margin)
    return np.where(kth == -np.inf, 0.0, margin)


def expert_load(expert_ids: np.ndarray, num_experts: int) -> list[int]:
    """How many (token, slot) selections each expert got: a bincount over all selections."""
    ids = np.asarray(expert_ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < num_experts)]  # out-of-range ids are the comparison's to report
    return np.bincount(ids, minlength=num_experts).astype(int).tolist()


@dataclass
class LayerRouting:
    """Routing of one MoE layer on one backend, accumulated over every input set.

    Attributes:
        output: the routing output's name; layer: the decoder layer index.
        tokens / agreeing: token counts (agreement = agreeing / tokens, selections compared as sets).
        disagreements: ``(input set, token index, margin)`` per disagreeing token; margin is None
            where the scores could not be exposed.
        load / expected_load: the backend's and the expected expert-load histograms.
        near_tie_margin: the threshold applied (see :func:`near_tie_margin`).
    """

    output: str
    layer: int
    tokens: int = 0
    agreeing: int = 0
    disagreements: list[tuple[int, tuple[int, ...], float | None]] = field(default_factory=list)
    load: list[int] = field(default_factory=list)
    expected_load: list[int] = field(default_factory=list)
    near_tie_margin: float = 1e-5
    cascaded: set[tuple[int, tuple[int, ...]]] = field(default_factory=set)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.tokens if self.tokens else 1.0

    @property
    def flip_rate(self) -> float:
        """The share of tokens whose expert set differs from the expected one."""
        return 1.0 - self.agreement

    @property
    def near_tie_share(self) -> float | None:
        """The share of flipped tokens whose reference margin is a near-tie (None: no flips or no margins)."""
        margins = [margin for _, _, margin in self.disagreements if margin is not None]
        if not margins:
            return None
        return sum(margin <= self.near_tie_margin for margin in margins) / len(margins)

    @property
    def load_drift(self) -> float:
        """Expert-load drift: half the L1 distance between the actual and expected load shares.

        0 when every expert got the same share of selections, 1 when the loads share nothing; a
        flip that moves one selection between experts moves it by ``1 / selections``.
        """
        total, expected_total = sum(self.load), sum(self.expected_load)
        if not total or not expected_total:
            return 0.0
        shares = np.asarray(self.load) / total
        expected_shares = np.asarray(self.expected_load) / expected_total
        return float(np.abs(shares - expected_shares).sum() / 2)

    @property
    def worst_margin(self) -> float | None:
        """The largest margin among disagreeing tokens (the least excusable flip), None if unknown or none."""
        margins = [
            margin
            for set_index, index, margin in self.disagreements
            if margin is not None and (set_index, index) not in self.cascaded
        ]
        return max(margins) if margins else None

    @property
    def verdict(self) -> str:
        """ "" when routing agrees, else near-tie / real disagreement (or "margin unknown")."""
        if not self.disagreements:
            return ""
        if len(self.cascaded) == len(self.disagreements):
            return CASCADED
        worst = self.worst_margin
        if worst is None:
            return "margin unknown"
        return NEAR_TIE if worst <= self.near_tie_margin else REAL_DISAGREEMENT

    def add(
        self, expected: np.ndarray, actual: np.ndarray, margins: np.ndarray | None, set_index: int, num_experts: int
    ) -> None:
        """Fold one input set's expected and actual selections (and the oracle's margins) in."""
        agreement, disagreeing = routing_agreement(expected, actual)
        tokens = int(np.prod(expected.shape[:-1]))
        self.tokens += tokens
        self.agreeing += round(agreement * tokens)
        token_margins = margins.reshape(expected.shape[:-1]) if margins is not None else None
        for index in disagreeing:
            margin = float(token_margins[index]) if token_margins is not None else None
            self.disagreements.append((set_index, index, margin))
        self.load = _add_lists(self.load, expert_load(actual, num_experts))
        self.expected_load = _add_lists(self.expected_load, expert_load(expected, num_experts))

    def summary(self) -> str:
        """One line: "layer 1: flip at margin 3e-4: near-tie"."""
        if not self.disagreements:
            return ""
        worst = self.worst_margin
        if self.verdict == CASCADED:
            where = CASCADED
        else:
            where = "margin unknown" if worst is None else f"flip at margin {worst:.2g}: {self.verdict}"
        share = self.near_tie_share
        ties = "" if share is None else f", {share:.0%} near-ties"
        return (
            f"layer {self.layer}: {len(self.disagreements)} token(s) flipped ({self.flip_rate:.1%}{ties}, "
            f"load drift {self.load_drift:.3f}), {where}"
        )

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst_margin
        return {
            "output": self.output,
            "layer": self.layer,
            "tokens": self.tokens,
            "agreement": self.agreement,
            "flip_rate": self.flip_rate,
            "near_tie_share": self.near_tie_share,
            "load_drift": self.load_drift,
            "near_tie_margin": self.near_tie_margin,
            "worst_margin": _json_float(worst),
            "verdict": self.verdict,
            "disagreements": [
                {
                    "set": s,
                    "token": list(index),
                    "margin": _json_float(margin),
                    "after_earlier_flip": (s, index) in self.cascaded,
                }
                for s, index, margin in self.disagreements[:100]
            ],
            "expert_load": self.load,
            "expected_expert_load": self.expected_load,
        }


def _json_float(value: float | None) -> float | str | None:
    """JSON has no infinity: write it as the string "inf"."""
    if value is None:
        return None
    return "inf" if value == np.inf else value


def _add_lists(total: list[int], more: list[int]) -> list[int]:
    if not total:
        return list(more)
    return [a + b for a, b in zip(total, more)]


def mark_cascades(layers: Sequence[LayerRouting]) -> None:
    """Mark flips that may follow from a flip in an earlier layer, leaving them out of the verdict.

    A flipped token's hidden state differs after that layer, and causal attention carries the
    difference to later positions of the same sequence: in later layers, a flip at the same or a
    later position of that sequence (same input set, same leading index) is no evidence on its own.
    The oracle's margin there was computed on a hidden state the backend never saw.
    """
    earliest: dict[tuple[int, tuple[int, ...]], int] = {}  # (set, leading index) -> earliest flipped position
    for layer in sorted(layers, key=lambda record: record.layer):
        for set_index, index, _ in layer.disagreements:
            key, position = (set_index, index[:-1]), index[-1] if index else 0
            if key in earliest and earliest[key] <= position:
                layer.cascaded.add((set_index, index))
        for set_index, index, _ in layer.disagreements:
            key, position = (set_index, index[:-1]), index[-1] if index else 0
            earliest[key] = min(earliest.get(key, position), position)


def layer_routing(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    routing_outputs: Mapping[str, int],
    margins: Mapping[str, np.ndarray] | None,
    precision: str,
    num_experts: int | None,
    into: dict[str, LayerRouting],
    set_index: int = 0,
) -> dict[str, LayerRouting]:
    """Fold one input set into per-layer routing records (``into``, keyed by output name), and return it.

    Outputs whose shapes differ are left to the comparison (which reports them) and skipped here.
    """
    for name, layer in routing_outputs.items():
        if name not in expected or name not in actual or np.shape(actual[name]) != np.shape(expected[name]):
            continue
        record = into.setdefault(name, LayerRouting(name, layer, near_tie_margin=near_tie_margin(precision)))
        experts = num_experts or int(max(np.max(expected[name], initial=0), np.max(actual[name], initial=0)) + 1)
        record.add(expected[name], np.asarray(actual[name]), (margins or {}).get(name), set_index, experts)
    return into


def routing_margins(
    proto: onnx.ModelProto,
    routing_outputs: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    k_default: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Per routing output, each token's top-k margin on the ``cpu`` backend (see the module docstring).

    Args:
        proto: the model.
        routing_outputs: the routing output names.
        feeds: one input set.
        k_default: routing output -> k, used when the TopK's K is not a constant.

    Returns:
        routing output name -> margins (one per token, flattened in the scores' token order).

    Raises:
        PortableMoEError: if the cpu backend cannot compile or run the exposed model.
    """
    from portable_moe.bisect import run_exposed
    from portable_moe.registry import get_backend

    scores = router_score_values(proto, routing_outputs)
    if not scores:
        return {}
    outputs, _ = run_exposed(get_backend("cpu"), proto, feeds, [value for value, _ in scores.values()])
    margins = {}
    for name, (value, k) in scores.items():
        k = k or (k_default or {}).get(name)
        if value in outputs and k:
            margins[name] = topk_margins(outputs[value], k).reshape(-1)
    return margins
