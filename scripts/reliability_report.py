"""Generate docs/reliability.md by running every hardening check, then switching each protection off.

    python scripts/reliability_report.py                      # tests, fuzz (3000 cases), sabotage runs
    python scripts/reliability_report.py --fuzz-count 300 --fuzz-bundle build/tiny --fuzz-bundle-count 500
    python scripts/reliability_report.py --no-sabotage        # skip the "would the tests notice" runs

Nothing in the page is typed by hand: each row is a test of tests/portable_moe/test_hardening_*.py
as it ran (with its outcome, or its skip reason), the fuzz numbers come from
scripts/fuzz_bundles.py, and the last section reruns the tests with one protection at a time
replaced by a version that does not protect, to show that some test then fails.

This module is also the pytest plugin that records the results (``-p reliability_report`` with
this directory on PYTHONPATH) and the code that applies a sabotage at interpreter start (from a
generated ``sitecustomize``, so that subprocesses such as the CLI are sabotaged too).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
TESTS = ROOT / "tests" / "portable_moe"
RESULTS_ENV = "PORTABLE_MOE_RELIABILITY_JSON"
SABOTAGE_ENV = "PORTABLE_MOE_SABOTAGE"

AREAS = {
    "test_hardening_bundles.py": (
        "Hostile bundles and models",
        "each must be refused with a BundleError naming the file",
    ),
    "test_hardening_inputs.py": ("Bad input at run time", "checked once, in the shared base, for every backend"),
    "test_hardening_devices.py": ("Failing devices and processes", "faults injected by fake and simulated backends"),
    "test_hardening_interrupts.py": ("Interruptions", "real signals sent to real processes"),
    "test_hardening_concurrency.py": ("Concurrency", "threads sharing a compiled model, processes racing to write"),
    "test_hardening_fuzz.py": ("Fuzzing in the test suite", "bounded and derandomized"),
}
MATRIX_TEST = "test_bad_input_on_every_backend"

# ---------------------------------------------------------------------------------------------
# The pytest plugin: records every test's docstring, parameters and outcome


_items: dict[str, dict[str, Any]] = {}


def _param_text(value: Any) -> str:
    for attribute in ("kind", "name"):
        if isinstance(getattr(value, attribute, None), str):
            return getattr(value, attribute)
    text = value.__name__ if callable(value) and hasattr(value, "__name__") else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def pytest_collection_finish(session: Any) -> None:
    if not os.environ.get(RESULTS_ENV):
        return
    for item in session.items:  # after -k and other deselection
        doc = (getattr(item, "function", None).__doc__ or "").strip().split("\n\n")[0]
        callspec = getattr(item, "callspec", None)
        params = {name: _param_text(value) for name, value in callspec.params.items()} if callspec else {}
        _items[item.nodeid] = {
            "nodeid": item.nodeid,
            "file": Path(str(item.fspath)).name,
            "function": item.originalname or item.name,
            "doc": " ".join(doc.split()),
            "params": params,
            "case": callspec.id if callspec else "",
            "outcome": "not run",
            "reason": "",
            "seconds": 0.0,
        }


def pytest_runtest_logreport(report: Any) -> None:
    record = _items.get(report.nodeid)
    if record is None:
        return
    record["seconds"] += report.duration
    if report.skipped:
        record["outcome"] = "skipped"
        record["reason"] = report.longrepr[2].removeprefix("Skipped: ") if isinstance(report.longrepr, tuple) else ""
    elif report.failed:
        record["outcome"] = "failed" if report.when == "call" else "error"
        record["reason"] = str(getattr(report.longrepr, "reprcrash", "") or "")[-300:]
    elif report.when == "call" and record["outcome"] == "not run":
        record["outcome"] = "passed"


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        Path(path).write_text(json.dumps(list(_items.values()), indent=1))


# ---------------------------------------------------------------------------------------------
# Sabotage: one protection at a time replaced by code that does not protect


def _naive_resolve(root: Path, relative: object, what: str, base: Path | None = None) -> Path:
    return Path(os.path.realpath((base or root) / str(relative)))


def _naive_scan(directory: Path) -> dict[str, int]:
    return {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in directory.rglob("*")
        if path.is_file() and path.relative_to(directory).as_posix() != "manifest.json"
    }


def _naive_move(staging: Path, target: Path, overwrite: bool) -> None:
    # What bundle_writer did before: move the old bundle aside and the new one in, no retry, no restore.
    import shutil

    if target.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
        os.replace(target, previous / "old")
        os.replace(staging, target)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, target)


def _first_backend_only(model: Any, names: list[str], options: Any, attempts: list[Any]) -> Any:
    from portable_moe import registry

    yield names[0], registry.get_backend(names[0]).compile(model, options.get(names[0]))


def _patch(module: str, attribute: str, replacement: Callable[..., Any]) -> Callable[[], None]:
    def apply() -> None:
        import importlib

        target = importlib.import_module(module)
        owner, _, name = attribute.rpartition(".")
        setattr(getattr(target, owner) if owner else target, name, replacement)

    return apply


@dataclass(frozen=True)
class Sabotage:
    """A protection, how it is switched off, and the tests that should notice."""

    protection: str
    how: str
    apply: Callable[[], None]
    tests: tuple[str, ...]


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


SABOTAGES = {
    "paths": Sabotage(
        "paths named by a bundle stay inside it (manifest files, model file, golden dirs, external data)",
        "safety.resolve_inside joins and resolves without any check",
        _patch("portable_moe.safety", "resolve_inside", _naive_resolve),
        ("test_hardening_bundles.py", "-k", "outside or symlink or escaping or cli"),
    ),
    "header": Sabotage(
        "the model is ONNX: graph present, IR version and opsets known, domains imported",
        "safety._check_header does nothing",
        _patch("portable_moe.safety", "_check_header", _nothing),
        ("test_hardening_bundles.py", "-k", "not_onnx or versions"),
    ),
    "tensor-data": Sabotage(
        "a tensor's data matches its declared shape",
        "safety._check_inline_data does nothing",
        _patch("portable_moe.safety", "_check_inline_data", _nothing),
        ("test_hardening_bundles.py", "-k", "absurd"),
    ),
    "utf8": Sabotage(
        "string fields are UTF-8 text",
        "safety._check_text does nothing",
        _patch("portable_moe.safety", "_check_text", _nothing),
        ("test_hardening_bundles.py", "-k", "utf8"),
    ),
    "limits": Sabotage(
        "size limits on bundles and declared tensor data",
        "safety.max_bundle_bytes always answers 2**62 bytes",
        _patch("portable_moe.safety", "max_bundle_bytes", lambda explicit=None: 2**62),
        ("test_hardening_bundles.py", "-k", "limit or absurd or declared or constant_attribute"),
    ),
    "manifest-match": Sabotage(
        "the manifest describes the model it ships with",
        "Bundle._check_matches_manifest does nothing",
        _patch("portable_moe.bundle", "Bundle._check_matches_manifest", _nothing),
        ("test_hardening_bundles.py", "-k", "does_not_match"),
    ),
    "scan": Sabotage(
        "a bundle holds only regular files; no symlinked directories",
        "bundle.scan_bundle_files is a plain rglob",
        _patch("portable_moe.bundle", "scan_bundle_files", _naive_scan),
        ("test_hardening_bundles.py", "-k", "special or symlinked"),
    ),
    "values": Sabotage(
        "NaN/Inf and out-of-vocabulary token ids are refused before the backend",
        "tensors._check_values does nothing",
        _patch("portable_moe.tensors", "_check_values", _nothing),
        ("test_hardening_inputs.py",),
    ),
    "copies": Sabotage(
        "backends get private, contiguous, native-order copies of the inputs",
        "tensors._private_copy hands over the caller's array",
        _patch("portable_moe.tensors", "_private_copy", lambda value: value),
        ("test_hardening_inputs.py", "-k", "private or read-only or byte-swapped or strided or contiguous"),
    ),
    "atomic-replace": Sabotage(
        "replacing a bundle is atomic under interruption and concurrent writers",
        "bundle._move_into_place is the earlier move-aside-then-rename",
        _patch("portable_moe.bundle", "_move_into_place", _naive_move),
        ("test_hardening_interrupts.py", "test_hardening_concurrency.py", "-k", "overwrite or processes or overtaken"),
    ),
    "sigterm": Sabotage(
        "SIGTERM unwinds like Ctrl-C, so staging directories are removed",
        "termination.install_termination_handler installs nothing",
        _patch("portable_moe.run.termination", "install_termination_handler", lambda: False),
        ("test_hardening_interrupts.py", "-k", "SIGTERM"),
    ),
    "fallback": Sabotage(
        "fallback moves on to the next backend and reports why",
        "fallback._compile_each tries the first backend only, without catching its failure",
        _patch("portable_moe.run.fallback", "_compile_each", _first_backend_only),
        ("test_hardening_devices.py", "-k", "fall_back or falls_back or unavailable or compile_time"),
    ),
}


def apply_sabotage(name: str) -> None:
    """Called from the generated sitecustomize in every process of a sabotaged run."""
    SABOTAGES[name].apply()


_SITECUSTOMIZE = f"""
import os, sys
if os.environ.get({SABOTAGE_ENV!r}):
    sys.path.insert(0, {str(SCRIPTS)!r})
    import reliability_report
    reliability_report.apply_sabotage(os.environ[{SABOTAGE_ENV!r}])
