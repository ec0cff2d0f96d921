"""pytest plugin: a vendor's conformance suite as ordinary test cases.

Installed with portable-moe (entry point group ``pytest11``). Without ``--portable-moe-backend``
it adds nothing but its options. With it::

    pytest --portable-moe-backend=my-npu
    pytest --portable-moe-backend=my-npu --portable-moe-include='^test_(add|matmul)' --portable-moe-presets=none

each ONNX node test case becomes one test per backend (``portable-moe-ops::test_add[my-npu]``),
and each built-in preset one model-conformance test (``portable-moe-models::tiny[my-npu]``: the
preset is exported with the backend's preferred MoE lowering, which needs torch, and checked
against its golden data). A case the runtime says it cannot run is a skip with the reason, a
case in the backend's expected-failures file that fails an xfail, and one that passes (or times
out, or fails unlisted) a failure; skips are never passes. Cases run in a worker process (see :mod:`portable_moe.conformance.ops`), so a
backend that crashes or hangs fails that one test, not the session.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from portable_moe.conformance.ops import CaseResult, OpCase, OpPool, Task

_SUITE_KEY = pytest.StashKey["_Suite"]()
OPS_COLLECTOR, MODELS_COLLECTOR = "portable-moe-ops", "portable-moe-models"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("portable-moe", "portable-moe conformance (ONNX op suite and model conformance)")
    group.addoption(
        "--portable-moe-backend",
        metavar="NAMES",
        default=None,
        help="run the conformance suites on these backends (comma-separated registry names); off when not given",
    )
    group.addoption(
        "--portable-moe-include",
        action="append",
        default=[],
        metavar="REGEX",
        help="only op cases whose name matches (repeatable; e.g. '^test_(add|relu)')",
    )
    group.addoption(
        "--portable-moe-exclude", action="append", default=[], metavar="REGEX", help="leave out matching op cases"
    )
    group.addoption(
        "--portable-moe-presets",
        default="all",
        metavar="NAMES",
        help="presets for model conformance: comma-separated, 'all' (every preset that is not for cost "
        "estimates only; the default) or 'none'",
    )
    group.addoption(
        "--portable-moe-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="per op case; one that runs longer fails as a timeout and its worker process is replaced "
        "(default: 20; a model check gets at least 900)",
    )


class _ConformanceFailure(Exception):
    """A case that failed or errored; its message is the whole report."""


class _Suite:
    """The session's state: the backends, the selected cases, the worker pool and exported bundles."""

    def __init__(self, config: pytest.Config) -> None:
        from portable_moe.conformance.ops import DEFAULT_TIMEOUT, resolve_backends
        from portable_moe.errors import PortableMoEError

        option = config.getoption
        try:
            self.backends, _ = resolve_backends(option("portable_moe_backend"))
        except PortableMoEError as error:
            raise pytest.UsageError(f"--portable-moe-backend: {error}") from None
        self.include = option("portable_moe_include")
        self.exclude = option("portable_moe_exclude")
        self.presets = self._presets(option("portable_moe_presets"))
        self.timeout = option("portable_moe_timeout") or DEFAULT_TIMEOUT
        self.cases: list[OpCase] = []
        self._pool: OpPool | None = None
        self._bundles: dict[tuple[str, str], Path | Exception] = {}
        self._scratch: Path | None = None

    @staticmethod
    def _presets(spec: str) -> list[str]:
        from portable_moe.config import PRESETS

        runnable = [name for name, config in PRESETS.items() if not config.cost_estimate_only]
        if spec == "none":
            return []
        if spec == "all":
            return runnable
        names = [name.strip() for name in spec.split(",")]
        unknown = [name for name in names if name not in runnable]
        if unknown:
            raise pytest.UsageError(
                f"--portable-moe-presets: unknown or cost-only preset(s) {', '.join(unknown)}; "
                f"choose from {', '.join(runnable)}, 'all' or 'none'"
            )
        return names

    def collect(self) -> None:
        from portable_moe.conformance.ops import collect_cases, select_cases
        from portable_moe.errors import PortableMoEError

        try:
            self.cases = select_cases(collect_cases(), self.include, self.exclude)
        except PortableMoEError as error:
            raise pytest.UsageError(f"portable-moe: {error}") from None

    def run(self, task: Task) -> CaseResult:
        from portable_moe.conformance.ops import DEFAULT_MODEL_TIMEOUT, ModelTask, OpPool

        if self._pool is None:
            self._pool = OpPool(self.cases, jobs=1, timeout=self.timeout)
        timeout = max(self.timeout, DEFAULT_MODEL_TIMEOUT) if isinstance(task, ModelTask) else self.timeout
        return self._pool.run([task], timeout=timeout)[0]

    def bundle(self, preset: str, lowering: str) -> Path:
        """The preset exported with ``lowering`` (once per session); re-raises the export's error."""
        key = (preset, lowering)
        if key not in self._bundles:
            from exporters import export_bundle

            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="portable-moe-pytest-"))
            try:
                self._bundles[key] = export_bundle(
                    self._scratch / f"{preset}-{lowering}", preset, 0, moe_lowering=lowering
                ).path
            except Exception as error:
                self._bundles[key] = error
        found = self._bundles[key]
        if isinstance(found, Exception):
            raise found
        return found

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _report(result: CaseResult) -> None:
    """Turn a result into pytest's outcome: pass, skip (unsupported), xfail (expected failure) or failure."""
    from portable_moe.conformance.ops import EXPECTED_FAILURE, PASSED, UNSUPPORTED

    if result.status == UNSUPPORTED:
        pytest.skip(f"unsupported on {result.backend} ({result.code}): {result.reason}")
    if result.status == EXPECTED_FAILURE:
        pytest.xfail(f"{result.backend}: {result.reason}")
    if result.status != PASSED:
        raise _ConformanceFailure(f"{result.status} on {result.backend}: {result.reason}")


