"""Shared fixtures. Nothing here imports torch or a backend module at import time.

The suite runs in several processes (pytest-xdist, ``-n auto`` in pyproject.toml's addopts). What
is expensive to make (an exported bundle, a checkpoint) is made once per run, not once per process:
:class:`RunWide` keeps it in a directory every worker sees, behind a lock per item, and the run fails
if a model was exported twice anyway (see ``pytest_sessionfinish``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Every model export of this process: (config name, lowering, weights fingerprint) -> seconds per
# export. Workers write theirs to the run's directory at the end; the summary lists them all and the
# run fails if one was repeated in any process.
_EXPORTS: dict[tuple[str, str, str], list[float]] = {}
# The directory every process of this run shares; the process that starts the run makes it.
_RUN_DIRECTORY = "PORTABLE_MOE_TEST_RUN_DIRECTORY"
# The terminal size variables of the process that starts the run, as JSON, for its workers.
_TERMINAL = "PORTABLE_MOE_TEST_TERMINAL"


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers
        os.environ[_RUN_DIRECTORY] = tempfile.mkdtemp(prefix="portable-moe-tests-")
        os.environ[_TERMINAL] = json.dumps({name: os.environ.get(name) for name in ("COLUMNS", "LINES")})
    else:
        # Workers start with COLUMNS=80 and LINES=24 in their environment where the controller may
        # have none; the CLI sizes its piped output by COLUMNS, so tests see what one process would.
        for name, value in json.loads(os.environ[_TERMINAL]).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ.pop(_RUN_DIRECTORY, ""), ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (each export and run already uses threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


def run_directory() -> Path:
    """The directory this test run's processes share (removed when the run ends)."""
    return Path(os.environ[_RUN_DIRECTORY])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RunWide:
    """Things made once per test run, whichever worker asks first; the others load what it wrote.

    ``get(key, label, make, load)``: ``make(directory)`` writes the thing into a fresh directory and
    returns it; ``load(directory)`` reads one that another process made. A lock per key makes the
    other processes wait while one makes it. A ``make`` that raises is remembered in this process
    (the same error again on every request) and leaves nothing behind for the others, which try
    themselves.
    """

    def __init__(self, name: str) -> None:
        self.root = run_directory() / name
        self.root.mkdir(parents=True, exist_ok=True)
        self._made: dict[str, Any] = {}

    def get(self, key: str, label: str, make: Callable[[Path], Any], load: Callable[[Path], Any]) -> Any:
        if key not in self._made:
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            directory = self.root / f"{label}-{digest}"
            done = self.root / f"{label}-{digest}.done"
            with _locked(self.root / f"{label}-{digest}.lock"):
                try:
                    if done.exists():
                        self._made[key] = load(directory)
                    else:
                        shutil.rmtree(directory, ignore_errors=True)
                        self._made[key] = make(directory)
                        done.touch()
                except Exception as error:
                    self._made[key] = error
        if isinstance(self._made[key], Exception):
            raise self._made[key]
        return self._made[key]


@pytest.fixture(scope="session")
def run_wide():
    """``run_wide(name) -> RunWide``: a store of things made once per test run (see RunWide)."""
    return RunWide


@pytest.fixture(scope="session", autouse=True)
def _shared_trace_cache():
    """One on-disk trace cache for the run: every worker and the exports they start in subprocesses
    (CLI, demo, examples): each model structure is traced once per run (see exporters.trace_cache)."""
    from exporters.trace_cache import ENVIRONMENT_VARIABLE

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENVIRONMENT_VARIABLE, str(run_directory() / "traces"))
        yield


@pytest.fixture(scope="session", autouse=True)
def _count_exports():
    """Record every call of the exporter (without importing torch: the wrapper imports nothing)."""
    import exporters.torch_export as torch_export

    export = torch_export.export_model_to_onnx

    def counted(model, path, **options):
        start = time.perf_counter()
        export(model, path, **options)
        lowering = options.get("lowering", "dense")
        key = (model.config.name, getattr(lowering, "name", lowering), _fingerprint(model))
        _EXPORTS.setdefault(key, []).append(time.perf_counter() - start)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_export, "export_model_to_onnx", counted)
        yield


