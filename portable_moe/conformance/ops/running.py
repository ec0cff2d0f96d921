"""Running one op case (or a model check) on a backend in this process."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from portable_moe.backend import Backend, as_model_input
from portable_moe.compare import OutputComparison, Tolerance, compare_values
from portable_moe.conformance.expected_failures import expected_failures_of
from portable_moe.conformance.model_check import UNAVAILABLE, check_backend
from portable_moe.conformance.ops.cases import (
    ERROR,
    EXPECTED_FAILURE,
    FAILED,
    MODEL_OP,
    PASSED,
    TIMEOUT,
    UNEXPECTED_PASS,
    UNSUPPORTED,
    CaseResult,
    ErrorKind,
    ModelTask,
    OpCase,
    Task,
)
from portable_moe.errors import (
    BackendError,
    InputError,
    UnsupportedError,
    UnsupportedReason,
)
from portable_moe.registry import as_backend, get_backend


def tolerance_for_case(case: OpCase, backend: Backend | str, precision: str, strict: bool = False) -> Tolerance:
    """The tolerance outputs of ``case`` get on ``backend`` when its compiled model has ``precision``.

    The first matching entry of the backend's ``Capabilities.op_tolerance_overrides`` (none when
    ``strict``), else the case's own rtol/atol. The model-level rows (``compare.TOLERANCES``, the
    precision modes) are not used: their reduced-precision rows are sized for logits after several
    layers, far looser than one operator needs.

    Raises:
        BackendError: if ``backend`` is a name no backend is registered under.
    """
    overrides = () if strict else as_backend(backend).capabilities.op_tolerance_overrides
    for override in overrides:
        if override.matches(precision, case.name):
            return Tolerance(override.atol, override.rtol, 1.0, override.reason)
    return _own_tolerance(case)


def _own_tolerance(case: OpCase) -> Tolerance:
    return Tolerance(case.atol, case.rtol, 1.0, "the case's own tolerance")


def _compare_output(name: str, expected: Any, actual: Any, tolerance: Tolerance) -> OutputComparison:
    """Compare one output: a tensor, a sequence (element by element) or an optional (None when absent)."""
    if expected is None or actual is None:
        if expected is None and actual is None:
            return OutputComparison(name, "values", True)
        missing = "absent" if actual is None else "present"
        return OutputComparison(name, "values", False, f"{name}: the optional is {missing}, expected otherwise")
    if isinstance(expected, list):
        if not isinstance(actual, list | tuple) or len(actual) != len(expected):
            got = f"a sequence of {len(actual)}" if isinstance(actual, list | tuple) else f"a {type(actual).__name__}"
            return OutputComparison(name, "values", False, f"{name}: {got}, expected a sequence of {len(expected)}")
        for index, (expected_item, actual_item) in enumerate(zip(expected, actual)):
            comparison = _compare_output(f"{name}[{index}]", expected_item, actual_item, tolerance)
            if not comparison.passed:
                return comparison
        return OutputComparison(name, "values", True)
    return _compare_tensor(name, expected, actual, tolerance)


def _compare_tensor(name: str, expected: np.ndarray, actual: Any, tolerance: Tolerance) -> OutputComparison:
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return OutputComparison(
            name, "values", False, f"{name}: shape {list(actual.shape)}, expected {list(expected.shape)}"
        )
    # ONNX strings: numpy holds them as objects or as fixed-width str; either is a string tensor.
    if expected.dtype.kind in "OUS" and actual.dtype.kind in "OUS":
        expected, actual = expected.astype(object), actual.astype(object)
    if actual.dtype != expected.dtype:
        return OutputComparison(name, "values", False, f"{name}: dtype {actual.dtype}, expected {expected.dtype}")
    # numpy's floats and ml_dtypes' (bfloat16, float8 ...) are compared within tolerance.
    if np.issubdtype(expected.dtype, np.floating) or expected.dtype.name.startswith(("float", "bfloat")):
        # nan, +inf and -inf must each match in kind: compare_values checks that before any tolerance.
        return compare_values(name, expected, actual, tolerance)
    differ = np.asarray(expected != actual, dtype=bool)
    if not np.any(differ):
        return OutputComparison(name, "values", True)
    index = tuple(int(i) for i in np.argwhere(differ)[0])
    return OutputComparison(
        name,
        "values",
        False,
        f"{name}: {int(np.count_nonzero(differ))} of {differ.size} elements differ; first at index {list(index)}: "
        f"expected {expected[index].item()!r}, got {actual[index].item()!r}",
        worst_index=index,
    )


def _declared_unsupported(backend: Backend, model: onnx.ModelProto) -> str:
    """Why ``backend`` declares it cannot run ``model``, or "" when it declares nothing against it."""
    initializers = {init.name for init in model.graph.initializer}
    values = [("input", v) for v in model.graph.input if v.name not in initializers]
    values += [("output", v) for v in model.graph.output]
    for role, value in values:
        if value.type.WhichOneof("value") != "tensor_type":
            kind = (value.type.WhichOneof("value") or "untyped").removesuffix("_type").replace("_", " ")
            return f"{role} {value.name!r} is a {kind}: backend {backend.name!r} declares tensors only"
    declared = backend.capabilities.dtypes
    for role, value in values:
        elem_type = value.type.tensor_type.elem_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
        if dtype not in declared:
            onnx_name = onnx.TensorProto.DataType.Name(elem_type).lower()
            shown = onnx_name if onnx_name == dtype else f"{onnx_name} (numpy {dtype})"
            return (
                f"{role} {value.name!r} has dtype {shown}, which backend {backend.name!r} "
                f"does not list in its capabilities ({', '.join(sorted(declared))})"
            )
    try:
        backend.check_supported(as_model_input(model))
    except BackendError as error:
        return str(error)
    return ""


def run_case(backend: Backend, case: OpCase, strict: bool = False) -> CaseResult:
    """Run one case on ``backend`` in this process and classify it. Never raises for the backend's failures.

    Args:
        backend: the backend.
        case: the case.
        strict: compare with the case's own tolerances only (no tolerance overrides).
    """
    started = time.perf_counter()
    placement: dict[str, int] = {}

    def result(status: str, code: str = "", reason: str = "", **extra: Any) -> CaseResult:
        seconds = time.perf_counter() - started
        return CaseResult(
            case.name, case.op, backend.name, status, reason, seconds, placement=placement, code=code, **extra
        )

    def refused(stage: ErrorKind, error: Exception) -> CaseResult:
        if isinstance(error, UnsupportedError):
            return result(UNSUPPORTED, error.code, str(error))
        return result(ERROR, stage, f"{stage}: {describe_error(error)}")

    runtime_answers = backend.capabilities.runtime_reports_unsupported
    try:
        model = onnx.load_model_from_string(case.model)
        declared = "" if runtime_answers else _declared_unsupported(backend, model)
    except Exception as error:
        return result(ERROR, ErrorKind.BAD_CASE, f"could not read the case's model: {type(error).__name__}: {error}")
    if declared:
        return result(UNSUPPORTED, UnsupportedReason.DECLARED, declared)
    try:
        prepared = as_model_input(model)
        # onnx's cases feed NaN and Inf on purpose (IsNaN, Cast, Mod edge cases).
        compiled = backend.compile(prepared, {"nan_policy": "pass"}, check_declared=not runtime_answers)
    except Exception as error:
        return refused(ErrorKind.COMPILE, error)
    with contextlib.suppress(Exception):  # placement is a report, not a verdict
        placement.update(compiled.placement())
    input_names = [spec.name for spec in prepared.inputs]
    output_names = [spec.name for spec in prepared.outputs]
    precision = getattr(compiled, "precision", "exact")
    tolerance = tolerance_for_case(case, backend, precision, strict)
    outputs_seen: list[tuple[str, Any, Any]] = []
    for inputs, expected in case.data_sets:
        if len(inputs) != len(input_names) or len(expected) != len(output_names):
            return result(
                ERROR,
                ErrorKind.BAD_CASE,
                f"the case gives {len(inputs)} inputs and {len(expected)} outputs, the graph has "
                f"{len(input_names)} and {len(output_names)}",
            )
        try:
            actual = compiled.run(dict(zip(input_names, inputs)))
        except Exception as error:
            return refused(ErrorKind.RUN, error)
        for name, expected_value in zip(output_names, expected):
            comparison = _compare_output(name, expected_value, actual[name], tolerance)
            if not comparison.passed:
                return result(FAILED, ErrorKind.MISMATCH, comparison.message, worst=comparison.to_dict())
            outputs_seen.append((name, expected_value, actual[name]))
    override = None
    if tolerance.reason != _own_tolerance(case).reason:
        override = _override_record(case, tolerance, outputs_seen)
    return result(PASSED, tolerance_override=override)


def _override_record(
    case: OpCase, tolerance: Tolerance, outputs: Sequence[tuple[str, Any, Any]]
) -> dict[str, Any] | None:
    """What a passing case owes to its tolerance override: None if it also passes with its own tolerance."""
    own = _own_tolerance(case)
    for name, expected, actual in outputs:
        comparison = _compare_output(name, expected, actual, own)
        if not comparison.passed:
            return {
                "rtol": tolerance.rtol,
                "atol": tolerance.atol,
                "reason": tolerance.reason,
                "case_rtol": own.rtol,
                "case_atol": own.atol,
                "output": comparison.name,
                "max_abs_error": comparison.max_abs_error,
                "max_rel_error": comparison.max_rel_error,
                "message": comparison.message,
            }
    return None


def describe_error(error: BaseException) -> str:
    text = str(error).strip()
    # PortableMoEError messages already name the backend and the exception they wrap.
    if isinstance(error, BackendError | InputError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_model_check(backend: Backend, bundle_dir: str | os.PathLike[str]) -> CaseResult:
    """Check a bundle on ``backend`` against its golden data (model conformance) as a CaseResult."""
    from portable_moe.bundle import load_bundle

    started = time.perf_counter()
    name = Path(bundle_dir).name
    try:
        outcome = check_backend(load_bundle(bundle_dir), backend)
    except Exception as error:
        return CaseResult(name, MODEL_OP, backend.name, ERROR, describe_error(error), time.perf_counter() - started)
    status = UNSUPPORTED if outcome.status == UNAVAILABLE else outcome.status
    worst = [c.to_dict() for c in outcome.comparisons if not c.passed]
    details = {
        "max_abs_error": outcome.worst("max_abs_error"),
        "max_rel_error": outcome.worst("max_rel_error"),
        "routing_agreement": outcome.routing_agreement(),
    }
    return CaseResult(
        name,
        MODEL_OP,
        backend.name,
        status,
        outcome.reason,
        time.perf_counter() - started,
        worst[0] if worst else None,
        outcome.placement,
        {key: value for key, value in details.items() if value == value},  # NaN: not measured
    )


def run_task(task: Task, cases: dict[str, OpCase]) -> CaseResult:
    """Run one task in this process (what a worker does with each task it receives)."""
    backend = get_backend(task.backend)
    if isinstance(task, ModelTask):
        return run_model_check(backend, task.bundle)
    return run_case(backend, cases[task.case], task.strict)


def settle_expected(outcome: CaseResult) -> CaseResult:
    """Apply the backend's expected-failures list to an op case's result.

    A listed case that failed, errored or timed out becomes ``expected-failure``; one that passed
    becomes ``unexpected-pass``. The status it really had stays in ``listed_outcome`` and its
    reason after the listed one. Unlisted cases, unsupported ones and model checks are unchanged.

    Raises:
        BackendError: if the backend's expected-failures file is malformed.
    """
    if outcome.op == MODEL_OP or outcome.status not in (PASSED, FAILED, ERROR, TIMEOUT):
        return outcome
    listed = expected_failures_of(outcome.backend).get(outcome.case)
    if listed is None:
        return outcome
    status = UNEXPECTED_PASS if outcome.status == PASSED else EXPECTED_FAILURE
    got = "it passed: remove it from the list" if outcome.status == PASSED else f"{outcome.status}: {outcome.reason}"
    return replace(
        outcome,
        status=status,
        code=listed.category if status == EXPECTED_FAILURE else outcome.code,
        reason=f"listed as {listed.describe()}; {got}",
        listed_outcome=outcome.status,
    )