class _SuiteItem(pytest.Item):
    def __init__(self, *, suite: _Suite, backend: str, key: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.suite = suite
        self.backend = backend
        self.key = key

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str | Any:
        if isinstance(excinfo.value, _ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.name


class OpCaseItem(_SuiteItem):
    """One ONNX node test case on one backend."""

    def runtest(self) -> None:
        from portable_moe.conformance.ops import OpTask

        _report(self.suite.run(OpTask(self.backend, self.key)))


class ModelItem(_SuiteItem):
    """A preset exported with the backend's preferred MoE lowering, checked against its golden data."""

    def runtest(self) -> None:
        from portable_moe.conformance.ops import ModelTask

        try:
            import torch  # noqa: F401 (only whether it imports matters)
        except ImportError as error:
            pytest.skip(
                f"exporting a preset needs torch ({error}); install it with: pip install 'portable-moe[export]'"
            )
        from exporters import LOWERINGS
        from portable_moe.registry import resolve_lowering

        lowering = resolve_lowering("auto", self.backend)
        if lowering not in LOWERINGS:
            pytest.skip(f"{self.backend} prefers the {lowering!r} MoE lowering, which the exporter does not have")
        bundle = self.suite.bundle(self.key, lowering)
        _report(self.suite.run(ModelTask(self.backend, str(bundle))))


class _Group(pytest.Collector):
    """The generated tests of one kind, so their ids read ``portable-moe-ops::test_add[cpu]``."""

    def __init__(self, *, make_items: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.make_items = make_items

    def collect(self) -> list[pytest.Item]:
        return self.make_items(self)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("portable_moe_backend"):
        config.stash[_SUITE_KEY] = _Suite(config)


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect, so they apply to these tests too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    suite = config.stash.get(_SUITE_KEY, None)
    if suite is None:
        return
    suite.collect()

    def op_items(group: _Group) -> list[pytest.Item]:
        return [
            OpCaseItem.from_parent(group, name=f"{case.name}[{backend}]", suite=suite, backend=backend, key=case.name)
            for case in suite.cases
            for backend in suite.backends
        ]

    def model_items(group: _Group) -> list[pytest.Item]:
        return [
            ModelItem.from_parent(group, name=f"{preset}[{backend}]", suite=suite, backend=backend, key=preset)
            for preset in suite.presets
            for backend in suite.backends
        ]

    for name, make_items in ((OPS_COLLECTOR, op_items), (MODELS_COLLECTOR, model_items)):
        group = _Group.from_parent(session, name=name, nodeid=name, make_items=make_items)
        # genitems reports the collection, so "collected N items" and -k's counts include these tests.
        items.extend(session.genitems(group))


def pytest_unconfigure(config: pytest.Config) -> None:
    suite = config.stash.get(_SUITE_KEY, None)
    if suite is not None:
        suite.close()
