"""The one vocabulary of outcomes: every status a check, an op case, a run attempt or a worker task has.

Members are strings (``Status.PASSED == "passed"``), so reports, JSON and JUnit print the same
words as before; code compares members, never searches the words. Why something was not run is
a reason code beside the status (``portable_moe.errors.UnsupportedReason``), not part of it.
"""

from __future__ import annotations

from portable_moe._compat import StrEnum


class Status(StrEnum):
    """An outcome."""

    # A bundle checked on a backend, or an op case run on one.
    PASSED = "passed"
    FAILED = "failed"  # it ran and its outputs differ (or, for a run attempt, the backend raised)
    ERROR = "error"  # it could not be compiled or run
    UNAVAILABLE = "unavailable"  # the backend cannot run on this machine
    SKIPPED = "skipped"  # the backend does not take this bundle (its lowering, opset or domains)
    UNSUPPORTED = "unsupported"  # the runtime says it cannot run this model
    TIMEOUT = "timeout"  # an op case that ran past its time limit (its worker was replaced)
    EXPECTED_FAILURE = "expected-failure"  # an op case listed in the backend's expected failures, failing
    UNEXPECTED_PASS = "unexpected-pass"  # a listed op case that passed: the list is stale
    # One backend tried in a run (fallback, isolated runs).
    RAN = "ran"
    COMPILED = "compiled"
    COMPILE_FAILED = "compile-failed"
    RUN_FAILED = "run-failed"
    CRASHED = "crashed"  # its process died
    TIMED_OUT = "timed-out"  # its process was killed at the deadline
    RAISED = "raised"  # a worker's task function raised instead of returning an outcome


__all__ = ["Status"]
