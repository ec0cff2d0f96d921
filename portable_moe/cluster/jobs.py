"""The matrix as Ray tasks: one per (bundle, backend) check, per op-suite shard, per bench configuration.

Each task requests one CPU and one unit of its backend's resource, so Ray places it only on a node
that advertised the backend. The task bodies are the local functions: :func:`check_bundle` on the
bundle the node received and verified, the op suite's :func:`run_tasks` on a shard of cases (in a
worker process per shard, so a crashing case loses that case only, as locally), and
:func:`bench_compiled`. Each task returns its result with a stamp of the node it ran on.

Connect first (:func:`portable_moe.cluster.gather.connected`); every function here expects a
connection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from portable_moe.bundle import Bundle
from portable_moe.cluster.gather import NODE_FAILURE_RETRIES, Submitted, TaskOutcome, gather
from portable_moe.cluster.nodes import ClusterNode, backend_resource, cluster_nodes, this_node_stamp
from portable_moe.cluster.transfer import DEFAULT_CHUNK_BYTES, ShippedBundle, receive_bundle, ship_bundle
from portable_moe.conformance.model_check import ERROR, BackendResult, InputSet, check_bundle
from portable_moe.conformance.ops import DEFAULT_TIMEOUT, CaseResult, OpCase, OpPool, op_tasks, run_tasks
from portable_moe.errors import InputError

# Op-suite shards per CPU offering a backend: more than one keeps every CPU busy to the end, and a
# node that dies loses less work.
SHARDS_PER_CPU = 2


@dataclass
class ClusterRun:
    """The results of a matrix run on the cluster, and where each ran.

    Attributes:
        results: the results, in the order a local run gives them.
        stamps: per result, the node it ran on (:func:`~portable_moe.cluster.nodes.this_node_stamp`),
            or None when the task never finished on any node.
        infrastructure: per result, whether it is an infrastructure error (not a verdict on the backend).
        nodes: the cluster's nodes when the run started.
    """

    results: list[Any] = field(default_factory=list)
    stamps: list[dict[str, Any] | None] = field(default_factory=list)
    infrastructure: list[bool] = field(default_factory=list)
    nodes: list[ClusterNode] = field(default_factory=list)


def _task_options(backend: str) -> dict[str, Any]:
    return {
        "num_cpus": 1,
        "resources": {backend_resource(backend): 1},
        "max_retries": NODE_FAILURE_RETRIES,
        "retry_exceptions": False,  # a body that raises would raise again; only node failures are retried
    }


@functools.cache
def _remote(body: Callable[..., Any]) -> Any:
    import ray

    return ray.remote(body)


def _offered_nodes(backend_names: Sequence[str]) -> list[ClusterNode]:
    """The cluster's nodes, after checking that an alive node offers each backend."""
    from portable_moe.cluster.nodes import resolve_cluster_backends

    nodes = cluster_nodes()
    resolve_cluster_backends(",".join(backend_names), nodes)
    return nodes


# ---------------------------------------------------------------------------------------------
# Task bodies (run on the nodes)


def _check_task(
    shipped: ShippedBundle,
    backend: str,
    options: Mapping[str, Any] | None,
    input_sets: Sequence[InputSet] | None,
    bisect: str,
) -> tuple[BackendResult, dict[str, Any]]:
    stamp = this_node_stamp()
    bundle = receive_bundle(shipped, str(stamp["node_id"]))
    per_backend = {backend: dict(options)} if options else None
    return check_bundle(bundle, [backend], per_backend, input_sets=input_sets, bisect=bisect)[0], stamp


def _ops_shard_task(
    all_cases: list[Any], names: Sequence[str], backend: str, jobs: int, timeout: float
) -> tuple[list[CaseResult], dict[str, Any]]:
    """Run the cases ``names`` on ``backend``; ``all_cases`` holds the reference to every case of the run."""
    stamp = this_node_stamp()
    cases, pool = _cases_and_pool(all_cases[0], jobs, timeout)
    shard = [cases[name] for name in names]
    tasks = op_tasks(shard, [backend])
    return (pool.run(tasks, timeout=timeout) if pool else run_tasks(tasks, shard, 0)), stamp


# Per Ray worker process: the run's cases (by name) and, for jobs=1, one worker pool that every
# shard of the run reuses, so a case process is started once per Ray worker, not once per shard.
_run_cases: dict[str, tuple[dict[str, OpCase], OpPool | None]] = {}


