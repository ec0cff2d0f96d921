"""One pool of worker processes for work that may crash or hang: the op suite, isolated runs, fuzzing.

Vendor runtimes are native code: a driver bug can segfault or hang, and in-process that takes the
caller down with it. A :class:`WorkerPool` runs tasks in ``spawn``-ed worker processes (no state
inherited from the caller), each task under a timeout; a worker that crashes or hangs is killed
and replaced, and its task comes back as the caller's ``lost(task, LostTask)`` says, with how the
worker ended, the stage the task had reported (:func:`note_stage`) and the innermost Python frame
faulthandler wrote for a crash.

The pool takes the task function as a parameter: ``task_function(task, state)`` runs in the worker
and returns the task's outcome; ``state`` is what ``setup(argument)`` returned once at the
worker's start (or ``argument`` itself without ``setup``). Both functions, the tasks, the
argument and the outcomes travel by pickle: use module-level functions. Workers find backends
through entry points (they get the caller's ``sys.path``) and get the backends registered in
this process whose factory pickles. Scripts that use a pool must guard their top level with
``if __name__ == "__main__":``, as "spawn" requires.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Generic, TypeVar

from portable_moe import registry
from portable_moe.errors import BackendError, InputError
from portable_moe.run.termination import release_stopping_signals, stopping_signals_held
from portable_moe.statuses import Status

TaskT = TypeVar("TaskT")
OutcomeT = TypeVar("OutcomeT")

# Starting a worker means a fresh interpreter importing numpy, onnx and the backend, then running
# ``setup``: not a task's fault if slow, so it has its own generous limit, separate from the task timeout.
START_TIMEOUT = 120.0
# Workers that die before they can take a task, this many in a row, point at a broken setup.
MAX_START_FAILURES = 2
CRASHED, TIMED_OUT, RAISED = Status.CRASHED, Status.TIMED_OUT, Status.RAISED

# The worker's end of its connection, for note_stage (None outside a worker).
_connection: Connection | None = None


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, for messages: ``killed by SIGSEGV (segmentation fault)``, ``exited with status 1``."""
    if exitcode is None:
        return "gone without an exit status"
    if exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        description = signal.strsignal(number) or ""
        return f"killed by {name}" + (f" ({description.lower()})" if description else "")
    return f"exited with status {exitcode}"


class WorkerStartError(BackendError):
    """Worker processes kept dying (or hanging) before they could take a task.

    Attributes:
        kind: "crashed" or "timed-out", for the last worker that failed.
        how: how it ended (:func:`describe_exit`), or the start timeout in words.
    """

    def __init__(self, message: str, kind: Status, how: str) -> None:
        super().__init__(message)
        self.kind, self.how = kind, how


@dataclass(frozen=True)
class LostTask:
    """Why a task came back without an outcome.

    Attributes:
        kind: "crashed" (the worker died), "timed-out" (killed at the deadline) or "raised" (the
            task function raised instead of returning an outcome).
        how: for "crashed", how the worker ended (:func:`describe_exit`); for "raised", the error.
        stage: the last stage the task reported with :func:`note_stage` ("" when none).
        seconds: the limit that ran out, for "timed-out".
        frame: for "crashed", the innermost Python frame faulthandler wrote ("" when none).
    """

    kind: Status
    how: str = ""
    stage: str = ""
    seconds: float = 0.0
    frame: str = ""


def note_stage(stage: str) -> None:
    """Tell the pool which stage the running task has reached (a no-op outside a worker)."""
    if _connection is not None:
        _connection.send(("stage", stage))


def _worker_main(
    connection: Connection,
    task_function: Callable[[Any, Any], Any],
    setup: Callable[[Any], Any] | None,
    argument: Any,
    log_path: str,
    factories: bytes,
) -> None:
    """A worker: register the parent's backends, set up, then run tasks until told to stop."""
    global _connection
    import faulthandler

    import numpy as np

    log = open(log_path, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)
    # Backends print from C (ORT's logger, a crash report): keep it off the user's terminal.
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(log)  # on SIGSEGV, the Python stack goes to the log; the parent reads it
    with contextlib.suppress(ValueError):  # the parent handles Ctrl-C and stops the workers
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    release_stopping_signals()  # held while the process started (a Ctrl-C then is dropped, as ignored)
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    for name, factory in pickle.loads(factories).items():
        registry.register_backend(name, factory)
    state = setup(argument) if setup is not None else argument
    _connection = connection
    try:
        connection.send(("ready", os.getpid()))
        while True:
            task = connection.recv()
            if task is None:
                return
            try:
                outcome = task_function(task, state)
            except Exception as error:  # the caller's lost() decides what a raising task means
                connection.send(("raised", f"{type(error).__name__}: {error}"))
                continue
            connection.send(("result", outcome))
    except (EOFError, OSError):
        # The pool's process ended without closing the pool (killed, or a process that never runs
        # its exit handlers, as a Ray worker at shutdown): nobody else will remove its directory.
        shutil.rmtree(Path(log_path).parent, ignore_errors=True)


