"""Compile and run a model in a separate worker process.

Vendor runtimes are native code: a driver bug can segfault or hang, and in-process that takes
the caller down with it. :func:`run_isolated` does the compile and the run in a fresh worker of
the one worker pool (:mod:`portable_moe.run.pool`, "spawn": no state is inherited) and turns a crash (with
the signal's name) or a hang (after ``timeout`` seconds, the worker is killed) into a
:class:`~portable_moe.errors.BackendError`.

The worker finds backends the way the caller does: through entry points (it gets the caller's
``sys.path``) and through in-process registrations whose factory can be pickled (a module-level
class, for example). Scripts that call this must guard their top level with
``if __name__ == "__main__":``, as ``multiprocessing`` requires for "spawn".
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from portable_moe import errors, registry
from portable_moe.backend import ModelInput, as_model_input, token_id_limits
from portable_moe.bundle import Bundle
from portable_moe.errors import BackendError
from portable_moe.run import pool
from portable_moe.run.pool import LostTask, note_stage
from portable_moe.statuses import Status
from portable_moe.tensors import check_feeds

# Starting a worker means a fresh interpreter importing numpy, onnx and the backend: not the
# backend's fault if slow, so it has its own generous limit, separate from ``timeout``.
DEFAULT_START_TIMEOUT = pool.START_TIMEOUT
# Errors the worker may report that keep their class in the caller (anything else becomes a BackendError).
_ERROR_CLASSES = {
    cls.__name__: cls
    for cls in (
        errors.BackendError,
        errors.BackendUnavailableError,
        errors.BundleError,
        errors.ConfigError,
        errors.InputError,
    )
}

RAN, FAILED, CRASHED, TIMED_OUT = Status.RAN, Status.FAILED, Status.CRASHED, Status.TIMED_OUT


@dataclass
class WorkerOutcome:
    """What happened to one isolated compile-and-run.

    Attributes:
        status: "ran", "failed" (the backend raised), "crashed" (the process died) or "timed-out".
        stage: where it got to: "start", "compile" or "run".
        message: why it did not run, in words a user can act on.
        error_class: for "failed", the error's class name (e.g. "BackendError").
        outputs / placement: for "ran", the outputs and where nodes ran.
    """

    status: Status
    stage: str
    message: str = ""
    error_class: str = "BackendError"
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    placement: dict[str, int] = field(default_factory=dict)

    def raise_error(self) -> None:
        """Raise the failure as the caller would have seen it in-process (no-op when it ran)."""
        if self.status != RAN:
            raise _ERROR_CLASSES.get(self.error_class, BackendError)(self.message)


def _compile_and_run(task: tuple[str, ModelInput, dict[str, np.ndarray], dict[str, Any]], state: Any) -> WorkerOutcome:
    """Runs in the worker process (the pool's task function): compile, run, report each stage."""
    backend_name, model, feeds, options = task
    stage = "start"
    try:
        backend = registry.get_backend(backend_name)
        stage = "compile"
        note_stage(stage)
        compiled = backend.compile(model, options)
        stage = "run"
        note_stage(stage)
        outputs = compiled.run(feeds)
        return WorkerOutcome(RAN, stage, outputs=outputs, placement=compiled.placement())
    except BaseException as error:  # everything goes back to the caller, which decides
        known = isinstance(error, errors.PortableMoEError) and type(error).__name__ in _ERROR_CLASSES
        message = str(error) if known else f"backend {backend_name!r} failed: {type(error).__name__}: {error}"
        return WorkerOutcome(FAILED, stage, message, type(error).__name__ if known else "BackendError")


def _lost(task: tuple[str, Any, Any, Any], lost: LostTask) -> WorkerOutcome:
    """The outcome of a run whose worker crashed or hung (see :class:`~portable_moe.run.pool.LostTask`)."""
    backend_name, stage = task[0], lost.stage or "start"
    if lost.kind == pool.TIMED_OUT:
        return WorkerOutcome(
            TIMED_OUT,
            stage,
            f"backend {backend_name!r} did not finish compile and run within {lost.seconds:g} s (stuck in {stage}); "
            "its worker process was stopped",
        )
    if lost.kind == pool.RAISED:
        return WorkerOutcome(FAILED, stage, f"backend {backend_name!r} failed: {lost.how}")
    return WorkerOutcome(
        CRASHED, stage, f"backend {backend_name!r} crashed during {stage}: its worker process was {lost.how}"
    )


def _factories_for(backend_name: str) -> dict[str, Any]:
    """The in-process registration of ``backend_name`` the worker needs, checked to be picklable."""
    factories = registry.in_process_factories()
    if backend_name not in factories:
        return {}
    try:
        pickle.dumps(factories[backend_name])
    except Exception as error:
        raise BackendError(
            f"backend {backend_name!r} was registered in this process with a factory that cannot be sent to a "
            f"worker process ({type(error).__name__}: {error}); register it through an entry point, or use a "
            "module-level class as the factory"
        ) from None
    return {backend_name: factories[backend_name]}


def execute(
    model: ModelInput,
    backend_name: str,
    feeds: Mapping[str, np.ndarray],
    options: Mapping[str, Any] | None = None,
    *,
    timeout: float | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT,
) -> WorkerOutcome:
    """Compile and run ``model`` on one backend in a worker process; never raises for the backend's failure.

    Args:
        model: the prepared model (see :func:`~portable_moe.backend.as_model_input`).
        backend_name: the registered backend.
        feeds: input name -> array.
        options: the backend's compile options.
        timeout: seconds allowed for compile and run together (None: no limit).
        start_timeout: seconds allowed for the worker to start and find the backend.

    Returns:
        The outcome: ran (with outputs), failed, crashed or timed-out (with the reason).

    Raises:
        BackendError: if the work cannot be sent to a worker at all (an unpicklable factory or option).
    """
    factories = _factories_for(backend_name)
    task = (backend_name, model, dict(feeds), dict(options or {}))
    try:
        with pool.WorkerPool(
            _compile_and_run,
            _lost,
            timeout=timeout,
            start_timeout=start_timeout,
            max_start_failures=1,
            factories=factories,
            name=f"portable-moe-{backend_name}",
        ) as workers:
            [outcome] = workers.run([task])
    except pool.WorkerStartError as error:
        if error.kind == pool.TIMED_OUT:
            message = (
                f"backend {backend_name!r} did not start within {start_timeout:g} s; its worker process was stopped"
            )
            return WorkerOutcome(TIMED_OUT, "start", message)
        message = f"backend {backend_name!r} crashed during start: its worker process was {error.how}"
        return WorkerOutcome(CRASHED, "start", message)
    return outcome


@dataclass
class IsolatedRun:
    """Outputs of an isolated run, and where the backend placed the graph's nodes."""

    outputs: dict[str, np.ndarray]
    placement: dict[str, int]


def run_isolated(
    model: Bundle | ModelInput | Any,
    backend_name: str,
    feeds: Mapping[str, np.ndarray],
    options: Mapping[str, Any] | None = None,
    *,
    timeout: float | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT,
) -> IsolatedRun:
    """Compile and run a model on one backend in a worker process.

    The feeds are checked here first (a bad input fails fast, without starting a process).

    Args:
        model: a Bundle, bundle directory, .onnx file, ModelProto or ModelInput.
        backend_name: the registered backend to use.
        feeds: input name -> array.
        options: the backend's compile options (``nan_policy`` included).
        timeout: seconds allowed for compile and run together; the worker is killed after (None: no limit).
        start_timeout: seconds allowed for the worker process to start.

    Returns:
        The outputs and placement.

    Raises:
        BackendError: the backend failed, or its worker crashed (the message names the signal)
            or timed out.
        InputError / BundleError: as in-process.
    """
    prepared = model if isinstance(model, ModelInput) else as_model_input(model)
    check_feeds(
        prepared.inputs,
        feeds,
        nan_policy=(options or {}).get("nan_policy", "reject"),
        token_id_limits=token_id_limits(prepared),
    )
    outcome = execute(prepared, backend_name, feeds, options, timeout=timeout, start_timeout=start_timeout)
    outcome.raise_error()
    return IsolatedRun(outcome.outputs, outcome.placement)


__all__ = ["DEFAULT_START_TIMEOUT", "IsolatedRun", "WorkerOutcome", "execute", "run_isolated"]
