"""Comparing a backend's outputs with expected (golden) outputs.

Outputs are compared in order: count and names, then shapes and dtypes, then values. Float
outputs get max absolute and relative error, cosine similarity and an allclose verdict; routing
outputs (the experts each token was sent to) get routing agreement, compared as sets per token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from portable_moe.errors import ConformanceError


@dataclass(frozen=True)
class Tolerance:
    """allclose tolerances plus the routing a backend must keep, with the reason.

    Attributes:
        atol / rtol: allclose's tolerances for values.
        min_routing_agreement: the share of tokens whose whole expert set must be unchanged.
        reason: where the figures come from.
        min_expert_overlap: the share of each token's k experts that must be kept, averaged over the
            tokens (see :func:`expert_overlap`). A token-level flip counts one changed expert of k the
            same as k changed ones; where a format legitimately changes some expert of most tokens
            (int4), this is what still tells its flips from a wrong router. 0 adds nothing to
            ``min_routing_agreement``, which bounds the overlap from below by itself.
    """

    atol: float
    rtol: float
    min_routing_agreement: float
    reason: str
    min_expert_overlap: float = 0.0

    @property
    def required_overlap(self) -> float:
        """The expert overlap this row requires: its own, or the one its routing agreement implies."""
        return max(self.min_expert_overlap, self.min_routing_agreement)


@dataclass(frozen=True)
class PrecisionMode:
    """A precision mode a backend computes in, declared by that backend (``Capabilities.precision_modes``).

    Attributes:
        tolerances: output dtype -> the tolerance row for it, each with its reason; the "float32"
            row serves dtypes without their own.
        near_tie_margin: a routing flip whose top-k margin on the oracle is at most this counts as a
            near-tie (the mode's rounding can move router scores that far), not a real disagreement.
        near_tie_reason: why that margin.
    """

    tolerances: Mapping[str, Tolerance]
    near_tie_margin: float
    near_tie_reason: str = ""


@dataclass(frozen=True)
class ToleranceOverride:
    """A tolerance for onnx's node test cases (the op suite) that replaces a case's own.

    Declared by the backend that needs it (``Capabilities.op_tolerance_overrides``); it applies to
    that backend's cases whose name matches ``case_pattern`` while its compiled model reports
    ``precision``. Model checks never use it: their rows are the precision modes'.

    Attributes:
        precision: a compiled model's ``precision`` mode, or "*" for any.
        case_pattern: a regex searched in the case name ("" matches every case).
        rtol / atol: the tolerance.
        reason: why, with what was measured.
    """

    precision: str
    case_pattern: str
    rtol: float
    atol: float
    reason: str

    def matches(self, precision: str, case_name: str) -> bool:
        """Whether this override applies to ``case_name`` run in ``precision``."""
        return self.precision in ("*", precision) and re.search(self.case_pattern, case_name) is not None


# Core's rows: "exact" is float32 computed in float32 throughout, the only mode core knows. Every other
# mode (float16 compute, a vendor's precision settings) is declared by the backend that has it.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("exact", "float32"): Tolerance(
        atol=1e-4,
        rtol=1e-3,
        min_routing_agreement=1.0,
        reason=(
            "float32 kernels differ from torch's by summation order and transcendental approximations "
            "(ORT's Sigmoid differs by up to ~1.7e-7); through a few layers the tiny preset's logits "
            "differ by ~6e-6. 1e-4 leaves ~15x headroom and still catches real errors, which are >1e-2. "
            "Routing must agree exactly: float32 near-ties on the golden inputs are further apart than that."
        ),
    ),
    ("exact", "float64"): Tolerance(1e-9, 1e-7, 1.0, "float64 kernels agree to ~1e-12 on these sizes."),
    ("exact", "float16"): Tolerance(
        atol=1e-2,
        rtol=1e-2,
        min_routing_agreement=1.0,
        reason="float16 has a 10-bit mantissa (~1e-3 relative per operation); ORT's MoE parity tests use atol 1e-2.",
    ),
}


# What a bundle's weight format adds to a backend's own error, keyed by the format key
# (exporters.weight_formats.format_key). The golden data stay float32 torch outputs, so these rows
# measure the format against full precision.
#
# Measured with scripts/benchmark_weights.py (ORT CPU, x86-64; docs/benchmarks.md#weight-formats): the
# float32 bundle's outputs vs the converted bundle's on the golden inputs and seeded random token batches of
# the golden shape (2 x 16): tiny dense lowering, golden + 24 sets; small sparse and fused lowerings, golden
# + 6 sets. "atol" is what logits need at rtol 1e-2 over the tokens before the first routing flip of their
# sequence (values after a flip are the routing comparison's to judge, see tokens_before_first_flip);
# "agreement" is the lowest per-set share of tokens whose expert set is unchanged, "overlap" the lowest
# per-set share of each token's experts kept (expert_overlap), both over every MoE layer. The presets'
# weights are random (no outliers, no trained structure): router logits sit close together, so any
# perturbation of the hidden state swaps experts more often than in a trained model.
#
# Each routing threshold sits below the lowest honest figure (5-8% below for the float and int8 rows,
# 20% for int4, whose per-set figures spread more) and above what a wrong router gave on the same
# bundles (tiny: golden + 24 random sets, small: 8 random sets; tests/exporters/test_weight_formats.py
# checks both changes on the golden set): dropping the selection bias gave agreement <= 0.69 and overlap
# <= 0.81 on tiny (small: <= 0.03 and <= 0.61) for every format up to int8; swapping the routers of the
# tiny preset's two MoE layers gave overlap <= 0.38 with int4 weights. What the int4 row cannot catch:
# dropping the bias under int4 weights (overlap 0.50-0.77 on tiny, 0.48-0.55 on small) looks like int4's
# own flips on tiny, so no per-set threshold tells them apart there.
WEIGHT_TOLERANCES: dict[str, Tolerance] = {
    "float16": Tolerance(
        atol=1e-2,
        rtol=1e-2,
        min_routing_agreement=0.9,
        min_expert_overlap=0.9,
        reason=(
            "float16 weights (10-bit mantissa, ~5e-4 relative rounding): logits need atol 7.0e-3 (tiny) and 2.9e-3 "
            "(small); routing agreement per set >= 0.938 (tiny: a flip at a top-k margin of 4e-4) and 1.0 (small), "
            "overlap >= 0.953 and 1.0"
        ),
    ),
    "bfloat16": Tolerance(
        atol=0.15,
        rtol=1e-2,
        min_routing_agreement=0.9,
        min_expert_overlap=0.9,
        reason=(
            "bfloat16 weights (8-bit mantissa, ~4e-3 relative rounding): logits need atol 0.076 (tiny) and 0.032 "
            "(small); routing agreement per set >= 0.938 (tiny) and 0.969 (small), overlap >= 0.953 and 0.995"
        ),
    ),
    "int8/channel": Tolerance(
        atol=1.0,
        rtol=1e-2,
        min_routing_agreement=0.7,
        min_expert_overlap=0.85,
        reason=(
            "int8 codes with one scale per output channel (ORT CPU's optimizer also quantizes the activations of "
            "DequantizeLinear+MatMul to 8 bits): logits need atol 0.47 (tiny) and 0.17 (small); routing agreement "
            "per set >= 0.844 (tiny) and 0.781 (small), overlap >= 0.891 and 0.958"
        ),
    ),
    "int8/block": Tolerance(
        atol=0.75,
        rtol=1e-2,
        min_routing_agreement=0.7,
        min_expert_overlap=0.85,
        reason=(
            "int8 codes, one scale per block of inputs (MatMulNBits/QMoE with int8 activations on ORT): logits "
            "need atol 0.37 (tiny) and 0.15 (small); routing agreement per set >= 0.875 (tiny) and 0.844 (small), "
            "overlap >= 0.922 and 0.974"
        ),
    ),
    "int4/block": Tolerance(
        atol=4.0,
        rtol=1e-2,
        min_routing_agreement=0.0,
        min_expert_overlap=0.45,
        reason=(
            "int4 codes, one scale per block of 32 inputs (~9% relative weight error on these random weights): "
            "logits need atol 2.0 (tiny) and 1.2 (small), the size of the logits themselves, so values say little "
            "here. Whole expert sets say little either: per-set agreement went down to 0.406 (tiny) and 0.219 "
            "(small: top-6 of 64, where most tokens swap one of their 6 experts). The share of experts kept is "
            "steadier: overlap >= 0.562 (tiny) and 0.786 (small); a wrong router measured <= 0.38"
        ),
    ),
}
EXACT = PrecisionMode(
    tolerances={dtype: row for (mode, dtype), row in TOLERANCES.items() if mode == "exact"},
    near_tie_margin=1e-5,
    near_tie_reason=(
        "float32 kernels perturb router scores (~1, sigmoid outputs plus a bias) by ~1e-7..1e-6 through reordered "
        "sums; 1e-5 keeps ~10x headroom"
    ),
)
WEIGHTS_SEPARATOR = "+weights:"


def with_weights(precision: str, weights: str | None) -> str:
    """The precision key for a backend mode running a bundle of weight format ``weights``.

    ``("exact", "int4/block")`` -> ``"exact+weights:int4/block"``; float32 weights leave the mode as it is.
    """
    if not weights or weights == "float32":
        return precision
    return f"{precision}{WEIGHTS_SEPARATOR}{weights}"


def split_weights(precision: str) -> tuple[str, str]:
    """The inverse of :func:`with_weights`: ``(backend precision mode, weight format key)``."""
    mode, _, weights = precision.partition(WEIGHTS_SEPARATOR)
    return mode, weights or "float32"


def _weight_tolerance(weights: str, mode_row: Tolerance, mode: str) -> Tolerance:
    row = WEIGHT_TOLERANCES.get(weights)
    if row is None:
        known = ", ".join(sorted(WEIGHT_TOLERANCES))
        raise ConformanceError(
            f"no tolerance for weight format {weights!r}; known formats: {known}. Add a measured row for it to "
            "portable_moe.compare.WEIGHT_TOLERANCES"
        )
    if mode == "exact":
        return row
    # Two independent error sources: their absolute errors add up at worst; the looser of the rest applies.
    return Tolerance(
        atol=row.atol + mode_row.atol,
        rtol=max(row.rtol, mode_row.rtol),
        min_routing_agreement=min(row.min_routing_agreement, mode_row.min_routing_agreement),
        reason=f"{weights} weights ({row.reason}) on precision mode {mode} ({mode_row.reason}); atol is the sum",
        min_expert_overlap=min(row.required_overlap, mode_row.required_overlap),
    )


def precision_mode(precision: str, declared: Mapping[str, PrecisionMode] | None = None) -> PrecisionMode:
    """The precision mode named ``precision`` (a weight format suffix is ignored): core's "exact" or a declared one.

    Args:
        precision: the mode's name, as a compiled model reports it (``CompiledModel.precision``).
        declared: the modes the backend declares (``Capabilities.precision_modes``).

    Raises:
        ConformanceError: for a mode that neither core nor the backend declares.
    """
    mode, _ = split_weights(precision)
    if mode == "exact":
        return EXACT
    found = (declared or {}).get(mode)
    if found is None:
        known = ", ".join(sorted({"exact", *(declared or {})}))
        raise ConformanceError(
            f"no tolerance for precision mode {mode!r}; known modes: {known}. The backend that computes in it must "
            "declare it, with measured rows, in Capabilities.precision_modes"
        )
    return found


def tolerance_for(
    dtype: str, precision: str = "exact", declared: Mapping[str, PrecisionMode] | None = None
) -> Tolerance:
    """Look up the tolerance for outputs of ``dtype`` under ``precision``, falling back to float32's.

    ``precision`` may carry a weight format (see :func:`with_weights`): the format's row of
    :data:`WEIGHT_TOLERANCES` then applies, combined with the mode's row for a reduced-precision mode.

    Args:
        dtype: the output's numpy dtype name.
        precision: the precision mode (and weight format) the outputs were computed in.
        declared: the modes the backend declares (``Capabilities.precision_modes``); core knows "exact".

    Raises:
        ConformanceError: for a precision mode or weight format with no row (a backend that reports a
            mode must declare it, with measured rows and their reasons, in its capabilities).
    """
    mode_name, weights = split_weights(precision)
    mode = precision_mode(mode_name, declared)
    found = mode.tolerances.get(dtype) or mode.tolerances.get("float32")
    if found is None:
        raise ConformanceError(
            f"precision mode {mode_name!r} declares no float32 tolerance row; declare one in its PrecisionMode"
        )
    if weights != "float32":
        return _weight_tolerance(weights, found, mode_name)
    return found


@dataclass
class OutputComparison:
    """How one output compares. ``passed`` is the verdict; ``message`` says where it failed.

    ``max_rel_error`` is elementwise (``|error| / |expected|``), so it explodes where an expected
    value is near zero; ``max_scaled_error`` is ``max |error| / max |expected|``, the error relative
    to the output's scale, which stays meaningful there (the terminal table shows this one).
    """

    name: str
    kind: str  # "values" or "routing"
    passed: bool
    message: str = ""
    max_abs_error: float = float("nan")
    max_rel_error: float = float("nan")
    max_scaled_error: float = float("nan")
    cosine: float = float("nan")
    routing_agreement: float = float("nan")
    expert_overlap: float = float("nan")
    disagreeing_tokens: list[tuple[int, ...]] = field(default_factory=list)
    worst_index: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "passed": self.passed,
            "message": self.message,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "max_scaled_error": self.max_scaled_error,
            "cosine": self.cosine,
            "routing_agreement": self.routing_agreement,
            "expert_overlap": self.expert_overlap,
            "disagreeing_tokens": [list(index) for index in self.disagreeing_tokens[:20]],
            "worst_index": list(self.worst_index) if self.worst_index is not None else None,
        }


def routing_agreement(expected: np.ndarray, actual: np.ndarray) -> tuple[float, list[tuple[int, ...]]]:
    """Fraction of tokens whose selected expert set equals the expected set (order within a token ignored).

    Args:
        expected / actual: ``[..., k]`` integer expert ids, the last axis the token's selections.

    Returns:
        ``(agreement in [0, 1], indices of the tokens that disagree)``.
    """
    same = np.all(np.sort(expected, axis=-1) == np.sort(actual, axis=-1), axis=-1)
    disagreeing = [tuple(int(i) for i in index) for index in np.argwhere(~same)]
    return float(same.mean()) if same.size else 1.0, disagreeing


def expert_overlap(expected: np.ndarray, actual: np.ndarray) -> float:
    """The share of each token's expected experts that it kept, averaged over the tokens.

    1.0 when every set agrees; a token that swapped one of its k experts counts ``(k - 1) / k``.
    Repeated ids count once. Random selections of k experts out of E overlap by about k / E.

    Args:
        expected / actual: ``[..., k]`` integer expert ids, the last axis the token's selections.
    """
    k = expected.shape[-1]
    if not expected.size or not k:
        return 1.0
    flat_expected, flat_actual = expected.reshape(-1, k), actual.reshape(-1, k)
    # Token by token, which expected ids appear anywhere in the actual selection.
    kept = (flat_expected[:, :, None] == flat_actual[:, None, :]).any(axis=-1)
    return float(kept.mean())


def _nonfinite_kind(values: np.ndarray) -> np.ndarray:
    """0 for finite, 1 for NaN, 2 for +inf, 3 for -inf: non-finite values must match in kind."""
    return np.select([np.isnan(values), values == np.inf, values == -np.inf], [1, 2, 3], 0)


def compare_values(name: str, expected: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> OutputComparison:
    """Compare two float arrays of the same shape under ``tolerance`` (allclose's rule, elementwise).

    Non-finite values must be the same kind at the same places (NaN with NaN, +inf with +inf);
    finite values must satisfy ``|actual - expected| <= atol + rtol * |expected|``.
    """
    expected64 = expected.astype(np.float64)
    actual64 = actual.astype(np.float64)
    expected_kind, actual_kind = _nonfinite_kind(expected64), _nonfinite_kind(actual64)
    if not np.array_equal(expected_kind, actual_kind):
        index = tuple(int(i) for i in np.argwhere(expected_kind != actual_kind)[0])
        return OutputComparison(
            name,
            "values",
            False,
            f"{name}: non-finite values differ, first at index {list(index)}: "
            f"expected {float(expected64[index])}, got {float(actual64[index])}",
            worst_index=index,
        )
    finite = np.isfinite(expected64)
    # Non-finite places matched in kind above; zero them so they add no error (and no NaN warnings).
    expected64, actual64 = np.where(finite, expected64, 0.0), np.where(finite, actual64, 0.0)
    difference = np.abs(actual64 - expected64)
    relative = difference / np.maximum(np.abs(expected64), np.finfo(np.float32).tiny)
    flat_expected, flat_actual = expected64.ravel(), actual64.ravel()
    norms = np.linalg.norm(flat_expected) * np.linalg.norm(flat_actual)
    cosine = (
        float(flat_expected @ flat_actual / norms) if norms > 0 else float(np.array_equal(flat_expected, flat_actual))
    )
    # allclose's rule: an element fails only if it exceeds atol + rtol * |expected|.
    excess = np.where(finite, difference - (tolerance.atol + tolerance.rtol * np.abs(expected64)), -np.inf)
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape) if excess.size else ()
    worst_index = tuple(int(i) for i in worst)
    passed = bool(excess.size == 0 or excess[worst] <= 0)
    max_abs_error = float(difference.max()) if difference.size else 0.0
    scale = float(np.abs(expected64).max()) if expected64.size else 0.0
    scaled_error = max_abs_error / scale if scale > 0 else (0.0 if max_abs_error == 0 else float("inf"))
    comparison = OutputComparison(
        name,
        "values",
        passed,
        max_abs_error=max_abs_error,
        max_rel_error=float(relative.max()) if relative.size else 0.0,
        max_scaled_error=scaled_error,
        cosine=cosine,
        worst_index=worst_index if difference.size else None,
    )
    if not passed:
        failing = int(np.count_nonzero(excess > 0))
        comparison.message = (
            f"{name}: {failing} of {excess.size} elements outside atol={tolerance.atol:g} rtol={tolerance.rtol:g}; "
            f"worst at index {list(worst_index)}: expected {expected64[worst]:.7g}, got {actual64[worst]:.7g} "
            f"(abs error {difference[worst]:.3g})"
        )
    return comparison


def tokens_before_first_flip(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], routing_outputs: Mapping[str, int]
) -> np.ndarray | None:
    """``[batch, seq]`` mask of the tokens before the first routing flip of their sequence (any layer).

    A flipped token's values differ by however much its other experts differ, and causal attention
    carries that to every later position of the sequence. Where a tolerance row allows flips (its
    routing agreement is below 1), values are compared on these tokens only; the routing comparison
    judges the flips. None when there are no comparable routing outputs.
    """
    agree = None
    for name in routing_outputs:
        if name not in expected or name not in actual or np.shape(actual[name]) != np.shape(expected[name]):
            continue
        if np.ndim(expected[name]) < 3:
            continue
        same = np.all(np.sort(expected[name], axis=-1) == np.sort(np.asarray(actual[name]), axis=-1), axis=-1)
        agree = same if agree is None else agree & same
    if agree is None:
        return None
    return np.cumsum(~agree, axis=-1) == 0


def _compare_unaffected(
    name: str, expected: np.ndarray, actual: np.ndarray, tolerance: Tolerance, unaffected: np.ndarray | None
) -> OutputComparison:
    """:func:`compare_values` over the tokens ``unaffected`` marks (all tokens when it does not apply)."""
    everything = compare_values(name, expected, actual, tolerance)
    if unaffected is None or expected.shape[: unaffected.ndim] != unaffected.shape or unaffected.all():
        return everything
    # The errors and cosine describe every token; the verdict only those before a flip.
    verdict = compare_values(name, expected[unaffected], actual[unaffected], tolerance)
    everything.passed = verdict.passed
    note = f"{int(unaffected.sum())} of {unaffected.size} tokens judged (the rest follow a routing flip)"
    everything.message = f"{verdict.message}; {note}" if verdict.message else ""
    return everything


def _compare_routing(name: str, expected: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> OutputComparison:
    """Routing agreement and expert overlap against the row; the message names the first disagreeing token."""
    agreement, disagreeing = routing_agreement(expected, actual)
    overlap = expert_overlap(expected, actual)
    shortfalls = []
    if agreement < tolerance.min_routing_agreement:
        shortfalls.append(f"routing agreement {agreement:.2%} below {tolerance.min_routing_agreement:.2%}")
    if overlap < tolerance.min_expert_overlap:
        shortfalls.append(f"expert overlap {overlap:.2%} below {tolerance.min_expert_overlap:.2%}")
    message = ""
    if shortfalls:
        first = disagreeing[0]
        message = (
            f"{name}: {'; '.join(shortfalls)}; first disagreeing token at {list(first)}: expected experts "
            f"{sorted(expected[first].tolist())}, got {sorted(actual[first].tolist())}"
        )
    return OutputComparison(
        name,
        "routing",
        not shortfalls,
        message,
        routing_agreement=agreement,
        expert_overlap=overlap,
        disagreeing_tokens=disagreeing,
    )


def compare_outputs(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    routing_outputs: Mapping[str, int] | None = None,
    precision: str = "exact",
    declared: Mapping[str, PrecisionMode] | None = None,
) -> list[OutputComparison]:
    """Compare every expected output with the actual one.

    Args:
        expected: golden outputs by name.
        actual: a backend's outputs by name.
        routing_outputs: names of outputs that hold selected expert ids (compared as sets per token).
        precision: the backend's precision mode, which picks the tolerance row.
        declared: the precision modes the backend declares (``Capabilities.precision_modes``).

    Returns:
        One :class:`OutputComparison` per expected output, plus one for each unexpected output.
    """
    routing_outputs = routing_outputs or {}
    results: list[OutputComparison] = []
    unaffected = tokens_before_first_flip(expected, actual, routing_outputs)
    for name, expected_value in expected.items():
        kind = "routing" if name in routing_outputs else "values"
        if name not in actual:
            results.append(OutputComparison(name, kind, False, f"{name}: missing from the backend's outputs"))
            continue
        actual_value = np.asarray(actual[name])
        if actual_value.shape != expected_value.shape:
            results.append(
                OutputComparison(
                    name,
                    kind,
                    False,
                    f"{name}: shape {list(actual_value.shape)}, expected {list(expected_value.shape)}",
                )
            )
            continue
        if actual_value.dtype != expected_value.dtype:
            results.append(
                OutputComparison(
                    name, kind, False, f"{name}: dtype {actual_value.dtype}, expected {expected_value.dtype}"
                )
            )
            continue
        tolerance = tolerance_for(expected_value.dtype.name, precision, declared)
        if kind == "routing":
            results.append(_compare_routing(name, expected_value, actual_value, tolerance))
        elif np.issubdtype(expected_value.dtype, np.floating):
            scope = unaffected if tolerance.min_routing_agreement < 1 else None
            results.append(_compare_unaffected(name, expected_value, actual_value, tolerance, scope))
        else:
            equal = np.array_equal(expected_value, actual_value)
            results.append(
                OutputComparison(
                    name,
                    kind,
                    equal,
                    "" if equal else f"{name}: integer values differ",
                    max_abs_error=float(np.abs(expected_value.astype(np.float64) - actual_value).max())
                    if expected_value.size
                    else 0.0,
                )
            )
    for name in actual:
        if name not in expected:
            results.append(OutputComparison(name, "values", False, f"{name}: output not in the expected outputs"))
    return results
