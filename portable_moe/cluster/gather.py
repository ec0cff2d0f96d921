"""Waiting for a matrix of Ray tasks: results as they come, node deaths, Ctrl-C.

Ray itself retries a task whose node dies on another node with the same resource (``max_retries``).
What Ray does not do is give up when no node with that resource is left: the task would wait
forever. :func:`gather` watches for that, cancels such tasks and reports them as infrastructure
errors naming the nodes that died. Any other failure of the machinery (a worker process that
crashed, an object lost with its node) is an infrastructure error too; an exception raised by the
task body itself is the task's error. Neither is ever a conformance failure.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from portable_moe.cluster.nodes import ClusterNode, cluster_nodes
from portable_moe.errors import InputError

INFRASTRUCTURE = "infrastructure error"
# Ray retries a task whose node died this many times (each time on a node offering its backend).
NODE_FAILURE_RETRIES = 3
_POLL_SECONDS = 0.5
_CANCEL_SECONDS = 30.0
_CONNECT_SECONDS = 5.0


@dataclass(frozen=True)
class Submitted:
    """A task in flight: its object reference, the backend it needs, and the caller's key for it."""

    reference: Any
    backend: str
    key: Any


@dataclass(frozen=True)
class TaskOutcome:
    """How a task ended: its value, or why it has none.

    Attributes:
        value: what the task returned (None when it did not finish).
        error: the task body raised; its message.
        infrastructure: the cluster failed the task (a node died, a worker crashed); what happened.
    """

    value: Any = None
    error: str = ""
    infrastructure: str = ""


@contextlib.contextmanager
def connected(address: str) -> Iterator[None]:
    """Connect this process to the Ray cluster at ``address`` (``auto``: the one running locally).

    An existing connection (``ray.init`` done by the caller) is used as it is and left open.

    Raises:
        InputError: if Ray is not installed or the cluster cannot be reached.
    """
    try:
        import ray
    except ImportError:
        raise InputError(
            "--cluster needs Ray on this machine: pip install 'portable-moe[cluster]' (see docs/cluster.md)"
        ) from None
    if ray.is_initialized():
        yield
        return
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"cannot connect to the Ray cluster at {address!r} ({first_line}); give the head node's address "
            "(HOST:6379) or start a cluster with 'portable-moe worker --head'"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Refuse an address nothing listens on at once (Ray itself keeps retrying for minutes)."""
    if address == "auto":
        return
    host, _, port_text = address.removeprefix("ray://").rpartition(":")
    if not host or not port_text.isdigit():
        raise InputError(f"--cluster {address!r}: give the head node's HOST:PORT (e.g. 10.0.0.1:6379) or 'auto'")
    try:
        socket.create_connection((host, int(port_text)), timeout=_CONNECT_SECONDS).close()
    except OSError as error:
        raise InputError(
            f"cannot connect to the Ray cluster at {address!r} ({error.strerror or error}); is the head node "
            "running ('portable-moe worker --head') and the port open?"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _died_since(start: Sequence[ClusterNode], now: Sequence[ClusterNode]) -> list[ClusterNode]:
    alive_now = {node.node_id for node in now if node.alive}
    return [node for node in start if node.alive and node.node_id not in alive_now]


def gather(
    submitted: Sequence[Submitted],
    on_outcome: Callable[[Submitted, TaskOutcome], None],
    nodes_at_start: Sequence[ClusterNode],
    poll_seconds: float = _POLL_SECONDS,
) -> None:
    """Wait for every task, calling ``on_outcome`` once per task as it ends.

    A task whose backend no alive node offers any more is cancelled and ends as an
    infrastructure error naming the nodes that died. On KeyboardInterrupt (Ctrl-C), every
    unfinished task is cancelled before the interrupt goes on.
    """
    import ray
    from ray.exceptions import RayTaskError, TaskCancelledError

    pending = {job.reference: job for job in submitted}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_seconds)
            if ready:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for reference in ready:
                job = pending.pop(reference)
                try:
                    outcome = TaskOutcome(value=ray.get(reference))
                except RayTaskError as error:  # the task body raised: its own error, not the cluster's
                    outcome = TaskOutcome(error=_first_line(error.cause) if error.cause else _first_line(error))
                except TaskCancelledError:
                    continue  # only this function cancels, and it reports those tasks itself
                except ray.exceptions.RayError as error:
                    outcome = TaskOutcome(infrastructure=_infrastructure_reason(error, nodes_at_start))
                on_outcome(job, outcome)
            if not ready and pending:
                _cancel_stranded(pending, on_outcome, nodes_at_start)
    except KeyboardInterrupt:
        cancel(list(pending))
        raise


def cancel(references: Sequence[Any], seconds: float = _CANCEL_SECONDS) -> None:
    """Cancel tasks (killing their workers) and wait until Ray confirms each, for at most ``seconds``.

    A cancel that arrives while Ray hands the task to a worker can be lost (seen with Ray 2.60
    about one time in ten), so it is repeated until the task ends.
    """
    import ray

    remaining = list(references)
    deadline = time.monotonic() + seconds
    while remaining and time.monotonic() < deadline:
        for reference in remaining:
            ray.cancel(reference, force=True)
        _, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=_POLL_SECONDS)


def _infrastructure_reason(error: BaseException, nodes_at_start: Sequence[ClusterNode]) -> str:
    died = _died_since(nodes_at_start, cluster_nodes())
    where = f"; node(s) that died during the run: {', '.join(n.describe() for n in died)}" if died else ""
    return f"{INFRASTRUCTURE}: {_first_line(error)}{where}"


def _cancel_stranded(
    pending: dict[Any, Submitted],
    on_outcome: Callable[[Submitted, TaskOutcome], None],
    nodes_at_start: Sequence[ClusterNode],
) -> None:
    now = cluster_nodes()
    died = _died_since(nodes_at_start, now)
    if not died:
        return
    offered = {name for node in now if node.alive for name in node.backends}
    for reference, job in list(pending.items()):
        if job.backend in offered:
            continue  # Ray retries it on a node that still offers the backend
        lost = [node.describe() for node in died if job.backend in node.backends] or [n.describe() for n in died]
        cancel([reference])
        del pending[reference]
        on_outcome(
            job,
            TaskOutcome(
                infrastructure=f"{INFRASTRUCTURE}: node {', '.join(lost)} died during the run and no other node "
                f"offers backend {job.backend!r}; the task was cancelled"
            ),
        )