"""


# ---------------------------------------------------------------------------------------------
# Running


def run_tests(arguments: list[str], sabotage: str | None = None, timeout: float = 900) -> list[dict[str, Any]]:
    """Run pytest on the given files (relative to tests/portable_moe) with the recording plugin."""
    with tempfile.TemporaryDirectory(prefix="reliability-") as scratch:
        results = Path(scratch) / "results.json"
        (Path(scratch) / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        paths = [str(TESTS / argument) if argument.endswith(".py") else argument for argument in arguments]
        env = {
            **os.environ,
            RESULTS_ENV: str(results),
            "PYTHONPATH": os.pathsep.join(filter(None, [scratch, str(SCRIPTS), os.environ.get("PYTHONPATH")])),
        }
        if sabotage:
            env[SABOTAGE_ENV] = sabotage
        command = [sys.executable, "-m", "pytest", "-q", "-p", "reliability_report", "-p", "no:cacheprovider", *paths]
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return json.loads(results.read_text()) if results.exists() else []


def run_fuzz(count: int, bundle: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="reliability-fuzz-") as scratch:
        summary = Path(scratch) / "fuzz.json"
        command = [
            sys.executable,
            str(SCRIPTS / "fuzz_bundles.py"),
            "--count",
            str(count),
            "--quiet",
            "--json",
            str(summary),
        ]
        subprocess.run(
            [*command, *(["--bundle", bundle] if bundle else [])], cwd=ROOT, capture_output=True, timeout=7200
        )
        return {
            **json.loads(summary.read_text()),
            "command": " ".join(
                ["python scripts/fuzz_bundles.py", *command[2:4], *(["--bundle", bundle] if bundle else [])]
            ),
        }


# ---------------------------------------------------------------------------------------------
# Rendering


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _outcome(record: dict[str, Any]) -> str:
    if record["outcome"] == "skipped":
        return f"skipped: {record['reason']}"
    if record["outcome"] in ("failed", "error"):
        return f"**{record['outcome'].upper()}**: {record['reason']}"
    return record["outcome"]


def _case(record: dict[str, Any]) -> str:
    return record["case"] or "-"


def _matrix(records: list[dict[str, Any]]) -> list[str]:
    from importlib import import_module

    cases = {}
    backends: list[str] = []
    for record in records:
        kind, backend = record["params"]["case"], record["params"]["backend_name"]
        cases.setdefault(kind, {})[backend] = record
        if backend not in backends:
            backends.append(backend)
    sys.path.insert(0, str(TESTS))
    try:
        expected = {case.kind: case.refused for case in import_module("test_hardening_inputs").CASES}
    finally:
        sys.path.remove(str(TESTS))
    lines = [
        "| bad input | expected | " + " | ".join(backends) + " |",
        "|---|---|" + "---|" * len(backends),
    ]
    skipped_reasons = {}
    for kind, by_backend in cases.items():
        cells = []
        for backend in backends:
            record = by_backend.get(backend)
            if record is None:
                cells.append("-")
            elif record["outcome"] == "skipped":
                skipped_reasons[backend] = record["reason"]
                cells.append("skipped")
            elif record["outcome"] == "passed":
                cells.append("refused" if expected.get(kind) else "accepted, same outputs")
            else:
                cells.append(f"**{record['outcome'].upper()}**")
        verdict = "InputError" if expected.get(kind) else "accepted"
        lines.append(f"| {_cell(kind)} | {verdict} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- `{backend}` skipped: {_cell(reason)}" for backend, reason in skipped_reasons.items()]
    return lines


def _versions() -> str:
    names = ("portable-moe", "onnx", "onnxruntime", "numpy", "protobuf", "hypothesis")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found) + f", Python {platform.python_version()} on {platform.system()} {platform.machine()}"


def _fuzz_section(fuzz: dict[str, Any]) -> list[str]:
    outcomes = sorted({outcome for counts in fuzz["by_kind"].values() for outcome in counts})
    lines = [
        f"`{fuzz['command']}` (seed {fuzz['seed']}, bundle: {fuzz['bundle']}, backends: {', '.join(fuzz['backends'])}):",
        f"**{fuzz['cases']} inputs tried in {fuzz['seconds']} s; crashes {fuzz['crashes']}, hangs {fuzz['hangs']}, "
        f"unexpected exceptions {fuzz['unexpected']}.**",
        "",
        "| mutation | " + " | ".join(outcomes) + " |",
        "|---|" + "---|" * len(outcomes),
    ]
    for kind, counts in fuzz["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(outcome, 0)) for outcome in outcomes) + " |")
    lines.append("")
    lines += [f"- case {f['index']}: {f['outcome']}: {_cell(f.get('error', ''))}" for f in fuzz["failures"]]
    return lines


SETTINGS = """## Settings and policies

