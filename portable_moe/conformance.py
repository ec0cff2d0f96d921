"""Model conformance: run a bundle on backends and compare with expected outputs.

The expected outputs are the bundle's golden data (computed by the torch reference at export) by
default. For other inputs (:func:`input_sets_for`: ``random:N`` seeded token batches of the golden
shape, or an ``.npz`` file) torch may be absent, so the oracle is the ``reference`` backend (onnx's
numpy evaluator, the oracle for operator semantics), or ``cpu`` (ONNX Runtime) when the reference
cannot run the bundle's lowering (e.g. ``com.microsoft`` operators). The report says which.

Per MoE layer it also reports routing (see :mod:`portable_moe.routing`) and, on request, where in
the graph a backend first diverges (see :mod:`portable_moe.bisect`). The JSON form of a report is
:func:`report_dict`; its schema is described in docs/report-schema.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from portable_moe import progress as step_progress
from portable_moe.backend import Backend, ModelInput, as_model_input
from portable_moe.bisect import ORACLES, BisectResult, bisect_divergence
from portable_moe.bundle import Bundle
from portable_moe.compare import OutputComparison, compare_outputs, with_weights
from portable_moe.errors import BundleError, InputError, PortableMoEError
from portable_moe.registry import get_backend
from portable_moe.routing import LayerRouting, layer_routing, mark_cascades, routing_margins
from portable_moe.tensors import load_npz

PASSED, FAILED, ERROR, UNAVAILABLE = "passed", "failed", "error", "unavailable"
# A backend left out because it does not take the bundle (its MoE lowering, opset or operator
# domains), when the caller asked for every backend that does rather than for this one by name.
SKIPPED = "skipped"
# Statuses that say a backend was not checked at all: never a pass, never a failure of "all".
NOT_CHECKED = (UNAVAILABLE, SKIPPED)
REPORT_SCHEMA_VERSION = 1
GOLDEN = "golden (torch reference, from the bundle)"
# log10(abs error) histogram bins: errors below 1e-10 land in the first bin, above 10 in the last.
ERROR_HISTOGRAM_EDGES = [x / 2 for x in range(-20, 3)]

InputSet = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


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
    routing: list[LayerRouting] = field(default_factory=list)
    error_histograms: dict[str, list[int]] = field(default_factory=dict)
    bisection: BisectResult | None = None
    precision: str = ""

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
            "precision": self.precision,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "routing": [layer.to_dict() for layer in self.routing],
            "error_histograms": {
                name: {"log10_edges": ERROR_HISTOGRAM_EDGES, "counts": counts}
                for name, counts in self.error_histograms.items()
            },
            "bisection": self.bisection.to_dict() if self.bisection else None,
        }

    def routing_note(self) -> str:
        """The routing verdicts of the layers that flipped, for the terminal ("" when routing agrees)."""
        return "; ".join(layer.summary() for layer in self.routing if layer.disagreements)


def error_histogram(expected: np.ndarray, actual: np.ndarray) -> list[int]:
    """Counts of log10(abs error) over :data:`ERROR_HISTOGRAM_EDGES` (clipped into the outer bins).

    Non-finite errors (a NaN or inf on either side) are left out: the comparison reports them.
    """
    error = np.abs(actual.astype(np.float64) - expected.astype(np.float64)).reshape(-1)
    error = error[np.isfinite(error)]
    logs = np.log10(np.maximum(error, 1e-30))
    edges = np.asarray(ERROR_HISTOGRAM_EDGES)
    counts, _ = np.histogram(np.clip(logs, edges[0], edges[-1]), bins=edges)
    return counts.astype(int).tolist()


def _add_histograms(
    into: dict[str, list[int]], expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]
) -> None:
    for name, value in expected.items():
        got = actual.get(name)
        if not np.issubdtype(value.dtype, np.floating) or got is None or np.shape(got) != value.shape:
            continue
        counts = error_histogram(value, np.asarray(got))
        into[name] = [a + b for a, b in zip(into.get(name, [0] * len(counts)), counts)]


def check_backend(
    bundle: Bundle,
    backend: Backend,
    options: Mapping[str, Any] | None = None,
    model: ModelInput | None = None,
    *,
    input_sets: Sequence[InputSet] | None = None,
    margins: Sequence[Mapping[str, np.ndarray]] | None = None,
    bisect: str = "never",
    skip_unaccepted: bool = False,
) -> BackendResult:
    """Compile ``bundle`` for ``backend``, run every input set, compare with the expected outputs.

    Never raises for a backend's failure: an unavailable backend, a compile or run error all end
    as a result with that status and the reason.

    Args:
        bundle: the bundle.
        backend: the backend to check.
        options: its compile options.
        model: the bundle as a ModelInput (saves reloading it per backend).
        input_sets: (feeds, expected outputs) pairs; default: the bundle's golden sets.
        margins: per input set, routing output -> each token's top-k margin (see
            :func:`portable_moe.routing.routing_margins`); None leaves margins unknown.
        bisect: "never", "failed" (bisect when the check fails) or "always".
        skip_unaccepted: a backend that does not take the bundle (its lowering, opset or operator
            domains) ends as "skipped" rather than "error", for checks of every backend.
    """
    probe = backend.safe_probe()
    if not probe.available:
        return BackendResult(backend.name, UNAVAILABLE, probe.reason)
    model = model or as_model_input(bundle)
    if skip_unaccepted:
        try:
            backend.check_supported(model)
        except PortableMoEError as error:
            return BackendResult(backend.name, SKIPPED, str(error))
    golden = list(input_sets) if input_sets is not None else bundle.golden_sets()
    if not golden:
        raise BundleError(f"{bundle.path}: the bundle has no golden data to check against")
    started = time.perf_counter()
    try:
        compiled = backend.compile(model, options)
    except PortableMoEError as error:
        return BackendResult(backend.name, ERROR, str(error), compile_seconds=time.perf_counter() - started)
    compile_seconds = time.perf_counter() - started
    comparisons: list[OutputComparison] = []
    routing: dict[str, LayerRouting] = {}
    histograms: dict[str, list[int]] = {}
    first_failing_set = None
    num_experts = bundle.config.n_routed_experts if bundle.config else None
    precision = with_weights(compiled.precision, bundle.weight_format)
    started = time.perf_counter()
    try:
        for index, (feeds, expected) in enumerate(golden):
            actual = compiled.run(feeds)
            compared = compare_outputs(expected, actual, bundle.routing_outputs, precision)
            if first_failing_set is None and not all(c.passed for c in compared):
                first_failing_set = index
            comparisons += compared
            set_margins = margins[index] if margins is not None and index < len(margins) else None
            layer_routing(expected, actual, bundle.routing_outputs, set_margins, precision, num_experts, routing, index)
            _add_histograms(histograms, expected, actual)
    except PortableMoEError as error:
        return BackendResult(backend.name, ERROR, str(error), compile_seconds=compile_seconds)
    run_seconds = time.perf_counter() - started
    mark_cascades(list(routing.values()))
    failures = [c.message for c in comparisons if not c.passed]
    result = BackendResult(
        backend.name,
        FAILED if failures else PASSED,
        failures[0] if failures else "",
        comparisons,
        compile_seconds,
        run_seconds,
        compiled.placement(),
        sorted(routing.values(), key=lambda layer: layer.layer),
        histograms,
        precision=precision,
    )
    if bisect == "always" or (bisect == "failed" and failures):
        feeds = golden[first_failing_set or 0][0]
        result.bisection = bisect_divergence(model.proto, backend, feeds, options, compiled.precision)
    return result


def _oracle_outputs(bundle: Bundle, feeds_list: Sequence[dict[str, np.ndarray]]) -> tuple[str, list[InputSet]]:
    """Expected outputs for ``feeds_list`` from the first of :data:`ORACLES` that can run the bundle."""
    failures = []
    for name in ORACLES:
        try:
            compiled = get_backend(name).compile(bundle)
            return name, [(feeds, compiled.run(feeds)) for feeds in feeds_list]
        except PortableMoEError as error:
            failures.append(f"{name}: {error}")
    raise InputError("no oracle backend could compute the expected outputs: " + "; ".join(failures))


def input_sets_for(bundle: Bundle, spec: str = "golden") -> tuple[str, list[InputSet]]:
    """The input sets a check runs, and where their expected outputs come from.

    Args:
        bundle: the bundle.
        spec: "golden" (the bundle's golden data), "random:N" (N seeded random token batches of the
            first golden input's shape, seeds 0..N-1) or the path of an ``.npz`` file holding one
            array per model input.

    Returns:
        ``(source of the expected outputs, [(feeds, expected outputs), ...])``.

    Raises:
        InputError: for a malformed spec, a missing or unreadable file, keys that are not the
            model's inputs, or when no oracle backend can run the bundle.
    """
    from portable_moe.bench import token_feeds

    if spec == "golden":
        return GOLDEN, bundle.golden_sets()
    if spec.startswith("random:"):
        count_text = spec.partition(":")[2]
        if not count_text.isdigit() or int(count_text) < 1:
            raise InputError(f"--inputs {spec!r}: write random:N with N >= 1 (e.g. random:4)")
        golden = bundle.golden_sets()
        if not golden or "input_ids" not in golden[0][0]:
            raise InputError(
                f"{bundle.path}: random:N takes its shape from the golden 'input_ids'; the bundle has none"
            )
        batch, seq = golden[0][0]["input_ids"].shape
        feeds_list = [token_feeds(bundle, batch, seq, seed=seed) for seed in range(int(count_text))]
    else:
        feeds_list = [_read_npz(bundle, Path(spec))]
    oracle, sets = _oracle_outputs(bundle, feeds_list)
    return f"{oracle} backend (oracle for non-golden inputs)", sets


def _read_npz(bundle: Bundle, path: Path) -> dict[str, np.ndarray]:
    feeds = load_npz(path, "--inputs")
    expected = sorted(spec.name for spec in bundle.inputs)
    if sorted(feeds) != expected:
        raise InputError(f"{path}: holds arrays {sorted(feeds)}, expected exactly the model inputs {expected}")
    return feeds


@dataclass
class JunitCase:
    """One JUnit testcase of a check, shaped as :func:`portable_moe.junit.junit_tree` reads its cases."""

    backend: str
    op: str
    case: str
    status: str
    seconds: float = 0.0
    reason: str = ""
    code: str = ""


def junit_cases(results: Sequence[BackendResult]) -> list[JunitCase]:
    """The check as JUnit cases: one per (backend, output) comparison; a backend that could not
    run at all is one case, an error (or a skip, when unavailable or not taking the bundle)."""
    cases = []
    for result in results:
        if not result.comparisons:
            status = result.status if result.status in (*NOT_CHECKED, PASSED) else ERROR
            cases.append(
                JunitCase(result.backend, "model", "compile and run", status, result.compile_seconds, result.reason)
            )
            continue
        seconds = result.run_seconds / len(result.comparisons)
        for number, comparison in enumerate(result.comparisons):
            reason = comparison.message
            if comparison.kind == "routing" and not comparison.passed:
                layer = next((layer for layer in result.routing if layer.output == comparison.name), None)
                reason += f" ({layer.summary()})" if layer else ""
            if result.bisection and not comparison.passed:
                reason += "\n" + result.bisection.summary()
            cases.append(
                JunitCase(
                    result.backend,
                    comparison.kind,
                    f"{comparison.name} #{number}",
                    "passed" if comparison.passed else "failed",
                    seconds,
                    reason,
                )
            )
    return cases


def report_dict(bundle: Bundle, results: Sequence[BackendResult], expected_from: str = GOLDEN) -> dict[str, Any]:
    """The JSON report (schema: docs/report-schema.md, version :data:`REPORT_SCHEMA_VERSION`)."""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "bundle": str(bundle.path),
        "bundle_name": bundle.name,
        "preset": bundle.manifest.get("preset"),
        "moe_lowering": bundle.moe_lowering,
        "weight_format": bundle.weight_format,
        "expected_from": expected_from,
        "results": [result.to_dict() for result in results],
    }


def check_bundle(
    bundle: Bundle,
    backend_names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    input_sets: Sequence[InputSet] | None = None,
    bisect: str = "never",
    skip_unaccepted: bool = False,
    verbose: bool = False,
) -> list[BackendResult]:
    """Check a bundle on each named backend (unknown names and bad options raise before anything runs).

    Args:
        bundle: a loaded bundle.
        backend_names: registry names; each is checked on its own.
        options: per-backend options, keyed by backend name.
        progress: called with a message before each backend.
        input_sets: (feeds, expected) pairs (see :func:`input_sets_for`); default: the golden sets.
        bisect: "never", "failed" or "always" (see :func:`check_backend`).
        skip_unaccepted: backends that do not take the bundle end as "skipped", not "error"
            (for "every backend that can": the CLI's ``--backend all``).
        verbose: print each backend's check with its time on stderr (when ``progress`` is None).
    """
    if bisect not in ("never", "failed", "always"):
        raise InputError(f"bisect must be never, failed or always, got {bisect!r}")
    backends = [get_backend(name) for name in backend_names]
    for backend in backends:  # a bad option is the caller's mistake: refuse it before anything compiles
        backend.check_options((options or {}).get(backend.name))
    progress = step_progress.resolve(progress, verbose)
    model = as_model_input(bundle)
    sets = list(input_sets) if input_sets is not None else bundle.golden_sets()
    margins = _margins(bundle, model, sets, progress)
    results = []
    for backend in backends:
        if progress:
            progress(f"checking {bundle.name} on {backend.name}")
        results.append(
            check_backend(
                bundle,
                backend,
                (options or {}).get(backend.name),
                model,
                input_sets=sets,
                margins=margins,
                bisect=bisect,
                skip_unaccepted=skip_unaccepted,
            )
        )
    step_progress.finish(progress)
    return results


def _margins(
    bundle: Bundle, model: ModelInput, sets: Sequence[InputSet], progress: Callable[[str], None] | None
) -> list[dict[str, np.ndarray]] | None:
    """Top-k margins per input set on cpu; None (margins unknown) when cpu cannot run the model."""
    if not bundle.routing_outputs or not sets:
        return None
    k = {name: bundle.config.num_experts_per_tok for name in bundle.routing_outputs} if bundle.config else None
    try:
        return [routing_margins(model.proto, list(bundle.routing_outputs), feeds, k) for feeds, _ in sets]
    except PortableMoEError as error:
        if progress:
            progress(f"routing margins unavailable (the cpu backend could not run the scores): {error}")
        return None
