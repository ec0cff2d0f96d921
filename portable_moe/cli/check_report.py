"""Printing and writing a model check's results: the conformance table, JSON, JUnit XML, HTML, the exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from portable_moe.bundle import Bundle
from portable_moe.cli.console import EXIT_FAILED, EXIT_OK, Notes, format_error, print_result, stderr
from portable_moe.conformance.model_check import (
    GOLDEN,
    NOT_CHECKED,
    PASSED,
    SKIPPED,
    BackendResult,
    junit_cases,
    report_dict,
)


def print_results(bundle: Bundle, results: list[BackendResult], expected_from: str = "") -> None:
    table = Table(
        title=f"Conformance of {bundle.name} ({bundle.manifest.get('preset', '?')}, "
        f"{bundle.moe_lowering or '?'} lowering) against {expected_from or 'its golden data'}"
    )
    table.caption = "abs err: largest |error|; rel err: largest |error| / largest |expected value| of the output"
    table.caption_justify = "left"
    for column in ("backend", "result", "abs err", "rel err", "cosine", "routing", "note"):
        table.add_column(column, no_wrap=True)
    notes = Notes()
    for result in results:
        colour = {"passed": "green", "failed": "red", "error": "red", "unavailable": "yellow", SKIPPED: "yellow"}
        cosines = [c.cosine for c in result.comparisons if c.kind == "values"]
        agreement = result.routing_agreement()
        bisection = result.bisection.summary(outputs_conform=result.passed) if result.bisection else ""
        table.add_row(
            result.backend,
            f"[{colour[result.status]}]{result.status}[/{colour[result.status]}]",
            format_error(result.worst("max_abs_error")),
            format_error(result.worst("max_scaled_error")),
            f"{min(cosines):.6f}" if cosines else "-",
            "-" if agreement != agreement else f"{agreement:.2%}",
            notes.add(
                *(f"{result.backend}: {note}" for note in (result.reason, result.routing_note(), bisection) if note)
            ),
        )
    print_result(table)
    notes.print()


def finish_check(
    bundle: Bundle,
    results: list[BackendResult],
    json_path: str | None,
    require_all: bool,
    *,
    expected_from: str = GOLDEN,
    junit_path: str | None = None,
    html_path: str | None = None,
    generation: list[Any] | None = None,
) -> int:
    """Print the check's table, write the reports asked for, and return the exit code."""
    print_results(bundle, results, expected_from)
    report = report_dict(bundle, results, expected_from)
    cases = junit_cases(results)
    if generation is not None:
        from portable_moe.cli.generate_command import print_generation_checks
        from portable_moe.conformance.generation_check import generation_junit_cases

        print_generation_checks(generation)
        report["generation"] = [check.to_dict() for check in generation]
        cases += generation_junit_cases(generation)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, default=float))
        stderr.print(f"report written to {escape(json_path)}")
    if junit_path:
        from portable_moe.conformance.junit import write_junit

        write_junit(cases, junit_path, suite_name=f"portable-moe check {bundle.name}")  # type: ignore[arg-type]
        stderr.print(f"JUnit XML written to {escape(junit_path)}")
    if html_path:
        from portable_moe.conformance.report_html import write_html

        write_html(report, html_path)
        stderr.print(f"HTML report written to {escape(html_path)}")
    # Naming backends requires each to pass; "all" means every backend that can run here and takes the bundle.
    considered = [(r, r.backend) for r in results] + [(r, f"{r.backend} generation") for r in generation or []]
    if not require_all:
        considered = [(r, label) for r, label in considered if r.status not in NOT_CHECKED]
    if not considered:
        stderr.print("[red]no backend could be checked[/red]")
        return EXIT_FAILED
    if all(r.status == PASSED for r, _ in considered):
        return EXIT_OK
    not_passed = ", ".join(f"{label} ({r.status})" for r, label in considered if r.status != PASSED)
    stderr.print(f"[red]not conforming:[/red] {not_passed}")
    return EXIT_FAILED
