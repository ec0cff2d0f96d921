"""Measure what running the op-suite matrix on a Ray cluster costs against running it locally.

    python scripts/cluster_benchmark.py                   # cpu,reference over every case (~6 minutes on 2 cores)
    python scripts/cluster_benchmark.py --backends cpu    # a smaller matrix

Starts a two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head with no CPUs,
two nodes with one CPU each offering the backends), then in one run:

- the matrix locally: ``run_tasks`` with 2 worker processes (one per core), as
  ``portable-moe conformance ops --jobs 2`` runs it;
- the same matrix on the cluster (``ops_on_cluster``, one case process per Ray worker): a first run
  that also starts Ray's worker processes, then ``--rounds`` rounds alternating a local and a
  cluster run (the overhead is the median over the rounds);
- scheduler throughput for small cases: one Ray task per op case (run in the Ray worker), and
  empty Ray tasks for the scheduler alone.

Verdicts of the local and cluster runs are compared case by case. The figures replace the
marked cluster section of docs/benchmarks.md (and docs/benchmarks-cluster.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- cluster-benchmark:start -->", "<!-- cluster-benchmark:end -->"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(function: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def measure(backends: list[str], small_cases: int, rounds_count: int) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from portable_moe.cluster.jobs import ops_on_cluster
    from portable_moe.cluster.nodes import backend_resource
    from portable_moe.conformance.ops import collect_cases, op_tasks, run_tasks, select_cases

    load_before = os.getloadavg()[0]
    cases = select_cases(collect_cases())
    log(f"{len(cases)} cases x {backends}: local run, 2 worker processes")
    local, local_seconds = timed(lambda: run_tasks(op_tasks(cases, backends), cases, jobs=2))
    log(f"local: {local_seconds:.1f} s; starting a two-node cluster")
    (cluster, start_seconds) = timed(
        lambda: Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    )
    resources = {backend_resource(name): 1000 for name in backends}
    _, nodes_seconds = timed(lambda: [cluster.add_node(num_cpus=1, resources=resources) for _ in range(2)])
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cold, cold_seconds = timed(lambda: ops_on_cluster(cases, backends, jobs=1))
        log(f"cluster, first run: {cold_seconds:.1f} s")
        rounds, runs = [], [cold]
        for number in range(rounds_count):
            # Alternate, so load from elsewhere on a shared machine falls on both sides alike.
            _, here = timed(lambda: run_tasks(op_tasks(cases, backends), cases, jobs=2))
            run, there = timed(lambda: ops_on_cluster(cases, backends, jobs=1))
            log(f"round {number + 1}: local {here:.1f} s, cluster {there:.1f} s")
            rounds.append({"local_seconds": here, "cluster_seconds": there, "overhead": there / here - 1})
            runs.append(run)
        verdicts_local = {(r.case, r.backend): r.status for r in local}
        same = all({(r.case, r.backend): r.status for r in run.results} == verdicts_local for run in runs)
        small = cases[:small_cases]
        # As many shards as cases: one Ray task per case.
        _, small_seconds = timed(lambda: ops_on_cluster(small, backends[:1], jobs=0, shards_per_cpu=len(small)))
        tasks = len(small)
        log(f"{tasks} one-case tasks in {small_seconds:.2f} s")
        empty = ray.remote(lambda: None).options(num_cpus=1, resources={backend_resource(backends[0]): 1})
        ray.get([empty.remote() for _ in range(50)])  # warm
        _, empty_seconds = timed(lambda: ray.get([empty.remote() for _ in range(1000)]))
        log(f"1000 empty tasks in {empty_seconds:.2f} s")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "logical_cores": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "load_average": [load_before, os.getloadavg()[0]],
        "backends": backends,
        "cases": len(cases),
        "local_seconds_before_cluster": local_seconds,
        "cluster_start_seconds": start_seconds + nodes_seconds,
        "cluster_first_run_seconds": cold_seconds,
        "rounds": rounds,
        "median_overhead": statistics.median(r["overhead"] for r in rounds),
        "same_verdicts": same,
        "small_tasks": tasks,
        "small_tasks_per_second": tasks / small_seconds,
        "empty_tasks_per_second": 1000 / empty_seconds,
    }


def render(report: dict[str, Any]) -> str:
    machine = report["machine"]
    rows = "\n".join(
        f"| {n} | {r['local_seconds']:.1f} s | {r['cluster_seconds']:.1f} s | {r['overhead']:+.0%} |"
        for n, r in enumerate(report["rounds"], 1)
    )
    return f"""{START}
## The op-suite matrix on a Ray cluster

Generated by `python scripts/cluster_benchmark.py --backends {",".join(report["backends"])}` on {machine["date"]} ({machine["logical_cores"]} logical cores, Ray {machine["ray"]}, Python {machine["python"]}). The machine is shared with other engineers' work (1-minute load average {report["load_average"][0]:.1f} at the start and {report["load_average"][1]:.1f} at the end, on 2 cores), so single timings move by tens of percent; local and cluster runs alternate so that load falls on both sides alike.

Matrix: {report["cases"]} ONNX node test cases x {", ".join(report["backends"])}. Local: `run_tasks` with 2 worker processes (one per core), as `portable-moe conformance ops --jobs 2`. Cluster: two Ray nodes on this machine with one CPU each (head without CPUs), `ops_on_cluster` (2 shards per CPU; each Ray worker runs its cases in one case process, started once per run): the same two cores do the same work.

| round | local | cluster | cluster against local |
|---|---|---|---|
{rows}

Median overhead of the cluster path: **{report["median_overhead"]:+.0%}** (target: at most +25% at 2 nodes). Not counted above: starting the cluster (head and two nodes, {report["cluster_start_seconds"]:.1f} s; a cluster outlives many runs) and the first run on it, which also starts Ray's worker processes ({report["cluster_first_run_seconds"]:.1f} s, against {report["local_seconds_before_cluster"]:.1f} s for the local run before the cluster started). Verdicts identical case by case in every cluster run: {"yes" if report["same_verdicts"] else "NO"}.

Scheduler throughput for small cases: {report["small_tasks"]} Ray tasks of one op case each on `cpu` (run in the Ray worker, `jobs=0`) at {report["small_tasks_per_second"]:.0f} tasks/s; empty tasks at {report["empty_tasks_per_second"]:.0f} tasks/s. Shards of tens to hundreds of cases keep the per-task cost out of the way.
{END}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cpu,reference", help="the matrix's backends (default: cpu,reference)")
    parser.add_argument("--small-cases", type=int, default=300, help="one-case tasks for the throughput figure")
    parser.add_argument("--rounds", type=int, default=2, help="alternating local and cluster runs (default: 2)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to update")
    args = parser.parse_args()
    report = measure(args.backends.split(","), args.small_cases, args.rounds)
    output = Path(args.output)
    text = output.read_text() if output.exists() else "# Benchmarks\n"
    section = render(report)
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END) + "\n", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    output.write_text(text)
    output.with_name("benchmarks-cluster.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {output}")


if __name__ == "__main__":
    main()
