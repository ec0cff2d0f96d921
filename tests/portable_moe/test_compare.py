import re

import numpy as np
import pytest

from portable_moe.compare import TOLERANCES, PrecisionMode, Tolerance, compare_outputs, routing_agreement, tolerance_for


def test_every_tolerance_has_a_reason():
    for key, tolerance in TOLERANCES.items():
        assert len(tolerance.reason) > 20, key


def test_core_keeps_only_the_exact_rows():
    # Every other precision mode belongs to the backend that computes in it (Capabilities.precision_modes).
    assert {mode for mode, _ in TOLERANCES} == {"exact"}


def test_identical_outputs_pass():
    value = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    [result] = compare_outputs({"y": value}, {"y": value.copy()})
    assert result.passed and result.max_abs_error == 0 and result.cosine == pytest.approx(1.0)


def test_a_failure_says_where_and_how_much():
    expected = np.zeros((3, 4), np.float32)
    actual = expected.copy()
    actual[2, 1] = 0.5
    actual[0, 0] = 2e-4  # also outside atol, but not the worst
    [result] = compare_outputs({"y": expected}, {"y": actual})
    assert not result.passed
    assert result.worst_index == (2, 1)
    assert "2 of 12 elements outside atol=0.0001" in result.message
    assert "worst at index [2, 1]: expected 0, got 0.5" in result.message


def test_within_tolerance_passes():
    tolerance = tolerance_for("float32")
    expected = np.ones(100, np.float32)
    actual = expected + np.float32(tolerance.atol * 0.5)
    [result] = compare_outputs({"y": expected}, {"y": actual})
    assert result.passed


@pytest.mark.parametrize(
    ("actual", "message"),
    [
        ({}, "y: missing from the backend's outputs"),
        ({"y": np.zeros(3, np.float32)}, r"y: shape \[3\], expected \[2\]"),
        ({"y": np.zeros(2, np.float64)}, "y: dtype float64, expected float32"),
        ({"y": np.array([0, np.nan], np.float32)}, "non-finite values differ, first at index"),
    ],
)
def test_structure_is_compared_before_values(actual, message):
    results = compare_outputs({"y": np.zeros(2, np.float32)}, actual)
    assert not results[0].passed
    assert re.search(message, results[0].message)


def test_unexpected_output_fails():
    results = compare_outputs({}, {"z": np.zeros(1)})
    assert not results[0].passed and "not in the expected outputs" in results[0].message


def test_routing_is_compared_as_sets_per_token():
    expected = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    reordered = expected[..., ::-1].copy()
    assert routing_agreement(expected, reordered) == (1.0, [])
    flipped = expected.copy()
    flipped[1, 0] = [4, 7]
    agreement, disagreeing = routing_agreement(expected, flipped)
    assert agreement == 0.75 and disagreeing == [(1, 0)]
    [result] = compare_outputs({"ids": expected}, {"ids": flipped}, {"ids": 1})
    assert not result.passed and result.kind == "routing"
    assert "routing agreement 75.00%" in result.message and "expected experts [4, 5], got [4, 7]" in result.message


def test_non_finite_values_must_match_in_kind():
    expected = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    [same] = compare_outputs({"y": expected}, {"y": expected.copy()})
    assert same.passed
    swapped = expected.copy()
    swapped[1] = -np.inf
    [result] = compare_outputs({"y": expected}, {"y": swapped})
    assert not result.passed and "first at index [1]: expected inf, got -inf" in result.message


def test_unknown_precision_mode_names_the_known_ones():
    from portable_moe import ConformanceError

    with pytest.raises(ConformanceError, match="no tolerance for precision mode 'int4'; known modes: .*exact"):
        tolerance_for("float32", "int4")


def test_relative_error_to_the_output_scale_stays_meaningful_near_zero():
    expected = np.array([4.0, -2.0, 1e-6], dtype=np.float32)
    actual = expected + np.float32(1e-3)
    loose = PrecisionMode({"float32": Tolerance(5e-2, 1e-2, 1.0, "a float16 mode")}, near_tie_margin=1e-2)
    [result] = compare_outputs({"y": expected}, {"y": actual}, precision="half", declared={"half": loose})
    assert result.passed
    assert result.max_rel_error > 100  # elementwise: 1e-3 / 1e-6 at the near-zero element
    assert result.max_scaled_error == pytest.approx(1e-3 / 4.0, rel=1e-3)  # against the largest |value|
    assert result.to_dict()["max_scaled_error"] == result.max_scaled_error
    [zeros] = compare_outputs({"y": np.zeros(3, np.float32)}, {"y": np.zeros(3, np.float32)})
    assert zeros.max_scaled_error == 0.0