def _cases_and_pool(reference: Any, jobs: int, timeout: float) -> tuple[dict[str, OpCase], OpPool | None]:
    import atexit

    import ray

    key = f"{reference.hex()}-{jobs}"
    if key not in _run_cases:
        for _, old_pool in _run_cases.values():  # a new run: the last one's pool is done
            if old_pool is not None:
                old_pool.close()
        _run_cases.clear()
        cases = ray.get(reference)
        pool = OpPool(cases, 1, timeout) if jobs else None
        if pool is not None:
            atexit.register(pool.close)
        _run_cases[key] = ({case.name: case for case in cases}, pool)
    return _run_cases[key]


def _bench_task(
    shipped: ShippedBundle,
    backend: str,
    options: Mapping[str, Any] | None,
    shape: tuple[int, int] | None,
    warmup: int,
    runs: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    from portable_moe.perf.bench import bench_compiled, token_feeds
    from portable_moe.registry import get_backend

    stamp = this_node_stamp()
    bundle = receive_bundle(shipped, str(stamp["node_id"]))
    feeds = bundle.golden_sets()[0][0] if shape is None else token_feeds(bundle, *shape)
    compiled = get_backend(backend).compile(bundle, options)
    timing = bench_compiled(compiled, feeds, warmup, runs)
    input_shape = list(next(iter(feeds.values())).shape)
    return {"backend": backend, "input_shape": input_shape, **timing.to_dict()}, stamp


# ---------------------------------------------------------------------------------------------
# Drivers


def check_on_cluster(
    bundle: Bundle,
    backend_names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    input_sets: Sequence[InputSet] | None = None,
    bisect: str = "never",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[str], None] | None = None,
) -> ClusterRun:
    """Check ``bundle`` on each backend, each as a Ray task on a node offering it.

    Args:
        bundle: a loaded bundle (shipped to the nodes through the object store).
        backend_names: backends to check; every one must be offered by an alive node.
        options: per-backend compile options, keyed by backend name.
        input_sets: (feeds, expected) pairs (see :func:`~portable_moe.conformance.model_check.input_sets_for`);
            default: the bundle's golden sets, read from the node's verified copy.
        bisect: "never", "failed" or "always".
        chunk_bytes: the largest piece of a file put in the object store at once.
        progress: called with a message as the bundle ships and as each backend finishes.

    Returns:
        One :class:`BackendResult` per backend, in the order given, with where each ran.

    Raises:
        BackendUnavailableError: if no alive node offers one of the backends (listing each node's offer).
        InputError: for a bad ``bisect`` or ``chunk_bytes``.
    """
    import ray

    if bisect not in ("never", "failed", "always"):
        raise InputError(f"bisect must be never, failed or always, got {bisect!r}")
    nodes = _offered_nodes(backend_names)
    if progress:
        progress(f"shipping {bundle.name} to the cluster's object store")
    shipped = ship_bundle(bundle, chunk_bytes)
    sets = ray.put(list(input_sets)) if input_sets is not None else None
    remote = _remote(_check_task)
    submitted = [
        Submitted(
            remote.options(**_task_options(name)).remote(shipped, name, (options or {}).get(name), sets, bisect),
            name,
            index,
        )
        for index, name in enumerate(backend_names)
    ]
    run = ClusterRun([None] * len(backend_names), [None] * len(backend_names), [False] * len(backend_names), nodes)

    def record(job: Submitted, outcome: TaskOutcome) -> None:
        if outcome.value is not None:
            run.results[job.key], run.stamps[job.key] = outcome.value
        else:
            run.results[job.key] = BackendResult(job.backend, ERROR, outcome.infrastructure or outcome.error)
            run.infrastructure[job.key] = bool(outcome.infrastructure)
        if progress:
            progress(f"{job.backend}: {run.results[job.key].status}")

    gather(submitted, record, nodes)
    return run


def _shards(cases: Sequence[OpCase], count: int) -> list[list[OpCase]]:
    """``count`` interleaved shards, so slow operators spread over every shard."""
    return [list(cases[start::count]) for start in range(count) if cases[start::count]]