- **Untrusted bundles.** `load_bundle`, `Bundle.load_onnx` and `as_model_input` (bundle directory, loose
  `.onnx` file or in-memory `ModelProto`) check everything before a backend sees it: every path a bundle
  names stays inside it (no absolute paths, no `..`, no symlink leading out, checked before the file is
  opened), the bundle holds only regular files, the model parses as ONNX with an IR version and opsets
  this onnx knows, tensors have sane shapes and data matching them, strings are UTF-8, and the manifest
  describes the model it ships with. External data is read by portable-moe itself after those checks
  (`portable_moe.safety`), not by `onnx.load`. Each refusal is a `BundleError` naming the file and the
  problem; the CLI prints it on one line (the traceback only with `--debug`).
- **Size limit.** A bundle whose files, or a model whose declared tensor data, exceed the limit is
  refused before it is hashed or loaded. Default 64 GiB; `load_bundle(path, max_bytes=...)`, or the
  environment variable `PORTABLE_MOE_MAX_BUNDLE_BYTES` (bytes, or with a unit: `512M`, `8G`, `1T`).
- **NaN/Inf in float inputs.** `nan_policy`: `"reject"` (default: `InputError` naming the input, the
  count and the first position) or `"pass"`. A base option of every backend's `compile`
  (`backend.compile(model, {"nan_policy": "pass"})`), overridable per call
  (`compiled.run(feeds, nan_policy="pass")`).
