"""Summaries of an op-suite run: per backend, per operator, the JSON report."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from portable_moe import registry
from portable_moe.compare import ToleranceOverride
from portable_moe.conformance.expected_failures import expected_failures_of
from portable_moe.conformance.ops.cases import (
    DEFAULT_EXCLUDES,
    PASSED,
    STATUSES,
    UNEXPECTED_PASS,
    UNSUPPORTED,
    CaseResult,
)


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


def declared_overrides(backend_names: Sequence[str]) -> list[tuple[str, ToleranceOverride]]:
    """``(backend, override)`` for every op-case tolerance override the named backends declare, in order.

    Raises:
        BackendError: for a name no backend is registered under.
    """
    return [
        (name, override)
        for name in backend_names
        for override in registry.get_backend(name).capabilities.op_tolerance_overrides
    ]


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
        "tolerance_overrides": [
            {"backend": name, **asdict(override)} for name, override in declared_overrides(backend_names)
        ],
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


def cpu_seconds() -> float:
    """User plus system CPU time of this process and of its finished child processes (the workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system
