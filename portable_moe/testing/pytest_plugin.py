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
    from portable_moe.testing.preset_checks import PresetCheck, PresetExports

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
    """The session's state: the backends, the selected cases, the worker pool and exported presets."""

    def __init__(self, config: pytest.Config) -> None:
        from portable_moe.conformance.ops import DEFAULT_TIMEOUT, resolve_backends
        from portable_moe.errors import PortableMoEError
        from portable_moe.testing.preset_checks import parse_presets

        option = config.getoption
        try:
            self.backends, _ = resolve_backends(option("portable_moe_backend"))
        except PortableMoEError as error:
            raise pytest.UsageError(f"--portable-moe-backend: {error}") from None
        self.include = option("portable_moe_include")
        self.exclude = option("portable_moe_exclude")
        try:
            self.presets = parse_presets(option("portable_moe_presets"))
        except PortableMoEError as error:
            raise pytest.UsageError(f"--portable-moe-presets: {error}") from None
        self.timeout = option("portable_moe_timeout") or DEFAULT_TIMEOUT
        self.cases: list[OpCase] = []
        self._pool: OpPool | None = None
        self._exports: PresetExports | None = None

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

    def preset_check(self, preset: str, backend: str) -> PresetCheck:
        """The preset's check on ``backend`` (each preset exported once per lowering per session)."""
        from portable_moe.testing.preset_checks import PresetExports

        if self._exports is None:
            self._exports = PresetExports(Path(tempfile.mkdtemp(prefix="portable-moe-pytest-")))
        return self._exports.check(preset, backend)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._exports is not None:
            shutil.rmtree(self._exports.directory, ignore_errors=True)
            self._exports = None


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
    def __init__(self, *, suite: _Suite, backend: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.suite = suite
        self.backend = backend

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str | Any:
        if isinstance(excinfo.value, _ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.name


class OpCaseItem(_SuiteItem):
    """One ONNX node test case on one backend."""

    def __init__(self, *, case: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case

    def runtest(self) -> None:
        from portable_moe.conformance.ops import OpTask

        _report(self.suite.run(OpTask(self.backend, self.case)))


class ModelItem(_SuiteItem):
    """A preset exported with the backend's preferred MoE lowering, checked against its golden data."""

    def __init__(self, *, preset: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.preset = preset

    def runtest(self) -> None:
        check = self.suite.preset_check(self.preset, self.backend)
        if check.export_error is not None:
            raise check.export_error
        if check.task is None:
            pytest.skip(check.reason)
        _report(self.suite.run(check.task))


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
            OpCaseItem.from_parent(group, name=f"{case.name}[{backend}]", suite=suite, backend=backend, case=case.name)
            for case in suite.cases
            for backend in suite.backends
        ]

    def model_items(group: _Group) -> list[pytest.Item]:
        return [
            ModelItem.from_parent(group, name=f"{preset}[{backend}]", suite=suite, backend=backend, preset=preset)
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
