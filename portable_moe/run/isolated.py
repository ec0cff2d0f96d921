"""Compile and run a model in a separate worker process.

Vendor runtimes are native code: a driver bug can segfault or hang, and in-process that takes
the caller down with it. :func:`run_isolated` does the compile and the run in a fresh process
(``multiprocessing`` "spawn", so no state is inherited from the caller) and turns a crash (with
the signal's name) or a hang (after ``timeout`` seconds, the worker is killed) into a
:class:`~portable_moe.errors.BackendError`.

The worker finds backends the way the caller does: through entry points (it gets the caller's
``sys.path``) and through in-process registrations whose factory can be pickled (a module-level
class, for example). Scripts that call this must guard their top level with
``if __name__ == "__main__":``, as ``multiprocessing`` requires for "spawn".
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from portable_moe import errors, registry
from portable_moe.backend import ModelInput, as_model_input, token_id_limits
from portable_moe.bundle import Bundle
from portable_moe.errors import BackendError
from portable_moe.tensors import check_feeds

# Starting a worker means a fresh interpreter importing numpy, onnx and the backend: not the
# backend's fault if slow, so it has its own generous limit, separate from ``timeout``.
DEFAULT_START_TIMEOUT = 120.0
# Seconds a worker gets to exit after SIGTERM before it is killed.
_TERMINATE_GRACE = 2.0
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

RAN, FAILED, CRASHED, TIMED_OUT = "ran", "failed", "crashed", "timed-out"


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

    status: str
    stage: str
    message: str = ""
    error_class: str = "BackendError"
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    placement: dict[str, int] = field(default_factory=dict)

    def raise_error(self) -> None:
        """Raise the failure as the caller would have seen it in-process (no-op when it ran)."""
        if self.status != RAN:
            raise _ERROR_CLASSES.get(self.error_class, BackendError)(self.message)


def _worker(
    sender: Any,
    backend_name: str,
    model: ModelInput,
    feeds: Mapping[str, np.ndarray],
    options: Mapping[str, Any] | None,
    factories: Mapping[str, Any],
) -> None:
    """Runs in the worker process: report each stage, then the outputs or the error."""
    stage = "start"
    try:
        for name, factory in factories.items():
            registry.register_backend(name, factory)
        backend = registry.get_backend(backend_name)
        stage = "compile"
        sender.send(("stage", stage))
        compiled = backend.compile(model, options)
        stage = "run"
        sender.send(("stage", stage))
        outputs = compiled.run(feeds)
        sender.send(("done", outputs, compiled.placement()))
    except BaseException as error:  # everything goes back to the caller, which decides
        known = isinstance(error, errors.PortableMoEError) and type(error).__name__ in _ERROR_CLASSES
        message = str(error) if known else f"backend {backend_name!r} failed: {type(error).__name__}: {error}"
        sender.send(("error", stage, type(error).__name__ if known else "BackendError", message))
    finally:
        sender.close()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        description = signal.strsignal(number) or ""
        return f"killed by {name}" + (f" ({description.lower()})" if description else "")
    if exitcode is None:
        return "gone without an exit status"
    return f"exited with status {exitcode} without reporting a result"


def _stop(process: Any) -> None:
    if process.is_alive():
        process.terminate()
        process.join(_TERMINATE_GRACE)
    if process.is_alive():  # it ignored SIGTERM (or is stuck in native code): kill it
        process.kill()
        process.join()


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
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_worker,
        args=(sender, backend_name, model, dict(feeds), dict(options or {}), factories),
        name=f"portable-moe-{backend_name}",
        daemon=True,  # never outlives the caller
    )
    try:
        process.start()
    except Exception as error:  # pickling the model, feeds or options failed
        receiver.close()
        sender.close()
        raise BackendError(
            f"cannot hand the work to a worker process for backend {backend_name!r}: {type(error).__name__}: {error}"
        ) from None
    sender.close()  # so that the worker's death reads as end-of-file here
    stage, deadline = "start", None
    try:
        while True:
            if deadline is None:
                wait = start_timeout if stage == "start" else None
            else:
                wait = max(0.0, deadline - time.monotonic())
            if not receiver.poll(wait):
                late = (
                    f"did not start within {start_timeout:g} s"
                    if stage == "start"
                    else f"did not finish compile and run within {timeout:g} s (stuck in {stage})"
                )
                return WorkerOutcome(
                    TIMED_OUT, stage, f"backend {backend_name!r} {late}; its worker process was stopped"
                )
            try:
                message = receiver.recv()
            except EOFError:
                process.join(_TERMINATE_GRACE)
                return WorkerOutcome(
                    CRASHED,
                    stage,
                    f"backend {backend_name!r} crashed during {stage}: its worker process was "
                    f"{_describe_exit(process.exitcode)}",
                )
            if message[0] == "stage":
                if stage == "start" and timeout is not None:
                    deadline = time.monotonic() + timeout
                stage = message[1]
            elif message[0] == "done":
                return WorkerOutcome(RAN, stage, outputs=message[1], placement=message[2])
            else:
                _, stage, error_class, text = message
                return WorkerOutcome(FAILED, stage, text, error_class)
    finally:
        _stop(process)
        receiver.close()


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
