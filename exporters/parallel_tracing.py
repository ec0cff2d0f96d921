"""Tracing the parts of a layer-wise export side by side, in processes forked from the exporting one.

Layer-wise export (:mod:`exporters.layer_graphs`) traces the prologue, one layer of each kind and
the head, each its own ``torch.onnx.export``: they share nothing, and each takes seconds of one core.
Where this process may use two cores or more, it traces the first part (a short one) itself, then
the others side by side: the longest in child processes, at most one fewer than the usable cores,
while it traces the shortest itself. A child is forked when its part's turn comes, so it starts with
everything the exporting process holds: torch, the exporter and
torch.onnx's op registry loaded, the exporter's first-use set-up done by the first part (see
:func:`exporters.torch_onnx_shortcuts.reused_op_registry`), nothing imported or built again. It traces its part
and sends the graph back (ONNX bytes, through a pipe); the exporting process merges the parts in
their own order, so the model is the same however many processes traced it.

A child runs torch with one thread: torch's OpenMP thread pool, used in the exporting process by
the golden run, does not exist in a forked child, and an OpenMP parallel region there could wait
for it for ever; one thread never enters one (torch's DataLoader does the same in its workers).
A child that raises, crashes or is killed makes the export fail with the part's name and the
cause. Ctrl-C and SIGTERM stop the export as before: the exporting process kills and reaps its
children on the way out, and each child also dies of the signal itself where the signal reaches
it (Ctrl-C reaches the whole process group).

``PORTABLE_MOE_PARALLEL_TRACING=0`` traces every part in the exporting process, one after the
other; ``=N`` lets at most N processes trace (the default: one per usable core). Inside a pytest-xdist worker the usable cores are shared out among the workers, so a test
run that already keeps every core busy traces in its workers' own processes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from portable_moe.errors import ExportError
from portable_moe.run.pool import describe_exit
from portable_moe.run.termination import STOPPING_SIGNALS, release_stopping_signals, stopping_signals_held

ENVIRONMENT_VARIABLE = "PORTABLE_MOE_PARALLEL_TRACING"


class TracingFailed(Exception):
    """Tracing one part failed: the message names the part and the cause (a raise or how its process ended)."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), divided among pytest-xdist's workers inside one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cores = os.cpu_count() or 1
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if os.environ.get("PYTEST_XDIST_WORKER") and workers.isdigit() and int(workers) > 0:
        cores //= int(workers)
    return max(1, cores)


def tracing_processes(parts: int) -> int:
    """How many processes trace ``parts`` parts: 1 means in the exporting process itself.

    ``PORTABLE_MOE_PARALLEL_TRACING=N`` sets the most (0 or 1: trace in the exporting process);
    unset, one per usable core (:func:`usable_cores`). Never more than the parts, and 1 on a
    platform that cannot fork.

    Raises:
        ExportError: if ``PORTABLE_MOE_PARALLEL_TRACING`` is set to something other than a whole number.
    """
    setting = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if setting and not setting.isdigit():
        raise ExportError(
            f"{ENVIRONMENT_VARIABLE} is {os.environ[ENVIRONMENT_VARIABLE]!r}; set it to the most processes that "
            "may trace (0 or 1: in the exporting process only), or leave it unset for one per usable core"
        )
    limit = int(setting) if setting else usable_cores()
    if not hasattr(os, "fork"):
        return 1
    return max(1, min(parts, limit))


def run_traces(
    tasks: Sequence[Callable[[], bytes]], labels: Sequence[str], progress: Callable[[str], None] | None = None
) -> list[bytes]:
    """Run every task (tracing one part, returning its graph's bytes), in parallel where it pays.

    Args:
        tasks: one per part. The first runs in this process before any child is forked: its
            ``torch.onnx.export`` builds the op registry and warms the caches that every trace
            fills on first use (about 2 s of CPU that each child would otherwise pay again), so
            it should be a short one; give the others longest first: children take them from the
            front, this process from the back.
        labels: each task's part in words (``layer kind 1 (first at layer 1)``), for messages.
        progress: told how many processes trace, when more than one.

    Returns:
        Each task's bytes, in the order of ``tasks``.

    Raises:
        ExportError: a task raised one (its message kept).
        TracingFailed: a task raised anything else, or its process ended without sending its graph.
    """
    processes = tracing_processes(len(tasks))
    if processes == 1:
        return [_traced_here(task, label) for task, label in zip(tasks, labels)]
    first = _traced_here(tasks[0], labels[0])
    processes = min(processes, len(tasks) - 1)  # this process traces at least one of the others itself
    if progress is not None and processes > 1:
        progress(f"tracing the other {len(tasks) - 1} parts in {processes} processes side by side")
    return [first, *_traced_side_by_side(tasks[1:], labels[1:], processes)]