def _fingerprint(model) -> str:
    """A short hash of the model's weights: two exports of equal weights are the same bundle."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def _statistics() -> dict[str, int]:
    import sys

    trace_cache = sys.modules.get("exporters.trace_cache")  # not imported: nothing was exported here
    return trace_cache.trace_cache_statistics() if trace_cache else {"traced": 0, "reused": 0}


def _run_exports() -> tuple[dict[tuple[str, str, str], list[float]], dict[str, int]]:
    """Every export of the run (this process's and the workers' records) and the trace cache's counts."""
    exports = {key: list(seconds) for key, seconds in _EXPORTS.items()}
    statistics = _statistics()
    directory = os.environ.get(_RUN_DIRECTORY)
    for record in sorted(Path(directory).glob("exports-*.json")) if directory else []:
        data = json.loads(record.read_text())
        for preset, lowering, weights, seconds in data["exports"]:
            exports.setdefault((preset, lowering, weights), []).extend(seconds)
        for name, count in data["statistics"].items():
            statistics[name] += count
    return exports, statistics


def repeated_exports() -> dict[tuple[str, str, str], list[float]]:
    """The exports this run made more than once (in one process or in two)."""
    return {key: seconds for key, seconds in _run_exports()[0].items() if len(seconds) > 1}


def pytest_terminal_summary(terminalreporter):
    exports, statistics = _run_exports()
    if not exports:
        return
    total = sum(sum(seconds) for seconds in exports.values())
    count = sum(len(seconds) for seconds in exports.values())
    terminalreporter.section("portable-moe exports")
    terminalreporter.write_line(
        f"{count} model export(s) in this run, {total:.1f} s in all; layer graphs traced "
        f"{statistics['traced']} time(s), reused from the trace cache {statistics['reused']} time(s):"
    )
    for (preset, lowering, weights), seconds in sorted(exports.items()):
        times = ", ".join(f"{value:.1f} s" for value in seconds)
        terminalreporter.write_line(f"  {preset} / {lowering} / weights {weights}: {times}")
    for key in repeated_exports():
        terminalreporter.write_line(f"EXPORTED MORE THAN ONCE: {key}; get bundles from bundle_factory")


def pytest_sessionfinish(session):
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if worker is not None:  # a worker: hand its records to the controller, which judges the run
        record = {"exports": [[*key, seconds] for key, seconds in _EXPORTS.items()], "statistics": _statistics()}
        (run_directory() / f"exports-{worker}.json").write_text(json.dumps(record))
    elif repeated_exports() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def bundle_factory():
    """``bundle_factory(preset, lowering="dense", seed=0, **export_options)``: an exported bundle, shared.

    ``preset`` is a preset name or a ModelConfig; ``export_options`` go to ``export_bundle``.

    Each distinct request is exported once per test run, by whichever worker asks first (an export
    that fails raises the same error again on every request); tests must not change the returned
    bundle (copy it first, see ``tiny_bundle_copy``).
    """
    pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")
    from exporters import export_bundle
    from portable_moe import load_bundle

    bundles = RunWide("bundles")

    def factory(preset="tiny", lowering: str = "dense", seed: int = 0, **options):
        name = preset if isinstance(preset, str) else preset.name
        return bundles.get(
            repr((preset, lowering, seed, sorted(options.items()))),
            f"{name}-{lowering}-{seed}",
            lambda directory: export_bundle(directory, preset, seed, moe_lowering=lowering, **options),
            load_bundle,
        )

    return factory


@pytest.fixture(scope="session")
def tiny_bundle(bundle_factory):
    """The tiny preset (dense lowering, seed 0), exported once per test session."""
    return bundle_factory("tiny", "dense", 0)


@pytest.fixture
def tiny_bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle that a test may damage."""
    import shutil

    from portable_moe import load_bundle

    target = tmp_path / "tiny"
    shutil.copytree(tiny_bundle.path, target)
    return load_bundle(target)


def _write_vendor_package(directory, module_name: str, source: str, backends: dict[str, str]):
    """Write a module and a dist-info registering ``backends`` (name -> "module:Class") in ``directory``.

    Put ``directory`` on sys.path (or PYTHONPATH, for subprocesses) and the registry finds the
    backends through entry points, exactly as it finds an installed vendor package.
    """
    (directory / f"{module_name}.py").write_text(source)
    dist_info = directory / f"{module_name}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module_name.replace('_', '-')}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in backends.items())
    (dist_info / "entry_points.txt").write_text(f"[portable_moe.backends]\n{lines}")
    return directory


@pytest.fixture(scope="session")
def write_vendor_package():
    """A function that writes a fake vendor package (module + entry points) into a directory."""
    return _write_vendor_package
