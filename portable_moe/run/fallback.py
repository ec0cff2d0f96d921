"""Explicit fallback: try backends in the caller's order, report what ran and why the others did not.

Falling back is never silent (DESIGN.md): the result carries one :class:`Attempt` per backend
tried, in order, with its status and the reason it did not run::

    result = run_with_fallback(bundle, "npu-sim,cpu", feeds)
    result.backend_name   # "cpu"
    result.attempts       # [Attempt("npu-sim", "compile-failed", "backend 'npu-sim' failed to ..."),
                          #  Attempt("cpu", "ran", "")]

A backend is passed over when it is unavailable, fails to compile, fails while running, or (with
``isolated=True``) crashes or hangs in its worker process. Bad input (InputError) and a bad model
(BundleError) stop at once: every backend would refuse them the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from portable_moe import registry
from portable_moe.backend import BASE_OPTION_DEFAULTS, CompiledModel, ModelInput, as_model_input
from portable_moe.errors import BackendError, BackendUnavailableError
from portable_moe.run import isolated as isolation
from portable_moe.statuses import Status

RAN, COMPILED, UNAVAILABLE = Status.RAN, Status.COMPILED, Status.UNAVAILABLE
COMPILE_FAILED, RUN_FAILED, CRASHED, TIMED_OUT = (
    Status.COMPILE_FAILED,
    Status.RUN_FAILED,
    Status.CRASHED,
    Status.TIMED_OUT,
)

BackendOptions = Mapping[str, Mapping[str, Any]]


class Attempt(NamedTuple):
    """One backend tried: its name, what happened ("ran", "unavailable", "compile-failed",
    "run-failed", "crashed", "timed-out", or "compiled" for compile-only fallback), and why."""

    backend: str
    status: Status
    reason: str = ""


class FallbackError(BackendError):
    """No backend in the list could run the model; ``attempts`` says why for each."""

    def __init__(self, spec: str, attempts: list[Attempt]) -> None:
        self.attempts = attempts
        reasons = "; ".join(f"{attempt.backend} {attempt.status}: {attempt.reason}" for attempt in attempts)
        super().__init__(f"no backend in {spec!r} could run the model ({reasons})")


@dataclass
class FallbackResult:
    """The outputs, which backend produced them, and every attempt in order (the last one ran)."""

    outputs: dict[str, np.ndarray]
    backend_name: str
    attempts: list[Attempt]
    placement: dict[str, int]

    @property
    def fell_back(self) -> bool:
        """True when the first backend in the list is not the one that ran."""
        return len(self.attempts) > 1

    def describe(self) -> str:
        """One line: what ran, and why each earlier backend did not."""
        skipped = "; ".join(f"{a.backend} {a.status}: {a.reason}" for a in self.attempts if a.status != RAN)
        return f"ran on {self.backend_name}" + (f" after falling back ({skipped})" if skipped else "")


@dataclass
class FallbackCompiled:
    """A model compiled on the first backend in the list that could compile it."""

    compiled: CompiledModel
    backend_name: str
    attempts: list[Attempt]


def _names(backends: str | Sequence[str]) -> tuple[str, list[str]]:
    spec = backends if isinstance(backends, str) else ",".join(backends)
    return spec, registry.parse_backend_list(spec)


def _check_options(options: BackendOptions | None, names: list[str]) -> dict[str, Mapping[str, Any]]:
    options = dict(options or {})
    stray = sorted(set(options) - set(names))
    if stray:
        raise BackendError(
            f"options are given per backend, keyed by backend name (e.g. {{'cpu': {{'threads': 2}}}}); got options "
            f"for {', '.join(map(repr, stray))}, which is not in the list {', '.join(names)}"
        )
    for name in names:  # bad values stop at once: every backend after it would be tried for nothing
        registry.get_backend(name).check_options(options.get(name))
    return options


def spread_options(backends: str | Sequence[str], options: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Turn one set of options (e.g. the CLI's ``-O``) into per-backend options for a fallback list.

    Each backend gets the options it declares (``option_defaults``) plus the base options every
    backend takes (``nan_policy``), so ``-O precision=force_fp16`` reaches npu-sim and not cpu.

    Raises:
        BackendError: if no backend in the list declares one of the options (with each one's options).
    """
    _, names = _names(backends)
    options = dict(options or {})
    declared = {name: set(registry.get_backend(name).option_defaults) | set(BASE_OPTION_DEFAULTS) for name in names}
    orphans = sorted(key for key in options if not any(key in known for known in declared.values()))
    if orphans:
        listing = "; ".join(f"{name}: {', '.join(sorted(known))}" for name, known in declared.items())
        raise BackendError(f"no backend in {', '.join(names)} has option(s) {', '.join(orphans)} ({listing})")
    return {name: {key: value for key, value in options.items() if key in declared[name]} for name in names}


def _compile_each(
    model: ModelInput, names: list[str], options: Mapping[str, Mapping[str, Any]], attempts: list[Attempt]
) -> Iterator[tuple[str, CompiledModel]]:
    """Yield ``(name, compiled)`` for each backend in turn that compiles, recording those that do not."""
    for name in names:
        backend = registry.get_backend(name)
        probe = backend.safe_probe()
        if not probe.available:
            attempts.append(Attempt(name, UNAVAILABLE, probe.reason))
            continue
        try:
            compiled = backend.compile(model, options.get(name))
        except BackendUnavailableError as error:
            attempts.append(Attempt(name, UNAVAILABLE, str(error)))
            continue
        except BackendError as error:
            attempts.append(Attempt(name, COMPILE_FAILED, str(error)))
            continue
        yield name, compiled