- **Token ids.** For a model from a bundle with a config, `input_ids` outside `0 .. vocab_size-1` are
  refused in the base `CompiledModel.run`, before any backend sees them.
- **Inputs are copied.** Backends get C-contiguous, writeable, native-byte-order copies: read-only,
  strided and byte-swapped arrays are accepted, and the caller's arrays are never modified.
- **Fallback.** `portable_moe.run.fallback.run_with_fallback(model, "npu-sim,cpu", feeds, options)` (and
  `compile_with_fallback`) try backends in order; the result's `backend_name` says what ran and
  `attempts` lists `(backend, status, reason)` for every backend tried. Bad input and bad bundles stop
  at once (every backend would refuse them).
- **Isolation.** `portable_moe.run.isolated.run_isolated(model, backend, feeds, timeout=...)`, or
  `run_with_fallback(..., isolated=True, timeout=...)`, compile and run in a spawned worker process:
  a segfault becomes a `BackendError` naming the signal, a hang is killed after `timeout` seconds.
- **Interruption.** `bundle_writer` stages a bundle beside its target and renames it into place; Ctrl-C,
  or SIGTERM once `portable_moe.run.termination.install_termination_handler()` is installed (the CLI does), removes
  the staging directory, and an interrupted overwrite puts the old bundle back. Concurrent writers to one
  target each leave a whole bundle (the last one wins); without overwrite, one wins and the others get
  `BundleError`.