def _last_frame(log_path: Path) -> str:
    """The innermost Python frame faulthandler wrote for a crash, if any."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for position in range(len(lines) - 1, -1, -1):
        if "most recent call first" in lines[position]:
            frames = [line.strip() for line in lines[position + 1 :] if line.strip().startswith("File ")]
            return frames[0] if frames else ""
    return ""


def _log_tail(log_path: Path, characters: int = 600) -> str:
    try:
        return log_path.read_text(errors="replace")[-characters:].strip()
    except OSError:
        return ""


class _Worker:
    """One worker process and the task it is running."""

    def __init__(self, pool: WorkerPool[Any, Any], serial: int) -> None:
        self.log_path = pool.directory / f"worker-{serial}.log"
        parent_end, child_end = pool.context.Pipe()
        self.process = pool.context.Process(
            target=_worker_main,
            args=(child_end, pool.task_function, pool.setup, pool.argument, str(self.log_path), pool.factories),
            name=f"{pool.name}-{serial}",
            daemon=True,  # never outlives the caller
        )
        try:
            with stopping_signals_held():  # until the worker ignores Ctrl-C
                self.process.start()
        except Exception as error:  # pickling the function, the argument or a factory failed
            parent_end.close()
            child_end.close()
            raise BackendError(
                f"cannot hand the work to a worker process: {type(error).__name__}: {error}; pass module-level "
                "functions and picklable values"
            ) from None
        child_end.close()
        self.connection = parent_end
        self.ready = False
        self.index: int | None = None
        self.task: Any = None
        self.stage = ""
        self.limit = 0.0  # the running task's timeout
        self.deadline = time.monotonic() + pool.start_timeout

    def start_task(self, index: int, task: Any, timeout: float | None) -> None:
        self.index, self.task, self.stage = index, task, ""
        self.limit = math.inf if timeout is None else timeout
        self.deadline = time.monotonic() + self.limit
        self.connection.send(task)

    def finish_task(self) -> None:
        self.index, self.task = None, None
        self.deadline = math.inf

    def exit_description(self) -> str:
        self.process.join(5)
        return "stopped responding" if self.process.exitcode is None else describe_exit(self.process.exitcode)

    def stop(self, kill: bool = False) -> None:
        if not kill and self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.connection.send(None)
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.connection.close()


class WorkerPool(Generic[TaskT, OutcomeT]):
    """Worker processes that run tasks with a per-task timeout, replacing any worker that crashes or hangs.

    Use as a context manager; :meth:`close` stops the workers and removes their logs.

    Args:
        task_function: ``(task, state) -> outcome``, run in a worker for each task.
        lost: ``(task, LostTask) -> outcome``, run here for a task whose worker crashed or hung,
            or whose function raised.
        jobs: worker processes (at least 1).
        timeout: seconds each task may take (None: no limit).
        setup: ``argument -> state``, run once in each worker before its first task.
        argument: what ``setup`` is given (or the state itself without ``setup``).
        start_timeout: seconds a worker may take to start and set up.
        max_start_failures: workers that may fail to start in a row before :meth:`run` raises
            :class:`WorkerStartError`.
        factories: the in-process backend registrations to send to the workers (None: every one
            whose factory pickles; see :attr:`unpicklable` for the others).
        name: worker process names are ``NAME-N``.
        directory: where the workers' logs go, with any files of the caller's that the workers
            read (None: a new temporary directory). The pool owns it: :meth:`close` removes it, and
            so do the workers if the pool's process ends without closing the pool.

    Raises:
        InputError: for ``jobs`` below 1 or a timeout that is not positive.
    """

    def __init__(
        self,
        task_function: Callable[[TaskT, Any], OutcomeT],
        lost: Callable[[TaskT, LostTask], OutcomeT],
        jobs: int = 1,
        timeout: float | None = None,
        *,
        setup: Callable[[Any], Any] | None = None,
        argument: Any = None,
        start_timeout: float = START_TIMEOUT,
        max_start_failures: int = MAX_START_FAILURES,
        factories: Mapping[str, Any] | None = None,
        name: str = "portable-moe-worker",
        directory: Path | None = None,
    ) -> None:
        if jobs < 1:
            raise InputError(f"--jobs must be at least 1 for worker processes, got {jobs}")
        if timeout is not None and not timeout > 0:
            raise InputError(f"--timeout must be a positive number of seconds, got {timeout}")
        self.task_function, self.lost, self.setup, self.argument = task_function, lost, setup, argument
        self.jobs, self.timeout, self.start_timeout, self.name = jobs, timeout, start_timeout, name
        self.max_start_failures = max_start_failures
        self.context = multiprocessing.get_context("spawn")
        self.directory = Path(tempfile.mkdtemp(prefix=f"{name}-")) if directory is None else directory
        self.unpicklable: dict[str, str] = {}
        sendable = {}
        for backend, factory in (registry.in_process_factories() if factories is None else factories).items():
            try:
                pickle.dumps(factory)
                sendable[backend] = factory
            except Exception as error:
                self.unpicklable[backend] = f"{type(error).__name__}: {error}"
        self.factories = pickle.dumps(sendable)
        self._workers: list[_Worker] = []
        self._serial = 0
        self._start_failures = 0

    def __enter__(self) -> WorkerPool[TaskT, OutcomeT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        self._serial += 1
        return _Worker(self, self._serial)

    def _replace(self, worker: _Worker, kill: bool) -> None:
        worker.stop(kill=kill)
        self._workers[self._workers.index(worker)] = self._spawn()

    def run(
        self,
        tasks: Sequence[TaskT],
        on_result: Callable[[OutcomeT], None] | None = None,
        timeout: float | None = None,
    ) -> list[OutcomeT]:
        """Run ``tasks`` on the workers; return one outcome per task, in the order given.

        ``timeout`` replaces the pool's per-task timeout for these tasks.

        Raises:
            WorkerStartError: if worker processes keep dying before they can take a task (a broken
                installation), with the end of the worker's log.
        """
        while len(self._workers) < min(self.jobs, len(tasks)):
            self._workers.append(self._spawn())
        pending = deque(enumerate(tasks))
        results: list[Any] = [None] * len(tasks)
        done = [False] * len(tasks)

        def record(index: int, outcome: OutcomeT) -> None:
            results[index], done[index] = outcome, True
            if on_result is not None:
                on_result(outcome)

        limit = timeout if timeout is not None else self.timeout
        while pending or any(worker.task is not None for worker in self._workers):
            for worker in list(self._workers):
                if worker.ready and worker.task is None and pending:
                    index, task = pending.popleft()
                    try:
                        worker.start_task(index, task, limit)
                    except OSError:  # it died while idle: not this task's doing, so the task waits for another
                        worker.finish_task()
                        pending.appendleft((index, task))
                        self._replace(worker, kill=True)
            waiting = [w for w in self._workers if w.task is not None or (not w.ready and pending)]
            if not waiting:
                continue
            soonest = min(worker.deadline for worker in waiting)
            by_connection = {worker.connection: worker for worker in waiting}
            patience = None if soonest == math.inf else max(0.0, soonest - time.monotonic())
            for connection in wait(list(by_connection), timeout=patience):
                worker = by_connection[connection]
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    self._worker_died(worker, record)
                    continue
                if message[0] == "ready":
                    worker.ready = True
                    worker.deadline = math.inf
                    self._start_failures = 0
                elif message[0] == "stage":
                    worker.stage = message[1]
                else:
                    index, task = worker.index, worker.task
                    worker.finish_task()
                    if message[0] == "result":
                        record(index, message[1])
                    else:
                        record(index, self.lost(task, LostTask(RAISED, message[1], worker.stage)))
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.deadline > now:
                    continue
                if worker.task is None:
                    self._start_failed(worker, f"did not start within {self.start_timeout:g} s", TIMED_OUT)
                    continue
                record(worker.index, self.lost(worker.task, LostTask(TIMED_OUT, "", worker.stage, worker.limit)))
                self._replace(worker, kill=True)
        return [outcome for outcome, finished in zip(results, done) if finished]

    def _worker_died(self, worker: _Worker, record: Callable[[int, Any], None]) -> None:
        how = worker.exit_description()
        if not worker.ready:
            self._start_failed(worker, how, CRASHED)
            return
        if worker.task is None:  # died while idle
            self._replace(worker, kill=True)
            return
        lost = LostTask(CRASHED, how, worker.stage, 0.0, _last_frame(worker.log_path))
        record(worker.index, self.lost(worker.task, lost))
        self._replace(worker, kill=True)

    def _start_failed(self, worker: _Worker, how: str, kind: Status) -> None:
        self._start_failures += 1
        tail = _log_tail(worker.log_path)
        if self._start_failures >= self.max_start_failures:
            worker.stop(kill=True)
            self._workers.remove(worker)
            raise WorkerStartError(
                f"worker processes {how} before taking a task ({self._start_failures} in a row); "
                f"end of the worker log: {tail or '(empty)'}",
                kind,
                how,
            )
        self._replace(worker, kill=True)

    def close(self) -> None:
        """Stop every worker and remove their logs."""
        for worker in self._workers:
            worker.stop()
        self._workers.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


__all__ = [
    "CRASHED",
    "MAX_START_FAILURES",
    "RAISED",
    "START_TIMEOUT",
    "TIMED_OUT",
    "LostTask",
    "WorkerPool",
    "WorkerStartError",
    "describe_exit",
    "note_stage",
]