def ops_on_cluster(
    cases: Sequence[OpCase],
    backend_names: Sequence[str],
    jobs: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    on_shard: Callable[[str, int], None] | None = None,
    shards_per_cpu: int = SHARDS_PER_CPU,
) -> ClusterRun:
    """Run op cases on each backend, sharded over the CPUs of the nodes offering it.

    Args:
        cases: the cases (put in the object store once; each node fetches them once).
        backend_names: backends; every one must be offered by an alive node.
        jobs: 1: each Ray worker runs its shards' cases in one worker process of its own (each
            case crash-isolated, with the timeout), started once per run and reused by its
            shards; 0: in the Ray worker itself, without isolation or timeout.
        timeout: seconds per case (with ``jobs`` 1).
        on_shard: called with (backend, cases in the shard) as each shard ends.
        shards_per_cpu: shards per CPU of the best-provided backend.

    Returns:
        One :class:`CaseResult` per (case, backend), case-major as a local run orders them.

    Raises:
        BackendUnavailableError: if no alive node offers one of the backends.
        InputError: for a negative ``jobs`` or ``shards_per_cpu`` below 1.
    """
    import ray

    if jobs not in (0, 1):
        raise InputError(f"jobs per shard must be 0 (in the Ray worker) or 1 (a worker process), got {jobs}")
    if shards_per_cpu < 1:
        raise InputError(f"shards per CPU must be at least 1, got {shards_per_cpu}")
    nodes = _offered_nodes(backend_names)
    cpus = max(sum(n.cpus for n in nodes if n.alive and name in n.backends) for name in backend_names)
    shards = _shards(cases, max(1, min(len(cases), int(shards_per_cpu * max(cpus, 1)))))
    # Every case goes to the object store once; a shard task names its cases. The reference is
    # wrapped in a list so that Ray hands it over as it is (each node fetches the cases once).
    all_cases = [ray.put(list(cases))]
    remote = _remote(_ops_shard_task)
    submitted = [
        Submitted(
            remote.options(**_task_options(name), scheduling_strategy="SPREAD").remote(
                all_cases, [case.name for case in shard], name, jobs, timeout
            ),
            name,
            shard_index,
        )
        for shard_index, shard in enumerate(shards)
        for name in backend_names
    ]
    collected: dict[tuple[str, str], tuple[CaseResult, dict[str, Any] | None, bool]] = {}

    def record(job: Submitted, outcome: TaskOutcome) -> None:
        shard = shards[job.key]
        if outcome.value is not None:
            results, stamp = outcome.value
            for result in results:
                collected[(result.case, job.backend)] = (result, stamp, False)
        else:
            reason = outcome.infrastructure or outcome.error
            for case in shard:
                collected[(case.name, job.backend)] = (
                    CaseResult(case.name, case.op, job.backend, ERROR, reason),
                    None,
                    bool(outcome.infrastructure),
                )
        if on_shard:
            on_shard(job.backend, len(shard))

    gather(submitted, record, nodes)
    run = ClusterRun(nodes=nodes)
    for case in cases:
        for name in backend_names:
            result, stamp, infrastructure = collected[(case.name, name)]
            run.results.append(result)
            run.stamps.append(stamp)
            run.infrastructure.append(infrastructure)
    return run


def bench_on_cluster(
    bundle: Bundle,
    backend_names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    shape: tuple[int, int] | None = None,
    warmup: int = 3,
    runs: int = 20,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[str], None] | None = None,
) -> ClusterRun:
    """Time ``bundle`` on each backend, one configuration after another, each a Ray task.

    Configurations run one at a time, so no two timings share a machine.

    Args:
        bundle: a loaded bundle.
        backend_names: backends; every one must be offered by an alive node.
        options: per-backend compile options.
        shape: (batch, sequence) of seeded random tokens, or None for the golden inputs.
        warmup / runs: untimed and timed runs.
        chunk_bytes: the largest piece of a file put in the object store at once.
        progress: called with a message before each configuration.

    Returns:
        Per backend, a dict with ``backend``, ``input_shape`` and the
        :class:`~portable_moe.perf.bench.BenchResult` figures, or ``backend`` and ``error``.

    Raises:
        BackendUnavailableError: if no alive node offers one of the backends.
        InputError: for runs below 1 or warmup below 0.
    """
    if runs < 1 or warmup < 0:
        raise InputError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    nodes = _offered_nodes(backend_names)
    shipped = ship_bundle(bundle, chunk_bytes)
    remote = _remote(_bench_task)
    run = ClusterRun(nodes=nodes)

    def record(job: Submitted, outcome: TaskOutcome) -> None:
        if outcome.value is not None:
            result, stamp = outcome.value
        else:
            result, stamp = {"backend": job.backend, "error": outcome.infrastructure or outcome.error}, None
        run.results.append(result)
        run.stamps.append(stamp)
        run.infrastructure.append(bool(outcome.infrastructure))

    for name in backend_names:
        if progress:
            progress(f"timing {bundle.name} on {name}")
        reference = remote.options(**_task_options(name)).remote(
            shipped, name, (options or {}).get(name), shape, warmup, runs
        )
        gather([Submitted(reference, name, name)], record, nodes)
    return run