def _traced_here(task: Callable[[], bytes], label: str) -> bytes:
    try:
        return task()
    except ExportError:
        raise
    except Exception as error:
        raise TracingFailed(f"tracing {label}: {type(error).__name__}: {error}") from error


def _traced_side_by_side(tasks: Sequence[Callable[[], bytes]], labels: Sequence[str], processes: int) -> list[bytes]:
    """Trace in this process and in up to ``processes - 1`` children at a time; collect what each child sends back.

    Children take the tasks from the front (the longest), this process from the back (the shortest)
    while its children run: its own traces need no fork and no warming up again.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("fork")
    pending = deque(range(len(tasks)))
    running: dict[Any, tuple[int, Any]] = {}  # the receiving end of each child's pipe -> (task, process)
    results: list[bytes] = [b""] * len(tasks)
    try:
        while pending or running:
            while pending and len(running) < processes - 1:
                index = pending.popleft()
                receiver, sender = context.Pipe(duplex=False)
                child = context.Process(target=_child_main, args=(tasks[index], sender), daemon=True)
                running[receiver] = (index, child)  # before it starts: an interrupt then still finds it
                with stopping_signals_held():  # until the child has its own handlers
                    child.start()
                sender.close()  # the child holds its own: at its exit, the parent reads end of file
            if pending:
                index = pending.pop()
                results[index] = _traced_here(tasks[index], labels[index])
            for receiver in wait(list(running), timeout=0 if pending else None):
                index, child = running.pop(receiver)
                try:
                    outcome = receiver.recv()
                except (EOFError, OSError):
                    outcome = None
                finally:
                    receiver.close()
                child.join()
                results[index] = _result(outcome, labels[index], child.exitcode)
    finally:
        for receiver, (_, child) in running.items():
            if child.pid is not None:  # started
                child.kill()
                child.join()
            receiver.close()
    return results


def _result(outcome: tuple[str, Any] | None, label: str, exitcode: int | None) -> bytes:
    """What a child sent: its graph, or the error it reported, or how it ended without sending either."""
    if outcome is None and exitcode == -signal.SIGINT:
        # Ctrl-C reaches the whole process group; the child may die of it before this process's own
        # KeyboardInterrupt is raised. Either way the export was interrupted, not broken.
        raise KeyboardInterrupt(f"tracing {label} was interrupted")
    if outcome is None:
        raise TracingFailed(f"tracing {label}: its process ended ({describe_exit(exitcode)}) before it sent the graph")
    kind, payload = outcome
    if kind == "graph":
        return payload
    if kind == "export-error":
        raise ExportError(payload)
    raise TracingFailed(f"tracing {label}: {payload}")


def _child_main(task: Callable[[], bytes], sender: Any) -> None:
    """In the forked child: trace, send ``("graph", bytes)`` or the error, and leave at once.

    ``os._exit``: the child must not run the exporting process's exit handlers or finalizers (a
    bundle's staging directory is the parent's to remove).
    """
    status = 0
    try:
        # Ctrl-C and SIGTERM end the child quietly (the parent's handlers would raise into the trace);
        # a signal the parent ignores stays ignored.
        for number in STOPPING_SIGNALS:
            if signal.getsignal(number) is not signal.SIG_IGN:
                signal.signal(number, signal.SIG_DFL)
        release_stopping_signals()  # one sent since the fork kills the child now
        # Another thread of the parent (a progress display) may have held the streams' locks at the fork.
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives until os._exit)
        # What C code writes (a warning of torch's) goes there too, not to the parent's terminal or pipes.
        os.dup2(sys.stdout.fileno(), 1)
        os.dup2(sys.stdout.fileno(), 2)
        torch = sys.modules.get("torch")  # loaded in the exporting process; threads matter only then
        if torch is not None:
            torch.set_num_threads(1)
        try:
            outcome: tuple[str, Any] = ("graph", task())
        except ExportError as error:
            outcome = ("export-error", str(error))
        except BaseException as error:
            outcome = ("failed", f"{type(error).__name__}: {error}")
        sender.send(outcome)
    except BaseException:
        status = 1
    finally:
        os._exit(status)
