"""The op-level conformance suite: the node test cases that ship inside ``onnx``, run on any backend.

Every case goes through the same path users take: ``get_backend(name).compile(model)`` and then
``run(feeds)``. Each (case, backend) pair ends in exactly one :class:`CaseStatus`:

- ``passed``: every output matches the case's expected output within tolerance.
- ``failed``: an output differs (the message names the worst element and its error).
- ``unsupported``: the runtime itself says it cannot run the case. A backend whose capabilities
  say ``runtime_reports_unsupported`` (cpu, cuda, openvino, reference) is compiled and run on
  every case, and it is unsupported only when ``compile`` or ``run`` raises
  :class:`~portable_moe.errors.UnsupportedError`, which carries a code
  (:class:`~portable_moe.errors.UnsupportedReason`) and the runtime's own words. For any other
  backend (npu-sim's simulated operator table) the declaration decides before compiling: a
  non-tensor input or output, a dtype missing from ``capabilities.dtypes``, or
  ``check_supported`` refusing the model (code ``declared``).
- ``error``: anything else that goes wrong: compile or run raises, or the worker process crashes
  (the signal is recorded).
- ``timeout``: the case ran past the per-case time limit (the limit is in the reason and in
  ``details["time_limit_s"]``); its worker was killed and replaced.
- ``expected-failure`` / ``unexpected-pass``: the case is listed in the backend's expected-failures
  file (:mod:`portable_moe.expected_failures`) and did not pass / passed.

Unsupported is never counted as passed; failed, error, timeout and unexpected pass make the
command exit 1. Cases run in worker processes (``spawn``), so a backend
that segfaults or hangs loses that one case: the parent records it, starts a new worker and goes on.

Models are compiled with ``nan_policy="pass"`` (onnx's cases feed NaN and Inf on purpose). Outputs
are compared in order (shape, dtype, then values; nan, +inf and -inf must match in kind; sequences
element by element, an absent optional must be absent) with the case's own rtol/atol unless an
entry of :data:`TOLERANCE_OVERRIDES` matches (``strict`` turns the overrides off). A case that
passed only because of an override records its raw error and the case's own tolerance in
``CaseResult.tolerance_override``. Cases whose expected output is a random draw are left out by
default (:data:`DEFAULT_EXCLUDES`).

Used by ``portable-moe conformance ops``, the pytest plugin (:mod:`portable_moe.pytest_plugin`) and
``scripts/conformance_report.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import tempfile
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from portable_moe import registry
from portable_moe._compat import StrEnum
from portable_moe.backend import Backend, as_model_input
from portable_moe.compare import OutputComparison, Tolerance, compare_values
from portable_moe.conformance import UNAVAILABLE, check_backend
from portable_moe.errors import (
    BackendError,
    BackendUnavailableError,
    InputError,
    UnsupportedError,
    UnsupportedReason,
)
from portable_moe.expected_failures import expected_failures_of
from portable_moe.registry import get_backend


class CaseStatus(StrEnum):
    """How a (case, backend) pair ended; the values are what JSON, JUnit and the CLI show."""

    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    TIMEOUT = "timeout"
    UNSUPPORTED = "unsupported"
    EXPECTED_FAILURE = "expected-failure"
    UNEXPECTED_PASS = "unexpected-pass"


class ErrorKind(StrEnum):
    """Where an error or failure happened (``CaseResult.code`` for those statuses)."""

    BAD_CASE = "bad-case"  # the case's own model or data could not be read
    COMPILE = "compile"
    RUN = "run"
    CRASH = "crash"  # the worker process died
    TIMEOUT = "timeout"
    MISMATCH = "mismatch"  # an output differs from the expected one


PASSED, FAILED, ERROR, TIMEOUT = CaseStatus.PASSED, CaseStatus.FAILED, CaseStatus.ERROR, CaseStatus.TIMEOUT
UNSUPPORTED, EXPECTED_FAILURE, UNEXPECTED_PASS = (
    CaseStatus.UNSUPPORTED,
    CaseStatus.EXPECTED_FAILURE,
    CaseStatus.UNEXPECTED_PASS,
)
STATUSES = tuple(CaseStatus)
# The statuses that make ``conformance ops`` exit 1: a backend that does not conform, or a list gone stale.
NOT_CONFORMING = (FAILED, ERROR, TIMEOUT, UNEXPECTED_PASS)

# Seconds per case. The slowest cases that finish (3-D pooling on the reference evaluator) take
# 35-90 s on 2 cores; past this limit a case is reported as a timeout with the limit.
DEFAULT_TIMEOUT = 20.0
# A model check exports nothing but compiles a whole model (npu-sim: once per shape bucket) and
# runs it: the small preset takes over a minute on npu-sim on 2 cores.
DEFAULT_MODEL_TIMEOUT = 900.0
_STARTUP_TIMEOUT = 120.0  # a worker imports numpy, onnx and the backend, then loads the cases
_MAX_STARTUP_FAILURES = 2  # workers that die before they can take a case point at a broken setup


@dataclass(frozen=True)
class OpCase:
    """One ONNX node test case, in a form that pickles cheaply to worker processes.

    Attributes:
        name: the case name, e.g. ``"test_add_bcast"``.
        op: the operator it tests (``"Add"``; ``"ai.onnx.ml:LabelEncoder"`` outside ai.onnx). An
            ``_expanded`` case (the op's function body) counts under the op it expands.
        model: the serialized ModelProto.
        data_sets: ``(inputs, outputs)`` pairs, each a tuple in graph-input / graph-output order;
            tensors are numpy arrays, sequences lists, an absent optional None.
        rtol / atol: the case's own tolerance.
    """

    name: str
    op: str
    model: bytes
    data_sets: tuple[tuple[tuple[Any, ...], tuple[Any, ...]], ...]
    rtol: float
    atol: float


@dataclass(frozen=True)
class ToleranceOverride:
    """A tolerance that replaces the case's own where backend, precision mode and case name all match.

    Attributes:
        backend: a registry name, or "*" for any backend.
        precision: a compiled model's ``precision`` mode, or "*" for any.
        case_pattern: a regex searched in the case name.
        rtol / atol: the tolerance.
        reason: why, with what was measured.
    """

    backend: str
    precision: str
    case_pattern: str
    rtol: float
    atol: float
    reason: str

    def matches(self, backend: str, precision: str, case_name: str) -> bool:
        return (
            self.backend in ("*", backend)
            and self.precision in ("*", precision)
            and re.search(self.case_pattern, case_name) is not None
        )


# The one table of tolerance overrides for the op suite, first match wins. Every entry says why and
# what was measured; none is widened to make a wrong result pass (the Resize align_corners and
# Attention -inf mask differences of ORT stay failed and show in the report).
TOLERANCE_OVERRIDES: tuple[ToleranceOverride, ...] = (
    ToleranceOverride(
        backend="cpu",
        precision="*",
        case_pattern=r"^test_(dft|stft)",
        rtol=1e-3,
        atol=1e-3,
        reason=(
            "onnx computes the expected spectra with numpy's float64 FFT, ORT in float32; the outputs reach "
            "~1900, and bins that cancel to ~0 keep the float32 rounding of the large terms (seen up to "
            "2.4e-4). atol 1e-3 is ~5e-7 of the output scale: a wrong bin (errors of 1 and more) still fails."
        ),
    ),
    ToleranceOverride(
        backend="cpu",
        precision="*",
        case_pattern=r"^test_attention_.*fp16",
        rtol=2e-3,
        atol=1e-7,
        reason=(
            "float16 outputs: one float16 ulp is up to 2^-10 (~9.8e-4) relative, and ORT accumulates in float32 "
            "and rounds once where onnx's numpy code rounds between steps; seen: 2 ulps (4.9e-4 at 0.398). "
            "rtol 2e-3 allows 2 ulps."
        ),
    ),
    ToleranceOverride(
        backend="*",
        precision="force_fp16",
        case_pattern="",
        rtol=1e-3,
        atol=5e-3,
        reason=(
            "float16 compute (npu-sim's default precision mode; one float16 ulp is 9.8e-4 at 1.0). Single ops stay "
            "inside the cases' rtol 1e-3; onnx's _expanded function bodies chain 5-10 float16 ops, and the "
            "cancellation in normalisation leaves absolute errors at the scale of the intermediates (~1). Measured "
            "on npu-sim: up to 3.5e-3 (LayerNormalization expanded), 7.7e-4 (window functions), 3.4e-4 (DFT, run "
            "in float32 on the host). atol 5e-3 (~5 ulps at 1.0) leaves 1.4x headroom; a wrong kernel still fails."
        ),
    ),
)


@dataclass(frozen=True)
class Exclusion:
    """Cases left out of the suite by default (``--no-default-excludes`` runs them), with the reason."""

    case_pattern: str
    reason: str


DEFAULT_EXCLUDES: tuple[Exclusion, ...] = (
    Exclusion(
        r"^test_bernoulli",
        "the expected output is one random draw from numpy's generator; Bernoulli's spec fixes only the "
        "distribution, so a conforming backend need not (and cannot be asked to) reproduce the draw",
    ),
    Exclusion(
        r"^test_training_dropout(_default)?(_mask)?$",
        "training-mode Dropout with ratio > 0: the expected mask is one random draw from numpy's generator "
        "(the _zero_ratio cases are deterministic and stay in)",
    ),
)


@dataclass
class CaseResult:
    """How one case ended on one backend.

    Attributes:
        case: the case name (a bundle name for model checks).
        op: the operator the case tests ("(model)" for model checks).
        backend: the backend's registry name.
        status: a :class:`CaseStatus`.
        reason: why it did not pass (empty when it passed); the runtime's own words when it said so.
        seconds: compile plus run time (the limit for a case that timed out).
        worst: the failing output's comparison (``OutputComparison.to_dict()``) when failed on values.
        placement: where the compiled model's nodes ran (``CompiledModel.placement()``), when it compiled.
        details: for model checks, the largest errors and the routing agreement; for a timeout,
            ``time_limit_s``.
        code: the reason as a code: an :class:`~portable_moe.errors.UnsupportedReason` when
            unsupported, an :class:`ErrorKind` when failed, errored or timed out, the
            :class:`~portable_moe.expected_failures.FailureCategory` when expected to fail.
        tolerance_override: for a case that passed only because of an entry of
            :data:`TOLERANCE_OVERRIDES`: that tolerance and its reason, the case's own tolerance,
            and the raw error of the first output outside the case's own tolerance.
        listed_outcome: for an expected failure or unexpected pass, the status the case really had.
    """

    case: str
    op: str
    backend: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    worst: dict[str, Any] | None = None
    placement: dict[str, int] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)
    code: str = ""
    tolerance_override: dict[str, Any] | None = None
    listed_outcome: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Task:
    """A unit of work for a worker: an op case (``key`` = case name) or a bundle (``key`` = path)."""

    kind: str  # "op" or "model"
    backend: str
    key: str
    strict: bool = False  # op cases: the case's own tolerances only (no TOLERANCE_OVERRIDES)


# ---------------------------------------------------------------------------------------------
# Collecting and selecting cases


def _normalize(value: Any) -> Any:
    """Case data as the runner sees it: numpy arrays, lists for sequences, None for absent optionals."""
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, list | tuple):
        return [_normalize(item) for item in value]
    if value is None or isinstance(value, dict):
        return value
    return np.asarray(value)  # numpy scalars (np.float32(1.0)) become 0-d arrays


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


_CACHE_FORMAT = 1


def cache_file() -> Path | None:
    """Where collected cases are kept between runs, or None when caching is off.

    ``$PORTABLE_MOE_CACHE_DIR`` if set (set it empty to turn caching off), else
    ``$XDG_CACHE_HOME/portable-moe`` or ``~/.cache/portable-moe``. The name carries the onnx version.
    """
    configured = os.environ.get("PORTABLE_MOE_CACHE_DIR")
    if configured == "":
        return None
    base = (
        Path(configured)
        if configured
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "portable-moe"
    )
    numpy_major = np.__version__.split(".")[0]
    return base / f"onnx-{onnx.__version__}-node-cases-numpy{numpy_major}-v{_CACHE_FORMAT}.pickle"


def collect_cases() -> tuple[OpCase, ...]:
    """Every node test case of the installed ``onnx`` (1,884 on onnx 1.23), in onnx's order.

    Generating them runs onnx's own numpy implementations (6 s or more), so they are kept for the
    life of the process and in :func:`cache_file` (written by this code only, and read back only
    when its name matches the installed onnx: the same trust as Python's ``__pycache__``).
    """
    cases = _cases_of_this_process()
    path = cache_file()
    if path is not None and not path.is_file():  # the cache moved since this process collected
        _write_cache(path, cases)
    return cases


@functools.cache
def _cases_of_this_process() -> tuple[OpCase, ...]:
    path = cache_file()
    cached = _read_cache(path) if path is not None else None
    if cached is not None:
        return cached
    cases = _generate_cases()
    if path is not None:
        _write_cache(path, cases)
    return cases


def _read_cache(path: Path) -> tuple[OpCase, ...] | None:
    try:
        with open(path, "rb") as file:
            cached = pickle.load(file)
    except Exception:  # missing, truncated or from an older layout: generate again
        return None
    if isinstance(cached, tuple) and all(isinstance(case, OpCase) for case in cached):
        return cached
    return None


def _write_cache(path: Path, cases: tuple[OpCase, ...]) -> None:
    with contextlib.suppress(OSError):  # a read-only home only costs the next run the generation time
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        with open(partial, "wb") as file:
            pickle.dump(cases, file, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, path)


def _generate_cases() -> tuple[OpCase, ...]:
    from onnx.backend.test.case.node import collect_testcases

    # onnx's generators overflow and divide by zero on purpose (testing inf and nan handling).
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        raw_cases = list(collect_testcases(None))
    single_node_ops = {
        case.name: _op_name(case.model.graph.node[0]) for case in raw_cases if len(case.model.graph.node) == 1
    }
    cases = []
    for case in raw_cases:
        if case.name in single_node_ops:
            op = single_node_ops[case.name]
        else:
            # "test_softmax_axis_0_expanded_ver18" tests Softmax through its function body.
            base = case.name.split("_expanded")[0]
            op = single_node_ops.get(base, "(graph)")
        data_sets = tuple(
            (tuple(_normalize(value) for value in inputs), tuple(_normalize(value) for value in outputs))
            for inputs, outputs in case.data_sets or ()
        )
        cases.append(OpCase(case.name, op, case.model.SerializeToString(), data_sets, case.rtol, case.atol))
    return tuple(cases)


def _compile_patterns(patterns: Iterable[str], option: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise InputError(f"bad {option} regex {pattern!r}: {error}") from None
    return compiled


def select_cases(
    cases: Sequence[OpCase],
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    default_excludes: bool = True,
) -> list[OpCase]:
    """Keep the cases whose name matches any ``include`` regex (all if none) and no ``exclude`` regex.

    Regexes are searched anywhere in the name (``re.search``), as in onnx's BackendTest. With
    ``default_excludes`` the patterns of :data:`DEFAULT_EXCLUDES` are left out as well.

    Raises:
        InputError: if a regex does not compile, or nothing is left.
    """
    includes = _compile_patterns(include, "--include")
    excludes = _compile_patterns(exclude, "--exclude")
    if default_excludes:
        excludes += [re.compile(exclusion.case_pattern) for exclusion in DEFAULT_EXCLUDES]
    selected = [
        case
        for case in cases
        if (not includes or any(p.search(case.name) for p in includes))
        and not any(p.search(case.name) for p in excludes)
    ]
    if not selected:
        note = " (the last are the default exclusions; --no-default-excludes lifts them)" if default_excludes else ""
        raise InputError(
            f"no op cases match include {[p.pattern for p in includes]} and exclude {[p.pattern for p in excludes]}"
            f"{note}; of {len(cases)} cases, whose names look like 'test_add_bcast'"
        )
    return selected


# ---------------------------------------------------------------------------------------------
# Running one case in this process


def tolerance_for_case(case: OpCase, backend_name: str, precision: str, strict: bool = False) -> Tolerance:
    """The tolerance outputs of ``case`` get on a backend whose compiled model has ``precision``.

    The first matching entry of :data:`TOLERANCE_OVERRIDES` (none when ``strict``), else the
    case's own rtol/atol. The model-level table (``compare.TOLERANCES``) is not used: its
    reduced-precision rows are sized for logits after several layers, far looser than one operator needs.
    """
    for override in () if strict else TOLERANCE_OVERRIDES:
        if override.matches(backend_name, precision, case.name):
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
        expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
        # nan, +inf and -inf must each match in kind. compare's allclose check does not do that (it
        # accepts any non-finite value for any other, and fails equal NaNs), so matching non-finite
        # elements are settled here and set to 0 on both sides before it runs.
        both = ~np.isfinite(expected64) & ~np.isfinite(actual64)
        same = (np.isnan(expected64) & np.isnan(actual64)) | (expected64 == actual64)
        if np.any(both & ~same):
            index = tuple(int(i) for i in np.argwhere(both & ~same)[0])
            return OutputComparison(
                name,
                "values",
                False,
                f"{name}: non-finite values differ at index {list(index)}: expected {expected64[index].item()!r}, "
                f"got {actual64[index].item()!r}",
                worst_index=index,
            )
        expected64[both], actual64[both] = 0.0, 0.0
        return compare_values(name, expected64, actual64, tolerance)
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
        strict: compare with the case's own tolerances only (no :data:`TOLERANCE_OVERRIDES`).
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
        return result(ERROR, stage, f"{stage}: {_describe(error)}")

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
    tolerance = tolerance_for_case(case, backend.name, precision, strict)
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


def _describe(error: BaseException) -> str:
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
        return CaseResult(name, "(model)", backend.name, ERROR, _describe(error), time.perf_counter() - started)
    status = UNSUPPORTED if outcome.status == UNAVAILABLE else outcome.status
    worst = [c.to_dict() for c in outcome.comparisons if not c.passed]
    details = {
        "max_abs_error": outcome.worst("max_abs_error"),
        "max_rel_error": outcome.worst("max_rel_error"),
        "routing_agreement": outcome.routing_agreement(),
    }
    return CaseResult(
        name,
        "(model)",
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
    if task.kind == "model":
        return run_model_check(backend, task.key)
    return run_case(backend, cases[task.key], task.strict)


def settle_expected(outcome: CaseResult) -> CaseResult:
    """Apply the backend's expected-failures list to an op case's result.

    A listed case that failed, errored or timed out becomes ``expected-failure``; one that passed
    becomes ``unexpected-pass``. The status it really had stays in ``listed_outcome`` and its
    reason after the listed one. Unlisted cases, unsupported ones and model checks are unchanged.

    Raises:
        BackendError: if the backend's expected-failures file is malformed.
    """
    if outcome.op == "(model)" or outcome.status not in (PASSED, FAILED, ERROR, TIMEOUT):
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


# ---------------------------------------------------------------------------------------------
# Worker processes


def _worker_main(connection: Connection, cases_file: str, log_path: str, factories: bytes) -> None:
    """A worker: load the cases, then run tasks until told to stop. Its output goes to a log file.

    ``factories`` are the parent's in-process backend registrations, pickled.
    """
    import faulthandler

    log = open(log_path, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)
    # Backends print from C (ORT's logger, a crash report): keep it off the user's terminal.
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(log)  # on SIGSEGV, the Python stack goes to the log; the parent reads it
    with contextlib.suppress(ValueError):  # the parent handles Ctrl-C and stops the workers
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    for name, factory in pickle.loads(factories).items():
        registry.register_backend(name, factory)
    with open(cases_file, "rb") as file:
        cases = {case.name: case for case in pickle.load(file)}
    connection.send(("ready", os.getpid()))
    while True:
        try:
            task = connection.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            outcome = run_task(task, cases)
        except Exception as error:  # e.g. the backend vanished from the registry in this process
            outcome = CaseResult(task.key, "", task.backend, ERROR, _describe(error))
        connection.send(("result", outcome))


def _last_frame(log_path: Path) -> str:
    """The innermost Python frame faulthandler wrote for a crash, if any."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for position in range(len(lines) - 1, -1, -1):
        if "most recent call first" in lines[position]:
            frames = [line.strip() for line in lines[position + 1 :] if line.strip().startswith("File ")]
            return frames[0] if frames else ""
    return ""


def _log_tail(log_path: Path, characters: int = 600) -> str:
    try:
        return log_path.read_text(errors="replace")[-characters:].strip()
    except OSError:
        return ""


class _Worker:
    """One worker process and the task it is running."""

    def __init__(self, pool: WorkerPool, serial: int) -> None:
        self.log_path = pool.directory / f"worker-{serial}.log"
        parent_end, child_end = pool.context.Pipe()
        self.process = pool.context.Process(
            target=_worker_main,
            args=(child_end, str(pool.cases_file), str(self.log_path), pool.factories),
            name=f"portable-moe-opsuite-{serial}",
            daemon=True,
        )
        self.process.start()
        child_end.close()
        self.connection = parent_end
        self.ready = False
        self.index: int | None = None
        self.task: Task | None = None
        self.limit = 0.0  # the running task's timeout
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT

    def start_task(self, index: int, task: Task, timeout: float) -> None:
        self.index, self.task, self.limit = index, task, timeout
        self.deadline = time.monotonic() + timeout
        self.connection.send(task)

    def finish_task(self) -> None:
        self.index, self.task = None, None
        self.deadline = math.inf

    def exit_description(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code is None:
            return "stopped responding"
        if code < 0:
            try:
                return f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def stop(self, kill: bool = False) -> None:
        if not kill and self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.connection.send(None)
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.connection.close()


class WorkerPool:
    """Worker processes that run tasks with a per-task timeout, replacing any worker that crashes or hangs.

    Workers are started with ``spawn``: they find backends through entry points (they inherit
    ``sys.path``, so a package put on it is found too) and get the backends registered in-process
    with ``register_backend`` whose factory pickles (a module-level class). Scripts that use the
    pool must guard their top level with ``if __name__ == "__main__":``, as "spawn" requires.

    Use as a context manager; :meth:`close` stops the workers and removes the temporary files.
    """

    def __init__(self, cases: Sequence[OpCase], jobs: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        if jobs < 1:
            raise InputError(f"--jobs must be at least 1 for worker processes, got {jobs}")
        if not timeout > 0:
            raise InputError(f"--timeout must be a positive number of seconds, got {timeout}")
        self.jobs = jobs
        self.timeout = timeout
        self.context = multiprocessing.get_context("spawn")
        self.directory = Path(tempfile.mkdtemp(prefix="portable-moe-opsuite-"))
        self.cases_file = self.directory / "cases.pickle"
        with open(self.cases_file, "wb") as file:
            pickle.dump(list(cases), file, protocol=pickle.HIGHEST_PROTOCOL)
        self._ops = {case.name: case.op for case in cases}
        self._unpicklable: dict[str, str] = {}
        picklable = {}
        for name, factory in registry.in_process_factories().items():
            try:
                pickle.dumps(factory)
                picklable[name] = factory
            except Exception as error:
                self._unpicklable[name] = f"{type(error).__name__}: {error}"
        self.factories = pickle.dumps(picklable)
        self._workers: list[_Worker] = []
        self._serial = 0
        self._startup_failures = 0

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        self._serial += 1
        return _Worker(self, self._serial)

    def _replace(self, worker: _Worker, kill: bool) -> None:
        worker.stop(kill=kill)
        self._workers[self._workers.index(worker)] = self._spawn()

    def run(
        self,
        tasks: Sequence[Task],
        on_result: Callable[[CaseResult], None] | None = None,
        timeout: float | None = None,
    ) -> list[CaseResult]:
        """Run ``tasks`` on the workers; return one result per task, in the order given.

        ``timeout`` replaces the pool's per-task timeout for these tasks (model checks need more).

        Raises:
            BackendError: if worker processes keep dying before they can take a task (a broken
                installation), with the end of the worker's log.
        """
        unsendable = sorted({task.backend for task in tasks} & set(self._unpicklable))
        if unsendable:
            name = unsendable[0]
            raise BackendError(
                f"backend {name!r} was registered in this process with a factory that cannot be sent to a worker "
                f"process ({self._unpicklable[name]}); register it through an entry point or with a module-level "
                "class, or run in this process (--jobs 0)"
            )
        while len(self._workers) < min(self.jobs, len(tasks)):
            self._workers.append(self._spawn())
        pending = deque(enumerate(tasks))
        results: list[CaseResult | None] = [None] * len(tasks)

        def record(index: int, outcome: CaseResult) -> None:
            outcome = settle_expected(outcome)
            results[index] = outcome
            if on_result is not None:
                on_result(outcome)

        while pending or any(worker.task is not None for worker in self._workers):
            for worker in list(self._workers):
                if worker.ready and worker.task is None and pending:
                    index, task = pending.popleft()
                    try:
                        worker.start_task(index, task, timeout or self.timeout)
                    except OSError:  # it died while idle: not this task's doing, so the task waits for another
                        worker.finish_task()
                        pending.appendleft((index, task))
                        self._replace(worker, kill=True)
            waiting = [w for w in self._workers if w.task is not None or (not w.ready and pending)]
            if not waiting:
                continue
            soonest = min(worker.deadline for worker in waiting)
            by_connection = {worker.connection: worker for worker in waiting}
            for connection in wait(list(by_connection), timeout=max(0.0, soonest - time.monotonic())):
                worker = by_connection[connection]
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    self._worker_died(worker, record)
                    continue
                if message[0] == "ready":
                    worker.ready = True
                    worker.deadline = math.inf
                    self._startup_failures = 0
                else:
                    index, task = worker.index, worker.task
                    worker.finish_task()
                    record(index, message[1])
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.deadline > now:
                    continue
                if worker.task is None:
                    self._startup_failed(worker, f"did not start within {_STARTUP_TIMEOUT:.0f} s")
                    continue
                reason = f"ran past the time limit of {worker.limit:g} s; the worker was killed and replaced"
                record(worker.index, self._lost_task(worker.task, TIMEOUT, reason, worker.limit))
                self._replace(worker, kill=True)
        return [outcome for outcome in results if outcome is not None]

    def _worker_died(self, worker: _Worker, record: Callable[[int, CaseResult], None]) -> None:
        how = worker.exit_description()
        if not worker.ready:
            self._startup_failed(worker, how)
            return
        if worker.task is None:  # died while idle
            self._replace(worker, kill=True)
            return
        frame = _last_frame(worker.log_path)
        reason = f"the worker process {how} while running this case" + (f" (at {frame})" if frame else "")
        record(worker.index, self._lost_task(worker.task, ERROR, reason, 0.0))
        self._replace(worker, kill=True)

    def _lost_task(self, task: Task, status: CaseStatus, reason: str, seconds: float) -> CaseResult:
        """The result of a task whose worker crashed (an error) or ran past its limit (a timeout)."""
        code = ErrorKind.TIMEOUT if status == TIMEOUT else ErrorKind.CRASH
        details = {"time_limit_s": seconds} if status == TIMEOUT else {}
        case, op = (task.key, self._ops.get(task.key, "")) if task.kind == "op" else (Path(task.key).name, "(model)")
        return CaseResult(case, op, task.backend, status, reason, seconds, details=details, code=code)

    def _startup_failed(self, worker: _Worker, how: str) -> None:
        self._startup_failures += 1
        tail = _log_tail(worker.log_path)
        self._replace(worker, kill=True)
        if self._startup_failures >= _MAX_STARTUP_FAILURES:
            raise BackendError(
                f"op-suite worker processes {how} before taking a case ({self._startup_failures} in a row); "
                f"end of the worker log: {tail or '(empty)'}"
            )

    def close(self) -> None:
        """Stop every worker and remove the temporary directory."""
        for worker in self._workers:
            worker.stop()
        self._workers.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def run_tasks(
    tasks: Sequence[Task],
    cases: Sequence[OpCase],
    jobs: int,
    timeout: float = DEFAULT_TIMEOUT,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run tasks in ``jobs`` worker processes, or in this process when ``jobs`` is 0.

    In this process there is no crash isolation and no timeout (useful for debugging and for
    backends registered in-process). Either way each op case's result has its backend's expected
    failures applied (:func:`settle_expected`).
    """
    if jobs == 0:
        by_name = {case.name: case for case in cases}
        results = []
        for task in tasks:
            results.append(settle_expected(run_task(task, by_name)))
            if on_result is not None:
                on_result(results[-1])
        return results
    with WorkerPool(cases, jobs, timeout) as pool:
        return pool.run(tasks, on_result)


def op_tasks(cases: Sequence[OpCase], backend_names: Sequence[str], strict: bool = False) -> list[Task]:
    """One task per (case, backend), case-major, so every backend advances together.

    With ``strict`` every case is judged by its own tolerance (no :data:`TOLERANCE_OVERRIDES`).
    """
    return [Task("op", name, case.name, strict) for case in cases for name in backend_names]


# ---------------------------------------------------------------------------------------------
# Summaries


@dataclass
class BackendSummary:
    """Counts of one backend's results, and its pass rates over two denominators.

    ``total`` is every case run; ``supported`` leaves out the cases the backend's runtime said it
    cannot run (status unsupported). A case passed when its status is passed or unexpected pass.
    Timeouts, errors, failures and expected failures count against both rates.
    """

    backend: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    overridden: int = 0  # cases that passed only because of a tolerance override

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def supported(self) -> int:
        return self.total - self.counts[UNSUPPORTED]

    @property
    def passed(self) -> int:
        return self.counts[PASSED] + self.counts[UNEXPECTED_PASS]

    @property
    def pass_rate_supported(self) -> float:
        """Passed over the cases the runtime did not call unsupported (NaN when there are none)."""
        return self.passed / self.supported if self.supported else float("nan")

    @property
    def pass_rate_all(self) -> float:
        """Passed over every case: unsupported ones count against it."""
        return self.passed / self.total if self.total else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            **{str(status): count for status, count in self.counts.items()},
            "total": self.total,
            "supported": self.supported,
            "passed_with_tolerance_override": self.overridden,
            "pass_rate_supported": self.pass_rate_supported,
            "pass_rate_all": self.pass_rate_all,
        }


def summarize(results: Iterable[CaseResult], backend_names: Sequence[str]) -> dict[str, BackendSummary]:
    """One summary per backend, in the order of ``backend_names``."""
    summaries = {name: BackendSummary(name) for name in backend_names}
    for outcome in results:
        summary = summaries[outcome.backend]
        summary.counts[outcome.status] += 1
        summary.overridden += outcome.tolerance_override is not None
    return summaries


def op_matrix(results: Iterable[CaseResult]) -> dict[str, dict[str, Counter[str]]]:
    """``{op: {backend: Counter(status)}}``, ops sorted by name."""
    matrix: dict[str, dict[str, Counter[str]]] = {}
    for outcome in results:
        matrix.setdefault(outcome.op, {}).setdefault(outcome.backend, Counter())[outcome.status] += 1
    return dict(sorted(matrix.items(), key=lambda item: item[0].lower()))


def placement_totals(results: Iterable[CaseResult], backend: str) -> dict[str, tuple[int, int]]:
    """Where ``backend`` ran the nodes of the cases it compiled: place -> (nodes, cases with a node there)."""
    totals: dict[str, tuple[int, int]] = {}
    for outcome in results:
        if outcome.backend != backend:
            continue
        for place, count in outcome.placement.items():
            nodes, cases = totals.get(place, (0, 0))
            totals[place] = (nodes + count, cases + (count > 0))
    return totals


def report_dict(results: Sequence[CaseResult], backend_names: Sequence[str], command: str = "") -> dict[str, Any]:
    """The JSON report: versions, the command, one summary per backend, one entry per result."""
    import platform

    import onnxruntime

    return {
        "format": "portable-moe-opsuite/2",
        "denominators": {
            "pass_rate_all": "passed (or unexpected pass) over every case run",
            "pass_rate_supported": "passed (or unexpected pass) over the cases whose runtime did not say unsupported",
        },
        "command": command,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "tolerance_overrides": [asdict(override) for override in TOLERANCE_OVERRIDES],
        "default_excludes": [asdict(exclusion) for exclusion in DEFAULT_EXCLUDES],
        "expected_failures": {
            name: {case: {"category": str(entry.category), "reason": entry.reason} for case, entry in listed.items()}
            for name in backend_names
            for listed in [expected_failures_of(name)]
        },
        "backends": {
            name: {**summary.to_dict(), "placement": placement_totals(results, name)}
            for name, summary in summarize(results, backend_names).items()
        },
        "results": [outcome.to_dict() for outcome in results],
    }


# ---------------------------------------------------------------------------------------------
# The command line: ``portable-moe conformance ops``


def resolve_backends(spec: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Backend names to run and ``(name, reason)`` for those left out.

    ``all`` means every available backend (unavailable ones are left out with their reason);
    otherwise every named backend must be available.

    Raises:
        BackendError: for an unknown name or a malformed list.
        BackendUnavailableError: if a named backend cannot run here.
    """
    from portable_moe import registry

    names = registry.backend_names() if spec == "all" else registry.parse_backend_list(spec)
    chosen, left_out = [], []
    for name in names:
        probe = get_backend(name).safe_probe()
        if probe.available:
            chosen.append(name)
        elif spec == "all":
            left_out.append((name, probe.reason))
        else:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {probe.reason}")
    if not chosen:
        raise BackendUnavailableError(f"no backend in {spec!r} is available")
    return chosen, left_out


def _percent(value: float) -> str:
    return "-" if value != value else f"{value:.1%}"


# One letter per status in the op x backend matrix, after passed/total.
_LETTERS = (
    ("f", FAILED),
    ("e", ERROR),
    ("t", TIMEOUT),
    ("u", UNSUPPORTED),
    ("x", EXPECTED_FAILURE),
    ("X", UNEXPECTED_PASS),
)


def _cell(counts: Counter[str]) -> str:
    total = sum(counts.values())
    bad = any(counts[status] for status in NOT_CONFORMING)
    colour = "green" if counts[PASSED] == total else ("red" if bad else "yellow")
    extra = " ".join(f"{letter}{counts[s]}" for letter, s in _LETTERS if counts[s])
    return f"[{colour}]{counts[PASSED]}/{total}[/{colour}]" + (f" {extra}" if extra else "")


def print_report(
    console: Any,
    results: Sequence[CaseResult],
    backend_names: Sequence[str],
    full_matrix: bool,
    shown_failures: int = 10,
) -> None:
    """Print the per-backend summary, the op x backend matrix and the first failures of each backend."""
    from rich.markup import escape
    from rich.table import Table

    summary = Table(title=f"ONNX node test cases (onnx {onnx.__version__})")
    summary.add_column("backend")
    for status in STATUSES:
        summary.add_column(str(status).replace("-", " "), justify="right")
    for column in ("total", "pass rate (all)", "pass rate (supported)"):
        summary.add_column(column, justify="right")
    summaries = summarize(results, backend_names)
    for name, item in summaries.items():
        summary.add_row(
            name,
            *(str(item.counts[status]) for status in STATUSES),
            str(item.total),
            _percent(item.pass_rate_all),
            _percent(item.pass_rate_supported),
        )
    console.print(summary)
    console.print(
        "pass rate (all): passed over every case; (supported): passed over the cases the runtime did not "
        "call unsupported"
    )
    for name, item in summaries.items():
        if item.overridden:
            console.print(
                f"{name}: {item.overridden} case(s) passed only because of a tolerance override (their raw errors "
                "are in the JSON and HTML reports; --strict uses the cases' own tolerances)"
            )
    for name in backend_names:
        totals = placement_totals(results, name)
        if len(totals) > 1:  # one place says nothing; several show what ran where (e.g. host fallback)
            places = ", ".join(
                f"{escape(place)} {nodes} nodes in {cases} cases" for place, (nodes, cases) in totals.items()
            )
            console.print(f"{name} placement: {places}")

    matrix = op_matrix(results)
    rows = [
        (op, cells)
        for op, cells in matrix.items()
        if full_matrix or any(counts[PASSED] != sum(counts.values()) for counts in cells.values())
    ]
    table = Table(title="op x backend: passed/total")
    table.add_column("op")
    for name in backend_names:
        table.add_column(name)
    for op, cells in rows:
        table.add_row(escape(op), *(_cell(cells[name]) if name in cells else "-" for name in backend_names))
    if rows:
        console.print(table)
        shown = "every op" if full_matrix else "ops with a case not passed (--matrix shows every op)"
        legend = ", ".join(f"{letter} {status}" for letter, status in _LETTERS)
        console.print(f"{shown}; {legend}")
    else:
        console.print(f"every case passed on every backend ({len(matrix)} ops)")

    for name in backend_names:
        bad = [r for r in results if r.backend == name and r.status in NOT_CONFORMING]
        if not bad:
            continue
        console.print(
            f"[bold]{name}[/bold]: {len(bad)} failed, errored, timed out or passed unexpectedly; "
            f"first {min(len(bad), shown_failures)}:"
        )
        for outcome in bad[:shown_failures]:
            reason = outcome.reason if len(outcome.reason) <= 200 else outcome.reason[:197] + "..."
            console.print(f"  {outcome.status:<6} {escape(outcome.case)}: {escape(reason)}", soft_wrap=True)


def run_with_progress(
    tasks: Sequence[Task], cases: Sequence[OpCase], jobs: int, timeout: float, console: Any
) -> list[CaseResult]:
    """:func:`run_tasks` with a progress bar per backend on ``console`` (a rich Console)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    totals = Counter(task.backend for task in tasks)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bars = {name: progress.add_task(f"{name:<12}", total=total) for name, total in totals.items()}
        return run_tasks(tasks, cases, jobs, timeout, on_result=lambda outcome: progress.advance(bars[outcome.backend]))


def command_ops(args: Any) -> int:
    """``portable-moe conformance ops``: exit 1 when a case failed, errored, timed out or passed unexpectedly."""
    import json
    import sys

    from rich.markup import escape

    from portable_moe.cli import EXIT_FAILED, EXIT_OK, stderr, stdout

    if args.cluster:
        from portable_moe.cluster.command import command_ops_on_cluster

        return command_ops_on_cluster(args)
    if args.jobs < 0:
        raise InputError(f"--jobs must be 0 (run in this process) or more, got {args.jobs}")
    names, left_out = resolve_backends(args.backend)
    for name, reason in left_out:
        stderr.print(f"[yellow]skipped {escape(name)}[/yellow]: {escape(reason)}")
    stderr.print(f"[dim]·[/dim] collecting the node test cases of onnx {onnx.__version__}")
    everything = collect_cases()
    cases = select_cases(everything, args.include or (), args.exclude or (), default_excludes=args.default_excludes)
    if args.default_excludes:
        unfiltered = len(select_cases(everything, args.include or (), args.exclude or (), default_excludes=False))
        if unfiltered > len(cases):
            stderr.print(
                f"[dim]·[/dim] {unfiltered - len(cases)} case(s) with random expected outputs left out "
                "(--no-default-excludes runs them)"
            )
    started, cpu_before = time.perf_counter(), cpu_seconds()
    results = run_with_progress(op_tasks(cases, names, args.strict), cases, args.jobs, args.timeout, stderr)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
    print_report(stdout, results, names, args.matrix)
    stdout.print(
        f"{len(cases)} cases x {len(names)} backends in {elapsed:.1f} s, {cpu:.0f} CPU-seconds ({args.jobs} jobs)"
        + ("; tolerances: the cases' own (--strict)" if args.strict else "")
    )
    command = " ".join(["portable-moe", *sys.argv[1:]]) if sys.argv else "portable-moe conformance ops"
    if args.json:
        Path(args.json).write_text(json.dumps(report_dict(results, names, command), indent=2, default=str))
        stderr.print(f"JSON report written to {escape(args.json)}")
    if args.junit:
        from portable_moe.junit import write_junit

        write_junit(results, args.junit)
        stderr.print(f"JUnit XML written to {escape(args.junit)}")
    if args.html:
        from portable_moe.report_html import write_opsuite_html

        write_opsuite_html(report_dict(results, names, command), args.html)
        stderr.print(f"HTML report written to {escape(args.html)}")
    return EXIT_FAILED if any(r.status in NOT_CONFORMING for r in results) else EXIT_OK


def cpu_seconds() -> float:
    """User plus system CPU time of this process and of its finished child processes (the workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def add_command(commands: Any) -> None:
    """Add ``conformance ops`` to the CLI."""
    conformance = commands.add_parser("conformance", help="conformance suites beyond one bundle (the ONNX op suite)")
    suites = conformance.add_subparsers(dest="suite", required=True, metavar="SUITE")
    ops = suites.add_parser(
        "ops",
        help="run onnx's node test cases on backends (exit 1 if any failed, errored or timed out)",
        description="Run the node test cases that ship inside onnx on each backend, through the same compile and "
        "run path users take. Each case ends passed, failed, error (exception or crash), timeout, unsupported "
        "(the runtime itself says it cannot run it, quoted), or, for a case in the backend's expected-failures "
        "file, expected-failure or unexpected-pass.",
    )
    ops.add_argument(
        "--backend",
        default="cpu,reference",
        help="backends, comma-separated, or 'all' for every available one (default: cpu,reference)",
    )
    ops.add_argument(
        "--include", action="append", metavar="REGEX", help="run only cases whose name matches (repeatable)"
    )
    ops.add_argument(
        "--exclude", action="append", metavar="REGEX", help="leave out cases whose name matches (repeatable)"
    )
    ops.add_argument("--json", metavar="FILE", help="write every result and the summaries as JSON")
    ops.add_argument("--junit", metavar="FILE", help="write JUnit XML (one testcase per case and backend)")
    ops.add_argument(
        "--html", metavar="FILE", help="write a self-contained HTML report (summaries, tolerance overrides used, cases)"
    )
    ops.add_argument(
        "--strict",
        action="store_true",
        help="judge every case by its own tolerance (the tolerance-override table is not used)",
    )
    ops.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"per case; a case that runs longer is reported as a timeout and its worker is replaced "
        f"(default: {DEFAULT_TIMEOUT:g})",
    )
    ops.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="worker processes; 0 runs in this process, without crash isolation or timeout (default: CPU count)",
    )
    ops.add_argument("--matrix", action="store_true", help="print every op in the op x backend matrix")
    ops.add_argument(
        "--no-default-excludes",
        dest="default_excludes",
        action="store_false",
        help="also run the cases left out by default (their expected outputs are random draws)",
    )
    from portable_moe.cluster.command import add_cluster_flag

    add_cluster_flag(ops)
    ops.set_defaults(handler=command_ops)