def compile_with_fallback(
    model: Any, backends: str | Sequence[str], options: BackendOptions | None = None
) -> FallbackCompiled:
    """Compile on the first backend in ``backends`` that is available and compiles the model.

    Args:
        model: a Bundle, bundle directory, .onnx file, ModelProto or ModelInput.
        backends: "npu-sim,cpu" or ["npu-sim", "cpu"], tried in order.
        options: compile options per backend name, e.g. ``{"cpu": {"threads": 2}}``.

    Returns:
        The compiled model, the backend that compiled it, and every attempt.

    Raises:
        FallbackError: if none could (a BackendError listing every attempt).
        BackendError: an unknown backend name or options for a backend not in the list.
        BundleError / InputError: the model or an option is bad (no backend would take it).
    """
    spec, names = _names(backends)
    per_backend = _check_options(options, names)
    prepared = model if isinstance(model, ModelInput) else as_model_input(model)
    attempts: list[Attempt] = []
    for name, compiled in _compile_each(prepared, names, per_backend, attempts):
        attempts.append(Attempt(name, COMPILED))
        return FallbackCompiled(compiled, name, attempts)
    raise FallbackError(spec, attempts)


def _run_in_process(
    prepared: ModelInput, names: list[str], options: Mapping[str, Mapping[str, Any]], feeds: Mapping[str, np.ndarray]
) -> tuple[FallbackResult | None, list[Attempt]]:
    attempts: list[Attempt] = []
    for name, compiled in _compile_each(prepared, names, options, attempts):
        try:
            outputs = compiled.run(feeds)  # InputError propagates: bad input is not a device failure
        except BackendError as error:
            attempts.append(Attempt(name, RUN_FAILED, str(error)))
            continue
        attempts.append(Attempt(name, RAN))
        return FallbackResult(outputs, name, attempts, compiled.placement()), attempts
    return None, attempts


_ISOLATED_STATUS = {isolation.CRASHED: CRASHED, isolation.TIMED_OUT: TIMED_OUT}


def _run_isolated(
    prepared: ModelInput,
    names: list[str],
    options: Mapping[str, Mapping[str, Any]],
    feeds: Mapping[str, np.ndarray],
    timeout: float | None,
) -> tuple[FallbackResult | None, list[Attempt]]:
    attempts: list[Attempt] = []
    for name in names:
        probe = registry.get_backend(name).safe_probe()
        if not probe.available:  # no need to start a process to learn that
            attempts.append(Attempt(name, UNAVAILABLE, probe.reason))
            continue
        outcome = isolation.execute(prepared, name, feeds, options.get(name), timeout=timeout)
        if outcome.status == isolation.RAN:
            attempts.append(Attempt(name, RAN))
            return FallbackResult(outcome.outputs, name, attempts, outcome.placement), attempts
        if outcome.status == isolation.FAILED:
            if outcome.error_class not in ("BackendError", "BackendUnavailableError"):
                outcome.raise_error()  # bad input or a bad bundle: the same on every backend
            if outcome.error_class == "BackendUnavailableError":
                status = UNAVAILABLE
            else:
                status = COMPILE_FAILED if outcome.stage in ("start", "compile") else RUN_FAILED
        else:
            status = _ISOLATED_STATUS[outcome.status]
        attempts.append(Attempt(name, status, outcome.message))
    return None, attempts


def run_with_fallback(
    model: Any,
    backends: str | Sequence[str],
    feeds: Mapping[str, np.ndarray],
    options: BackendOptions | None = None,
    *,
    isolated: bool = False,
    timeout: float | None = None,
) -> FallbackResult:
    """Run ``feeds`` on the first backend in ``backends`` that compiles and runs the model.

    Args:
        model: a Bundle, bundle directory, .onnx file, ModelProto or ModelInput.
        backends: "npu-sim,cpu" or ["npu-sim", "cpu"], tried in order.
        feeds: input name -> array.
        options: compile options per backend name, e.g. ``{"npu-sim": {...}, "cpu": {"threads": 2}}``.
        isolated: compile and run each backend in a worker process, so that a crash (segfault)
            or hang moves on to the next backend instead of taking the caller down.
        timeout: with ``isolated``, seconds each backend gets for compile and run (None: no limit).

    Returns:
        The outputs, the backend that produced them, and every attempt in order.

    Raises:
        FallbackError: if no backend could run the model (a BackendError listing every attempt).
        BackendError: an unknown backend name, or options for a backend not in the list.
        InputError / BundleError: bad feeds or a bad model (no backend would take them).
    """
    spec, names = _names(backends)
    per_backend = _check_options(options, names)
    prepared = model if isinstance(model, ModelInput) else as_model_input(model)
    if isolated:
        result, attempts = _run_isolated(prepared, names, per_backend, feeds, timeout)
    else:
        result, attempts = _run_in_process(prepared, names, per_backend, feeds)
    if result is None:
        raise FallbackError(spec, attempts)
    return result


__all__ = [
    "Attempt",
    "FallbackCompiled",
    "FallbackError",
    "FallbackResult",
    "compile_with_fallback",
    "run_with_fallback",
    "spread_options",
]
