"""The op suite's terminal report: per backend, the op x backend matrix, the notes below it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import onnx

from portable_moe.conformance.ops.cases import (
    ERROR,
    EXPECTED_FAILURE,
    FAILED,
    NOT_CONFORMING,
    PASSED,
    STATUSES,
    TIMEOUT,
    UNEXPECTED_PASS,
    UNSUPPORTED,
    CaseResult,
)
from portable_moe.conformance.ops.summary import op_matrix, placement_totals, summarize


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
