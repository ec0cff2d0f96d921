"""Model conformance: run a bundle on backends and compare with its golden data."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from portable_moe.backend import Backend, ModelInput, as_model_input
from portable_moe.bundle import Bundle
from portable_moe.compare import OutputComparison, compare_outputs
from portable_moe.errors import BundleError, PortableMoEError
from portable_moe.registry import get_backend

PASSED, FAILED, ERROR, UNAVAILABLE = "passed", "failed", "error", "unavailable"


@dataclass
class BackendResult:
    """The outcome of checking one bundle on one backend. Only ``passed`` is a pass."""

    backend: str
    status: str
    reason: str = ""
    comparisons: list[OutputComparison] = field(default_factory=list)
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    placement: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def worst(self, attribute: str, kind: str = "values") -> float:
        """The largest value of ``attribute`` over this result's comparisons of ``kind``."""
        values = [getattr(c, attribute) for c in self.comparisons if c.kind == kind]
        return max(values) if values else float("nan")

    def routing_agreement(self) -> float:
        values = [c.routing_agreement for c in self.comparisons if c.kind == "routing"]
        return min(values) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "status": self.status,
            "reason": self.reason,
            "compile_seconds": self.compile_seconds,
            "run_seconds": self.run_seconds,
            "placement": self.placement,
            "comparisons": [c.to_dict() for c in self.comparisons],
        }


def check_backend(
    bundle: Bundle, backend: Backend, options: Mapping[str, Any] | None = None, model: ModelInput | None = None
) -> BackendResult:
    """Compile ``bundle`` for ``backend``, run every golden input set, compare with the golden outputs.

    Never raises for a backend's failure: an unavailable backend, a compile or run error all end
    as a result with that status and the reason.
    """
    probe = backend.safe_probe()
    if not probe.available:
        return BackendResult(backend.name, UNAVAILABLE, probe.reason)
    golden = bundle.golden_sets()
    if not golden:
        raise BundleError(f"{bundle.path}: the bundle has no golden data to check against")
    started = time.perf_counter()
    try:
        compiled = backend.compile(model or as_model_input(bundle), options)
    except PortableMoEError as error:
        return BackendResult(backend.name, ERROR, str(error), compile_seconds=time.perf_counter() - started)
    compile_seconds = time.perf_counter() - started
    comparisons: list[OutputComparison] = []
    started = time.perf_counter()
    try:
        for feeds, expected in golden:
            comparisons += compare_outputs(expected, compiled.run(feeds), bundle.routing_outputs, compiled.precision)
    except PortableMoEError as error:
        return BackendResult(backend.name, ERROR, str(error), compile_seconds=compile_seconds)
    run_seconds = time.perf_counter() - started
    failures = [c.message for c in comparisons if not c.passed]
    return BackendResult(
        backend.name,
        FAILED if failures else PASSED,
        failures[0] if failures else "",
        comparisons,
        compile_seconds,
        run_seconds,
        compiled.placement(),
    )


def check_bundle(
    bundle: Bundle,
    backend_names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BackendResult]:
    """Check a bundle on each named backend (unknown names raise before anything runs).

    Args:
        bundle: a loaded bundle.
        backend_names: registry names; each is checked on its own.
        options: per-backend options, keyed by backend name.
        progress: called with a message before each backend.
    """
    backends = [get_backend(name) for name in backend_names]
    model = as_model_input(bundle)
    results = []
    for backend in backends:
        if progress:
            progress(f"checking {bundle.name} on {backend.name}")
        results.append(check_backend(bundle, backend, (options or {}).get(backend.name), model))
    return results
