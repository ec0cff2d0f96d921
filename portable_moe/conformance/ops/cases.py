"""The op suite's cases: onnx's node test cases collected (and cached), selected, and the records of a run.

What a case, a result and a task are; the statuses and reason codes a case can end with; the default
exclusions, each with its reason. Tolerance overrides are declared by the backends that need them
(``Capabilities.op_tolerance_overrides``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from portable_moe._compat import StrEnum
from portable_moe.errors import (
    InputError,
)
from portable_moe.statuses import Status


class ErrorKind(StrEnum):
    """Where an error or failure happened (``CaseResult.code`` for those statuses)."""

    BAD_CASE = "bad-case"  # the case's own model or data could not be read
    COMPILE = "compile"
    RUN = "run"
    CRASH = "crash"  # the worker process died
    TIMEOUT = "timeout"
    MISMATCH = "mismatch"  # an output differs from the expected one


# How a (case, backend) pair ends: these members of the one Status enum (their values are what JSON,
# JUnit and the CLI show).
PASSED, FAILED, ERROR, TIMEOUT = Status.PASSED, Status.FAILED, Status.ERROR, Status.TIMEOUT
UNSUPPORTED, EXPECTED_FAILURE, UNEXPECTED_PASS = (
    Status.UNSUPPORTED,
    Status.EXPECTED_FAILURE,
    Status.UNEXPECTED_PASS,
)
STATUSES = (PASSED, FAILED, ERROR, TIMEOUT, UNSUPPORTED, EXPECTED_FAILURE, UNEXPECTED_PASS)
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
        op: the operator the case tests (:data:`MODEL_OP` for model checks).
        backend: the backend's registry name.
        status: one of :data:`STATUSES` (members of :class:`~portable_moe.statuses.Status`).
        reason: why it did not pass (empty when it passed); the runtime's own words when it said so.
        seconds: compile plus run time (the limit for a case that timed out).
        worst: the failing output's comparison (``OutputComparison.to_dict()``) when failed on values.
        placement: where the compiled model's nodes ran (``CompiledModel.placement()``), when it compiled.
        details: for model checks, the largest errors and the routing agreement; for a timeout,
            ``time_limit_s``.
        code: the reason as a code: an :class:`~portable_moe.errors.UnsupportedReason` when
            unsupported, an :class:`ErrorKind` when failed, errored or timed out, the
            :class:`~portable_moe.conformance.expected_failures.FailureCategory` when expected to fail.
        tolerance_override: for a case that passed only because of one of its backend's
            ``Capabilities.op_tolerance_overrides``: that tolerance and its reason, the case's own
            tolerance, and the raw error of the first output outside the case's own tolerance.
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


# The ``op`` of a model check's result (a bundle tests no single operator).
MODEL_OP = "(model)"


@dataclass(frozen=True)
class OpTask:
    """One op case on one backend, for a worker.

    Attributes:
        backend: the backend's registry name.
        case: the case's name (``OpCase.name``), looked up in the cases the worker loaded.
        strict: judge it by the case's own tolerance only (no tolerance overrides).
    """

    backend: str
    case: str
    strict: bool = False

    @property
    def name(self) -> str:
        """What its result is called (``CaseResult.case``): the case's name."""
        return self.case


@dataclass(frozen=True)
class ModelTask:
    """A bundle checked against its golden data on one backend, for a worker.

    Attributes:
        backend: the backend's registry name.
        bundle: the bundle's directory (a path string, so the task pickles to any worker).
    """

    backend: str
    bundle: str

    @property
    def name(self) -> str:
        """What its result is called (``CaseResult.case``): the bundle directory's name."""
        return Path(self.bundle).name


# A unit of work for a worker of the op suite's pool.
Task = OpTask | ModelTask


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
