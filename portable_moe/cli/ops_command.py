"""``portable-moe conformance ops``: onnx's node test cases on each backend, with a progress bar and a report."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from portable_moe.cli.ops_report import print_report
from portable_moe.conformance.ops.cases import (
    DEFAULT_TIMEOUT,
    NOT_CONFORMING,
    CaseResult,
    OpCase,
    Task,
    collect_cases,
    select_cases,
)
from portable_moe.conformance.ops.summary import cpu_seconds, report_dict
from portable_moe.conformance.ops.workers import op_tasks, resolve_backends, run_tasks
from portable_moe.errors import (
    InputError,
)


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

    from portable_moe.cli.console import EXIT_FAILED, EXIT_OK, stderr, stdout

    if args.cluster:
        from portable_moe.cli.cluster_commands import command_ops_on_cluster

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
        from portable_moe.conformance.junit import write_junit

        write_junit(results, args.junit)
        stderr.print(f"JUnit XML written to {escape(args.junit)}")
    if args.html:
        from portable_moe.conformance.report_html import write_opsuite_html

        write_opsuite_html(report_dict(results, names, command), args.html)
        stderr.print(f"HTML report written to {escape(args.html)}")
    return EXIT_FAILED if any(r.status in NOT_CONFORMING for r in results) else EXIT_OK


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
        help="judge every case by its own tolerance (no tolerance override a backend declares is used)",
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
    from portable_moe.cli.cluster_commands import add_cluster_flag

    add_cluster_flag(ops)
    ops.set_defaults(handler=command_ops)
