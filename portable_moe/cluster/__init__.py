"""Running the conformance and benchmark matrix on a Ray cluster.

Every machine runs ``portable-moe worker``: it probes the registry's backends and joins the
cluster advertising one custom Ray resource per available backend (``portable-moe/<name>``) and
the versions of its runtimes as node labels (:mod:`portable_moe.cluster.nodes`). A driver
(``check``, ``conformance ops`` or ``bench`` with ``--cluster``) turns each unit of the matrix into
a Ray task that requests its backend's resource, so Ray places it on a machine that has that
silicon (:mod:`portable_moe.cluster.jobs`). Bundles travel through Ray's object store in chunks
and are verified against their manifest hashes on the node before anything compiles them
(:mod:`portable_moe.cluster.transfer`). A node that dies costs a retry on another node offering the
backend, or an *infrastructure error* naming the node, never a conformance failure
(:mod:`portable_moe.cluster.gather`).

Ray is imported only inside this sub-package, and only when a cluster is used: ``pip install
"portable-moe[cluster]"``. The task bodies are the local functions (``check_bundle``, the op
suite's ``run_tasks``, ``bench_compiled``), so a local run and a cluster run of the same matrix
reach the same verdicts.
"""

from __future__ import annotations

from portable_moe.cluster.gather import connected
from portable_moe.cluster.jobs import ClusterRun, bench_on_cluster, check_on_cluster, ops_on_cluster
from portable_moe.cluster.nodes import ClusterNode, cluster_nodes, resolve_cluster_backends

__all__ = [
    "ClusterNode",
    "ClusterRun",
    "bench_on_cluster",
    "check_on_cluster",
    "cluster_nodes",
    "connected",
    "ops_on_cluster",
    "resolve_cluster_backends",
]
