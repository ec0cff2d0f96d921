"""Op cases and model checks on worker processes: the one worker pool with the op suite's task function.

A crash or a hang loses one case, not the run: the pool (:mod:`portable_moe.run.pool`) replaces the
worker and the case ends as an error (the worker died) or a timeout. Each worker loads the cases
once, from a file the pool writes, and applies its backend's expected failures to each result.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from portable_moe import registry
from portable_moe.conformance.ops.cases import (
    DEFAULT_TIMEOUT,
    ERROR,
    MODEL_OP,
    TIMEOUT,
    CaseResult,
    ErrorKind,
    ModelTask,
    OpCase,
    OpTask,
    Task,
)
from portable_moe.conformance.ops.running import describe_error, run_task, settle_expected
from portable_moe.errors import BackendError, BackendUnavailableError, InputError
from portable_moe.run.pool import CRASHED, TIMED_OUT, LostTask, WorkerPool


def _load_cases(cases_file: str) -> dict[str, OpCase]:
    """A worker's setup: the cases, by name."""
    with open(cases_file, "rb") as file:
        return {case.name: case for case in pickle.load(file)}


def _run_in_worker(task: Task, cases: dict[str, OpCase]) -> CaseResult:
    """The pool's task function: one case or model check, with the backend's expected failures applied."""
    try:
        return settle_expected(run_task(task, cases))
    except Exception as error:  # e.g. the backend vanished from the registry in this process
        return CaseResult(task.name, "", task.backend, ERROR, describe_error(error))


class OpPool:
    """Op cases and model checks on worker processes, with a per-task timeout; see the module docstring.

    Use as a context manager; :meth:`close` stops the workers and removes the temporary files.
    """

    def __init__(self, cases: Sequence[OpCase], jobs: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not timeout > 0:
            raise InputError(f"--timeout must be a positive number of seconds, got {timeout}")
        self.directory = Path(tempfile.mkdtemp(prefix="portable-moe-opsuite-"))
        cases_file = self.directory / "cases.pickle"
        with open(cases_file, "wb") as file:
            pickle.dump(list(cases), file, protocol=pickle.HIGHEST_PROTOCOL)
        self._ops = {case.name: case.op for case in cases}
        try:
            self._pool = WorkerPool(
                _run_in_worker,
                self._lost,
                jobs,
                timeout,
                setup=_load_cases,
                argument=str(cases_file),
                name="portable-moe-opsuite",
                # One directory for the cases and the workers' logs: the pool removes it, or its workers
                # do if this process ends without closing the pool (a Ray worker at shutdown).
                directory=self.directory,
            )
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def __enter__(self) -> OpPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(
        self,
        tasks: Sequence[Task],
        on_result: Callable[[CaseResult], None] | None = None,
        timeout: float | None = None,
    ) -> list[CaseResult]:
        """Run ``tasks`` on the workers; return one result per task, in the order given.

        ``timeout`` replaces the pool's per-task timeout for these tasks (model checks need more).

        Raises:
            BackendError: for a backend registered in this process that cannot be sent to a worker,
                or when worker processes keep dying before they can take a task.
        """
        unsendable = sorted({task.backend for task in tasks} & set(self._pool.unpicklable))
        if unsendable:
            name = unsendable[0]
            raise BackendError(
                f"backend {name!r} was registered in this process with a factory that cannot be sent to a worker "
                f"process ({self._pool.unpicklable[name]}); register it through an entry point or with a "
                "module-level class, or run in this process (--jobs 0)"
            )
        return self._pool.run(tasks, on_result, timeout)

    def _lost(self, task: Task, lost: LostTask) -> CaseResult:
        """The result of a task whose worker crashed (an error) or ran past its limit (a timeout)."""
        op = MODEL_OP if isinstance(task, ModelTask) else self._ops.get(task.case, "")
        if lost.kind == TIMED_OUT:
            reason = f"ran past the time limit of {lost.seconds:g} s; the worker was killed and replaced"
            outcome = CaseResult(
                task.name,
                op,
                task.backend,
                TIMEOUT,
                reason,
                lost.seconds,
                details={"time_limit_s": lost.seconds},
                code=ErrorKind.TIMEOUT,
            )
        elif lost.kind == CRASHED:
            how = f"was {lost.how}" if lost.how.startswith("killed") else lost.how
            reason = f"the worker process {how} while running this case" + (f" (at {lost.frame})" if lost.frame else "")
            outcome = CaseResult(task.name, op, task.backend, ERROR, reason, code=ErrorKind.CRASH)
        else:
            outcome = CaseResult(task.name, op, task.backend, ERROR, lost.how)
        return settle_expected(outcome)

    def close(self) -> None:
        """Stop every worker and remove the temporary files (the pool owns their directory)."""
        self._pool.close()


def run_tasks(
    tasks: Sequence[Task],
    cases: Sequence[OpCase],
    jobs: int,
    timeout: float = DEFAULT_TIMEOUT,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run tasks in ``jobs`` worker processes, or in this process when ``jobs`` is 0.

    In this process there is no crash isolation and no timeout (useful for debugging and for
    backends registered in-process). Either way each op case's result has its backend's expected
    failures applied (:func:`~portable_moe.conformance.ops.running.settle_expected`).
    """
    if jobs == 0:
        by_name = {case.name: case for case in cases}
        results = []
        for task in tasks:
            results.append(settle_expected(run_task(task, by_name)))
            if on_result is not None:
                on_result(results[-1])
        return results
    with OpPool(cases, jobs, timeout) as pool:
        return pool.run(tasks, on_result)


def op_tasks(cases: Sequence[OpCase], backend_names: Sequence[str], strict: bool = False) -> list[OpTask]:
    """One task per (case, backend), case-major, so every backend advances together.

    With ``strict`` every case is judged by its own tolerance (no tolerance overrides).
    """
    return [OpTask(name, case.name, strict) for case in cases for name in backend_names]


def resolve_backends(spec: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Backend names to run and ``(name, reason)`` for those left out.

    ``all`` means every available backend (unavailable ones are left out with their reason);
    otherwise every named backend must be available.

    Raises:
        BackendError: for an unknown name or a malformed list.
        BackendUnavailableError: if a named backend cannot run here.
    """

    names = registry.backend_names() if spec == "all" else registry.parse_backend_list(spec)
    chosen, left_out = [], []
    for name in names:
        probe = registry.get_backend(name).safe_probe()
        if probe.available:
            chosen.append(name)
        elif spec == "all":
            left_out.append((name, probe.reason))
        else:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {probe.reason}")
    if not chosen:
        raise BackendUnavailableError(f"no backend in {spec!r} is available")
    return chosen, left_out
