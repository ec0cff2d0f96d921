"""The op-level conformance suite: the node test cases that ship inside ``onnx``, run on any backend.

Every case goes through the same path users take: ``get_backend(name).compile(model)`` and then
``run(feeds)``. Each (case, backend) pair ends in exactly one of :data:`STATUSES`:

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
  file (:mod:`portable_moe.conformance.expected_failures`) and did not pass / passed.

Unsupported is never counted as passed; failed, error, timeout and unexpected pass make the
command exit 1. Cases run in worker processes of the one worker pool (:mod:`portable_moe.run.pool`),
so a backend that segfaults or hangs loses that one case: the pool records it, starts a new worker
and goes on.

Models are compiled with ``nan_policy="pass"`` (onnx's cases feed NaN and Inf on purpose). Outputs
are compared in order (shape, dtype, then values; nan, +inf and -inf must match in kind; sequences
element by element, an absent optional must be absent) with the case's own rtol/atol unless one
of the backend's ``Capabilities.op_tolerance_overrides`` matches (``strict`` turns the overrides
off; :func:`declared_overrides` lists them). A case that
passed only because of an override records its raw error and the case's own tolerance in
``CaseResult.tolerance_override``. Cases whose expected output is a random draw are left out by
default (:data:`DEFAULT_EXCLUDES`).

The package: ``cases`` (collecting, selecting, the records), ``running`` (one case in this
process), ``workers`` (cases on the pool), ``summary`` (per backend and operator, the JSON report).
The command is :mod:`portable_moe.cli.ops_command`. Used by ``portable-moe conformance ops``, the pytest plugin (:mod:`portable_moe.testing.pytest_plugin`) and
``scripts/conformance_report.py``.
"""

from __future__ import annotations

from portable_moe.compare import ToleranceOverride
from portable_moe.conformance.ops.cases import (
    DEFAULT_EXCLUDES,
    DEFAULT_MODEL_TIMEOUT,
    DEFAULT_TIMEOUT,
    ERROR,
    EXPECTED_FAILURE,
    FAILED,
    MODEL_OP,
    NOT_CONFORMING,
    PASSED,
    STATUSES,
    TIMEOUT,
    UNEXPECTED_PASS,
    UNSUPPORTED,
    CaseResult,
    ErrorKind,
    Exclusion,
    ModelTask,
    OpCase,
    OpTask,
    Task,
    cache_file,
    collect_cases,
    select_cases,
)
from portable_moe.conformance.ops.running import (
    run_case,
    run_model_check,
    run_task,
    settle_expected,
    tolerance_for_case,
)
from portable_moe.conformance.ops.summary import (
    BackendSummary,
    cpu_seconds,
    declared_overrides,
    op_matrix,
    placement_totals,
    report_dict,
    summarize,
)
from portable_moe.conformance.ops.workers import OpPool, op_tasks, resolve_backends, run_tasks

__all__ = [
    "DEFAULT_EXCLUDES",
    "DEFAULT_MODEL_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "ERROR",
    "EXPECTED_FAILURE",
    "FAILED",
    "MODEL_OP",
    "NOT_CONFORMING",
    "PASSED",
    "STATUSES",
    "TIMEOUT",
    "UNEXPECTED_PASS",
    "UNSUPPORTED",
    "BackendSummary",
    "CaseResult",
    "ErrorKind",
    "Exclusion",
    "ModelTask",
    "OpCase",
    "OpPool",
    "OpTask",
    "Task",
    "ToleranceOverride",
    "cache_file",
    "cpu_seconds",
    "declared_overrides",
    "collect_cases",
    "op_matrix",
    "op_tasks",
    "placement_totals",
    "report_dict",
    "resolve_backends",
    "run_case",
    "run_model_check",
    "run_task",
    "run_tasks",
    "select_cases",
    "settle_expected",
    "summarize",
    "tolerance_for_case",
]