"""


def render(
    records: list[dict[str, Any]], fuzz_runs: list[dict[str, Any]], sabotage: dict[str, Any], command: str
) -> str:
    lines = [
        "# Reliability: what portable-moe refuses, survives and cleans up",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} ({_versions()}).",
        "Do not edit by hand: rerun the script.",
        "",
        "Every row is a test in `tests/portable_moe/test_hardening_*.py` as it ran for this page (skips are",
        "listed with their reason, never counted as passes). The last section switches each protection off",
        "in turn and reruns its tests, to show that they would notice.",
        "",
        SETTINGS,
        "## Summary",
        "",
        "| area | what | tests | passed | failed | skipped |",
        "|---|---|---|---|---|---|",
    ]
    by_file: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_file.setdefault(record["file"], []).append(record)
    for file, (title, what) in AREAS.items():
        group = by_file.get(file, [])
        outcomes = [r["outcome"] for r in group]
        failed = sum(outcome in ("failed", "error", "not run") for outcome in outcomes)
        lines.append(
            f"| {title} | {what} | {len(group)} | {outcomes.count('passed')} | {failed} | {outcomes.count('skipped')} |"
        )
    for fuzz in fuzz_runs:
        lines.append(
            f"| Fuzzing, long run | {fuzz['bundle']} | {fuzz['cases']} inputs | "
            f"{fuzz['cases'] - len(fuzz['failures'])} | {len(fuzz['failures'])} crashes/hangs/unexpected | 0 |"
        )
    for file, (title, what) in AREAS.items():
        group = by_file.get(file, [])
        lines += ["", f"## {title}", "", f"{what[0].upper()}{what[1:]}.", ""]
        matrix = [r for r in group if r["function"] == MATRIX_TEST]
        if matrix:
            lines += [f"Every kind of bad input against every registered backend (`{MATRIX_TEST}`):", ""]
            lines += _matrix(matrix) + [""]
        lines += ["| protection (the test's docstring or name) | case | outcome | test |", "|---|---|---|---|"]
        for record in group:
            if record["function"] == MATRIX_TEST:
                continue
            protection = record["doc"] or record["function"].removeprefix("test_").replace("_", " ")
            lines.append(
                f"| {_cell(protection)} | {_cell(_case(record))} | {_cell(_outcome(record))} | `{record['function']}` |"
            )
    lines += ["", "## Fuzzing, long runs", ""]
    if not fuzz_runs:
        lines.append("Not run for this page (pass --fuzz-count).")
    for fuzz in fuzz_runs:
        lines += _fuzz_section(fuzz) + [""]
    lines += ["", "## Would the tests notice? Each protection switched off", ""]
    if not sabotage:
        lines.append("Not run for this page (--no-sabotage).")
    else:
        lines += [
            "Each run replaces one function (in the test process and, through a generated `sitecustomize`, in every",
            "process it starts: the CLI, workers) and reruns the tests that guard it. A protection whose tests all",
            "still pass would be marked NOT NOTICED.",
            "",
            "| protection | switched off by | tests run | tests that failed | verdict |",
            "|---|---|---|---|---|",
        ]
        for name, result in sabotage.items():
            spec = SABOTAGES[name]
            failed = [r for r in result if r["outcome"] in ("failed", "error")]
            names = sorted({r["function"] for r in failed})
            shown = ", ".join(f"`{n}`" for n in names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
            verdict = "noticed" if failed else "**NOT NOTICED**"
            lines.append(
                f"| {_cell(spec.protection)} | {_cell(spec.how)} | {len(result)} | {len(failed)}: {shown} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "docs" / "reliability.md"), help="where to write the page")
    parser.add_argument("--fuzz-count", type=int, default=3000, help="cases for the long fuzz run on the toy bundles")
    parser.add_argument("--fuzz-bundle", help="also fuzz this bundle directory")
    parser.add_argument("--fuzz-preset", help="also export this preset (needs torch) and fuzz its bundle")
    parser.add_argument("--fuzz-bundle-count", type=int, default=1000, help="cases for --fuzz-bundle / --fuzz-preset")
    parser.add_argument("--no-sabotage", action="store_true", help="skip the runs with protections switched off")
    args = parser.parse_args(argv)

    print("running the hardening tests", file=sys.stderr)
    records = run_tests(sorted(AREAS))
    fuzz_runs = []
    if args.fuzz_count:
        print(f"fuzzing the toy bundles ({args.fuzz_count} cases)", file=sys.stderr)
        fuzz_runs.append(run_fuzz(args.fuzz_count, None))
    if args.fuzz_bundle:
        print(f"fuzzing {args.fuzz_bundle} ({args.fuzz_bundle_count} cases)", file=sys.stderr)
        fuzz_runs.append(run_fuzz(args.fuzz_bundle_count, args.fuzz_bundle))
    if args.fuzz_preset:
        from exporters import export_bundle

        with tempfile.TemporaryDirectory(prefix="reliability-preset-") as scratch:
            print(
                f"exporting and fuzzing the {args.fuzz_preset} preset ({args.fuzz_bundle_count} cases)", file=sys.stderr
            )
            bundle = export_bundle(Path(scratch) / args.fuzz_preset, args.fuzz_preset, 0)
            run = run_fuzz(args.fuzz_bundle_count, str(bundle.path))
            label = f"the {args.fuzz_preset} preset, exported (seed 0, {bundle.moe_lowering} lowering)"
            fuzz_runs.append(
                {**run, "bundle": label, "command": run["command"].split(" --bundle")[0] + " --bundle <it>"}
            )
    sabotage = {}
    if not args.no_sabotage:
        for name, spec in SABOTAGES.items():
            print(f"switching off: {spec.protection}", file=sys.stderr)
            sabotage[name] = run_tests(list(spec.tests), sabotage=name)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/reliability_report.py", *(argv if argv is not None else sys.argv[1:])])
    Path(args.output).write_text(render(records, fuzz_runs, sabotage, command))
    print(f"wrote {args.output}", file=sys.stderr)
    failed = [r for r in records if r["outcome"] in ("failed", "error", "not run")]
    unnoticed = [name for name, result in sabotage.items() if not any(r["outcome"] == "failed" for r in result)]
    broken_fuzz = [fuzz for fuzz in fuzz_runs if fuzz["failures"]]
    return 1 if failed or unnoticed or broken_fuzz or not records else 0


if __name__ == "__main__":
    sys.exit(main())
