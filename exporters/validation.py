"""The checks every written graph passes before a bundle is written: the ONNX checker, then ONNX Runtime
against the expected outputs (torch's, or transformers')."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from portable_moe.compare import compare_outputs
from portable_moe.errors import ExportError, ExportParityError

Progress = Callable[[str], None]


def validate_graph(
    model_path: Path,
    cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    routing: dict[str, int],
    precision: str = "exact",
    say: Progress | None = None,
    reference: str = "torch",
) -> None:
    """The checks every written graph passes: the ONNX checker's full check with shape inference,
    then ONNX Runtime (CPU) against the expected outputs of ``cases`` under ``precision``'s tolerances.

    Raises:
        ExportError: naming the check that failed; the caller writes no bundle.
    """
    import onnx

    (say or (lambda message: None))("validating: ONNX checker (full check with shape inference)")
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the exported graph fails the ONNX checker: {error}") from None
    (say or (lambda message: None))(f"validating: ONNX Runtime against {reference} on {len(cases)} input set(s)")
    _check_parity(model_path, cases, routing, precision, reference)


def parity_session(model_path: Path) -> Any:
    """An ONNX Runtime CPU session of the graph exactly as written, for checking it against a reference.

    Raises:
        ExportError: when ONNX Runtime cannot load the graph.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # The graph exactly as exported, and one copy of the weights: constant folding and pre-packing
    # would hold two or three more copies of big models for a check that runs two small inputs.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False  # return each run's temporaries (e.g. concatenated expert weights)
    try:
        return onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"ONNX Runtime cannot load the exported graph: {error}") from None


def _check_parity(
    model_path: Path,
    cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    routing: dict[str, int],
    precision: str = "exact",
    reference: str = "torch",
) -> None:
    session = parity_session(model_path)
    for feeds, expected in cases:
        actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        failures = [c.message for c in compare_outputs(expected, actual, routing, precision) if not c.passed]
        if failures:
            shape = list(next(iter(feeds.values())).shape)
            raise ExportParityError(
                f"exported graph disagrees with {reference} on input shape {shape}: {failures[0]}; no bundle was written"
            )
