"""Write docs/conformance.md: the ONNX op suite and model conformance on every available backend.

    python scripts/conformance_report.py                  # every available backend, every runnable preset
    python scripts/conformance_report.py --presets tiny   # fewer exports (each takes ~20 s)

Model conformance exports each preset that is not for cost estimates only with each backend's
preferred MoE lowering (needs torch; without it the section says so) and checks it against its
golden data. Both suites run in worker processes (see portable_moe.conformance.ops).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from rich.console import Console

from portable_moe import registry
from portable_moe.cli import ops_command
from portable_moe.config import PRESETS
from portable_moe.conformance import ops as opsuite
from portable_moe.conformance.expected_failures import expected_failures_of
from portable_moe.conformance.ops import NOT_CONFORMING, STATUSES, UNSUPPORTED, CaseResult, ModelTask

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True, highlight=False)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _percent(value: float) -> str:
    return "-" if value != value else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2e}"


def export_bundles(
    presets: Sequence[str], lowerings: Sequence[str], directory: Path
) -> tuple[dict[tuple[str, str], Path], dict[tuple[str, str], str], str]:
    """Export every (preset, lowering); return the bundles, the export errors, and why nothing was exported."""
    try:
        import torch  # noqa: F401 (only whether it imports matters)
    except ImportError as error:
        return {}, {}, f"torch is not installed ({error}); install portable-moe[export] to run model conformance"
    from exporters import export_bundle

    bundles, errors = {}, {}
    for preset in presets:
        for lowering in lowerings:
            console.print(f"· exporting {preset} with the {lowering} lowering")
            try:
                bundles[(preset, lowering)] = export_bundle(
                    directory / f"{preset}-{lowering}", preset, 0, moe_lowering=lowering
                ).path
            except Exception as error:
                errors[(preset, lowering)] = f"export failed: {type(error).__name__}: {error}"
    return bundles, errors, ""


def model_conformance(
    backends: Sequence[str], presets: Sequence[str], jobs: int, timeout: float, directory: Path
) -> tuple[list[tuple[str, str, str, CaseResult | None, str]], str]:
    """Rows (preset, lowering, backend, result or None, note) and a note for the whole section."""
    from exporters import LOWERINGS

    preferred = {name: registry.resolve_lowering("auto", name) for name in backends}
    wanted = sorted({lowering for lowering in preferred.values() if lowering in LOWERINGS})
    bundles, export_errors, missing = export_bundles(presets, wanted, directory)
    if missing:
        return [], missing
    tasks, keys = [], []
    for preset in presets:
        for backend in backends:
            key = (preset, preferred[backend])
            if key in bundles:
                tasks.append(ModelTask(backend, str(bundles[key])))
                keys.append((preset, preferred[backend], backend))
    results = iter(ops_command.run_with_progress(tasks, [], jobs, timeout, console))
    by_key = {key: next(results) for key in keys}
    rows = []
    for preset in presets:
        for backend in backends:
            lowering = preferred[backend]
            if lowering not in LOWERINGS:
                rows.append((preset, lowering, backend, None, f"the exporter has no {lowering!r} lowering"))
            elif (preset, lowering) in export_errors:
                rows.append((preset, lowering, backend, None, export_errors[(preset, lowering)]))
            else:
                rows.append((preset, lowering, backend, by_key[(preset, lowering, backend)], ""))
    return rows, ""


def render(
    command: str,
    names: Sequence[str],
    skipped: Sequence[tuple[str, str]],
    cases: Sequence[opsuite.OpCase],
    left_out: int,
    results: Sequence[CaseResult],
    op_seconds: float,
    op_cpu_seconds: float,
    jobs: int,
    model_rows: Sequence[tuple[str, str, str, CaseResult | None, str]],
    model_note: str,
) -> str:
    """The Markdown document."""
    import onnx

    lines = [
        "# Conformance report",
        "",
        "Generated by `scripts/conformance_report.py`; do not edit by hand. Regenerate with:",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
        f"- generated: {datetime.date.today().isoformat()}",
        f"- {platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}",
        "- " + ", ".join(f"{name} {_version(name)}" for name in ("numpy", "onnx", "onnxruntime", "torch", "openvino")),
        "",
        "## Running the suites yourself",
        "",
        "- `portable-moe conformance ops --backend cpu,reference` runs the op suite (`--include/--exclude REGEX`, "
        "`--json FILE`, `--junit FILE`, `--html FILE`, `--strict`, `--timeout SECONDS`, `--jobs N`, `--matrix`); "
        "exit 1 if a case failed, errored, timed out or passed unexpectedly.",
        "- `python scripts/ort_crosscheck.py` compares the `cpu` counts with a plain loop over raw ONNX Runtime "
        "and prints both.",
        "- `pytest --portable-moe-backend=NAME` (the plugin installed with portable-moe) turns every op case and "
        "every preset's model check into a test; unsupported cases are skips with the reason "
        "(`--portable-moe-include REGEX`, `--portable-moe-presets tiny|all|none`).",
        "- `portable-moe check BUNDLE --backend NAME` checks one bundle against its golden data.",
        "",
        "## Backends",
        "",
        "| backend | available | description |",
        "|---|---|---|",
    ]
    for status in registry.list_backends():
        description = status.description + (" (simulated)" if status.simulated else "")
        state = "yes" if status.available else f"no: {status.reason}"
        lines.append(f"| {status.name} | {_cell(_short(state, 200))} | {_cell(description)} |")

    summaries = opsuite.summarize(results, names)
    lines += [
        "",
        f"## ONNX op suite (onnx {onnx.__version__}: {len(cases)} node test cases)",
        "",
        "Each case runs through `get_backend(name).compile(model).run(feeds)`, the path users take, and ends in "
        "one status:",
        "",
        "- *passed*, *failed* (an output differs), *error* (an exception or a crash), *timeout* (past the "
        "per-case limit, given in the reason);",
        "- *unsupported*: the runtime itself said it cannot run the case. cpu, openvino and reference are compiled "
        "and run on every case, and a case is unsupported only when the runtime answers so: a code "
        "(`no-kernel`, `unknown-operator`, `dtype-not-carried`) decided from the exception's class or the "
        "runtime's own registry, never from its words, which the reason quotes. npu-sim is a simulation: its "
        "declared operator table and dtypes decide (`declared`);",
        "- *expected failure* / *unexpected pass*: the case is in the backend's expected-failures file "
        "(`backends/*_expected_failures.toml`, listed below with the reasons) and did not pass / passed.",
        "",
        "**Denominators.** *pass rate (all)* is passed (including unexpected passes) over every case; "
        "*pass rate (supported)* is passed over the cases whose runtime did not say unsupported. Expected "
        "failures, timeouts, errors and failures count against both. "
        f"{left_out} cases whose expected outputs are random draws are left out (see below). "
        f"The whole suite took {op_seconds:.0f} s of wall time and {op_cpu_seconds:.0f} CPU-seconds with {jobs} "
        "worker processes on a machine shared with other work.",
        "",
        "| backend | " + " | ".join(str(status) for status in STATUSES) + " | total | pass rate (all) | "
        "pass rate (supported) | worker time |",
        "|---|" + "---:|" * (len(STATUSES) + 4),
    ]
    for name, summary in summaries.items():
        seconds = sum(r.seconds for r in results if r.backend == name)
        lines.append(
            f"| {name} | "
            + " | ".join(str(summary.counts[status]) for status in STATUSES)
            + f" | {summary.total} | {_percent(summary.pass_rate_all)} | {_percent(summary.pass_rate_supported)} | "
            f"{seconds:.0f} s |"
        )
    for name, reason in skipped:
        lines.append(f"| {name} | unavailable: {_cell(_short(reason, 120))} |" + " |" * (len(STATUSES) + 3))
    placements = [(name, opsuite.placement_totals(results, name)) for name in names]
    placements = [(name, totals) for name, totals in placements if len(totals) > 1]
    if placements:
        lines += ["", "Where the nodes of the compiled cases ran:", ""]
        for name, totals in placements:
            shown = ", ".join(f"{place}: {nodes} nodes in {count} cases" for place, (nodes, count) in totals.items())
            lines.append(f"- {name}: {shown}")

    codes = {name: Counter(r.code for r in results if r.backend == name and r.status == UNSUPPORTED) for name in names}
    all_codes = sorted({code for counter in codes.values() for code in counter})
    lines += [
        "",
        "### Unsupported cases, by the runtime's answer",
        "",
        "| code | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    lines += [f"| {code} | " + " | ".join(str(codes[name][code]) for name in names) + " |" for code in all_codes]
    for name in names:
        examples: dict[str, CaseResult] = {}
        for outcome in results:
            if outcome.backend == name and outcome.status == UNSUPPORTED:
                examples.setdefault(outcome.code, outcome)
        if examples:
            lines += ["", f"In {name}'s words (one case per code):", ""]
            lines += [f"- `{code}` {r.case}: {_cell(_short(r.reason, 300))}" for code, r in examples.items()]

    overridden = [r for r in results if r.tolerance_override]
    lines += [
        "",
        f"### Passed only because of a tolerance override ({len(overridden)})",
        "",
        "Each of these would fail with the case's own tolerance (`--strict` judges them so); the raw error is shown.",
        "",
        "| backend | case | output | max abs error | max rel error | case's rtol / atol | override rtol / atol |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for r in overridden:
        owed = r.tolerance_override
        lines.append(
            f"| {r.backend} | {r.case} | {_cell(owed['output'])} | {owed['max_abs_error']:.3g} | "
            f"{owed['max_rel_error']:.3g} | {owed['case_rtol']:g} / {owed['case_atol']:g} | "
            f"{owed['rtol']:g} / {owed['atol']:g} |"
        )

    lines += ["", "### Expected failures", ""]
    for name in names:
        listed = expected_failures_of(name)
        outcomes = {r.case: r for r in results if r.backend == name}
        lines.append(f"**{name}**: {len(listed) or 'none listed'}")
        if listed:
            lines += ["", "| case | category | reason | this run |", "|---|---|---|---|"]
            for case, entry in listed.items():
                outcome = outcomes.get(case)
                seen = "not run" if outcome is None else (outcome.listed_outcome or outcome.status)
                lines.append(f"| {case} | {entry.category} | {_cell(entry.reason)} | {seen} |")
        lines.append("")

    lines += ["### Failed, errored, timed out and unexpectedly passed cases", ""]
    for name in names:
        bad = [r for r in results if r.backend == name and r.status in NOT_CONFORMING]
        lines.append(f"**{name}**: {len(bad) or 'none'}")
        if bad:
            lines += ["", "| case | op | status | reason |", "|---|---|---|---|"]
            lines += [f"| {r.case} | {_cell(r.op)} | {r.status} | {_cell(_short(r.reason))} |" for r in bad]
        lines.append("")

    lines += [
        "### Tolerance overrides",
        "",
        "Every case uses its own tolerance (onnx's node cases: rtol 1e-3, atol 1e-7) unless an entry its backend "
        "declares here matches (first match wins; `Capabilities.op_tolerance_overrides`).",
        "",
        "| backend | precision | cases | rtol | atol | reason |",
        "|---|---|---|---|---|---|",
    ]
    for backend, override in opsuite.declared_overrides(names):
        lines.append(
            f"| {backend} | {override.precision} | `{_cell(override.case_pattern) or '(all)'}` | "
            f"{override.rtol:g} | {override.atol:g} | {_cell(override.reason)} |"
        )
    lines += ["", "### Cases left out by default", "", "| cases | reason |", "|---|---|"]
    lines += [f"| `{_cell(e.case_pattern)}` | {_cell(e.reason)} |" for e in opsuite.DEFAULT_EXCLUDES]

    lines += [
        "",
        "## Model conformance",
        "",
        "Each preset (those for cost estimates only excepted) exported with seed 0 and the backend's preferred "
        "MoE lowering, run on the backend and compared with the bundle's golden data from the torch reference "
        "(`portable-moe check`). Errors are the largest over the outputs; routing agreement is the fraction of "
        "tokens routed to the same experts.",
        "",
    ]
    if model_note:
        lines.append(f"Not run: {model_note}.")
    else:
        lines += [
            "| preset | lowering | backend | result | max abs error | max rel error | routing agreement | note |",
            "|---|---|---|---|---:|---:|---:|---|",
        ]
        for preset, lowering, backend, outcome, note in model_rows:
            if outcome is None:
                lines.append(f"| {preset} | {lowering} | {backend} | not run | - | - | - | {_cell(_short(note))} |")
                continue
            details = outcome.details
            agreement = details.get("routing_agreement")
            lines.append(
                f"| {preset} | {lowering} | {backend} | {outcome.status} | {_number(details.get('max_abs_error'))} | "
                f"{_number(details.get('max_rel_error'))} | {'-' if agreement is None else f'{agreement:.2%}'} | "
                f"{_cell(_short(outcome.reason))} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    runnable = [name for name, config in PRESETS.items() if not config.cost_estimate_only]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "docs" / "conformance.md"), help="where to write the report")
    parser.add_argument("--presets", default=",".join(runnable), help="presets for model conformance, or 'none'")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--timeout", type=float, default=opsuite.DEFAULT_TIMEOUT, help="seconds per op case")
    parser.add_argument(
        "--model-timeout", type=float, default=opsuite.DEFAULT_MODEL_TIMEOUT, help="seconds per model check"
    )
    args = parser.parse_args(argv)
    presets = [] if args.presets == "none" else [name.strip() for name in args.presets.split(",")]
    unknown = sorted(set(presets) - set(runnable))
    if unknown:
        parser.error(f"unknown or cost-only preset(s) {', '.join(unknown)}; choose from {', '.join(runnable)}")

    names, skipped = opsuite.resolve_backends("all")
    everything = opsuite.collect_cases()
    cases = opsuite.select_cases(everything)
    console.print(f"· op suite: {len(cases)} cases on {', '.join(names)}")
    started, cpu_before = time.perf_counter(), opsuite.cpu_seconds()
    results = ops_command.run_with_progress(opsuite.op_tasks(cases, names), cases, args.jobs, args.timeout, console)
    op_seconds, op_cpu_seconds = time.perf_counter() - started, opsuite.cpu_seconds() - cpu_before
    with tempfile.TemporaryDirectory(prefix="portable-moe-report-") as scratch:
        model_rows, model_note = (
            model_conformance(names, presets, args.jobs, args.model_timeout, Path(scratch))
            if presets
            else ([], "no presets were asked for (--presets none)")
        )
    command = " ".join(["python scripts/conformance_report.py", *(argv if argv is not None else sys.argv[1:])])
    text = render(
        command,
        names,
        skipped,
        cases,
        len(everything) - len(cases),
        results,
        op_seconds,
        op_cpu_seconds,
        args.jobs,
        model_rows,
        model_note,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    console.print(
        f"· op suite took {op_seconds:.1f} s, {op_cpu_seconds:.0f} CPU-seconds; report written to {args.output}"
    )
    return 0


if __name__ == "__main__":  # worker processes are spawned: the guard keeps them from running this again
    sys.exit(main())
