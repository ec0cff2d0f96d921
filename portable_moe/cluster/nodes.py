"""What each node of the cluster offers: backend resources, runtime versions, and the lookups on them.

A node that runs ``portable-moe worker`` advertises, for every backend whose probe says it is
available on that machine, the custom Ray resource :func:`backend_resource` (``portable-moe/cpu``,
``portable-moe/npu-sim``, ...) with :data:`BACKEND_SLOTS` units. Its runtime versions go in node labels (``portable-moe/onnxruntime=1.23.0``). Tasks
request one unit of their backend's resource and one CPU, so the CPUs a node gives Ray bound how
many run there at once, and a backend is never scheduled on a node that did not advertise it.
"""

from __future__ import annotations

import platform
import re
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from portable_moe import registry
from portable_moe.errors import BackendError, BackendUnavailableError

RESOURCE_PREFIX = "portable-moe/"
LABEL_PREFIX = "portable-moe/"
# Large enough never to be the limit: the node's CPUs bound concurrency, not this count.
BACKEND_SLOTS = 1000
# Distributions whose versions decide what a backend computes; reported per node to show skew.
VERSIONED_DISTRIBUTIONS = ("portable-moe", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy")
# Ray node labels follow Kubernetes syntax: alphanumerics with - _ . inside, at most 63 characters.
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def backend_resource(backend: str) -> str:
    """The custom Ray resource a node advertises when ``backend`` is available there."""
    return f"{RESOURCE_PREFIX}{backend}"


def runtime_versions() -> dict[str, str]:
    """Versions of this machine's Python and of the installed :data:`VERSIONED_DISTRIBUTIONS` (absent ones left out)."""
    versions = {"python": platform.python_version()}
    for distribution in VERSIONED_DISTRIBUTIONS:
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return versions


def label_value(text: str) -> str:
    """``text`` as a valid Ray node label value (``2.13.0+cpu`` -> ``2.13.0_cpu``)."""
    return _LABEL_UNSAFE.sub("_", text)[:63].strip("_.-")


@dataclass(frozen=True)
class Advertisement:
    """What ``portable-moe worker`` offers the cluster from this machine.

    Attributes:
        resources: Ray custom resources, one per available backend.
        labels: Ray node labels carrying the runtime versions.
        unavailable: ``(backend, reason)`` for each registered backend this machine cannot run.
    """

    resources: dict[str, float]
    labels: dict[str, str]
    unavailable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def backends(self) -> list[str]:
        return sorted(name.removeprefix(RESOURCE_PREFIX) for name in self.resources if name.startswith(RESOURCE_PREFIX))


def advertisement(statuses: Sequence[registry.BackendStatus] | None = None) -> Advertisement:
    """Probe the registry's backends (or take ``statuses``) and build this machine's advertisement."""
    statuses = registry.list_backends() if statuses is None else statuses
    resources: dict[str, float] = {backend_resource(s.name): BACKEND_SLOTS for s in statuses if s.available}
    labels = {f"{LABEL_PREFIX}{key}": label_value(value) for key, value in runtime_versions().items()}
    unavailable = [(s.name, s.reason) for s in statuses if not s.available]
    return Advertisement(resources, labels, unavailable)


@dataclass(frozen=True)
class ClusterNode:
    """One node of the cluster as the driver sees it.

    Attributes:
        node_id: Ray's node id (hex).
        address: the node's IP address.
        hostname: the machine's host name.
        alive: whether Ray still counts the node as alive.
        backends: the backends it advertises.
        cpus: the CPUs it gives Ray.
        versions: runtime versions from its labels (empty for a node started without ``portable-moe worker``).
    """

    node_id: str
    address: str
    hostname: str
    alive: bool
    backends: tuple[str, ...]
    cpus: float
    versions: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """``host (ip, node 1a2b3c4d)``: names the node in messages and reports."""
        return node_name(self.hostname, self.address, self.node_id)


def node_name(hostname: str, address: str, node_id: str) -> str:
    """How messages and reports name a node: the host, its address and the start of Ray's node id."""
    return f"{hostname} ({address}, node {node_id[:8]})"


def nodes_from_ray(raw_nodes: Iterable[Mapping[str, Any]]) -> list[ClusterNode]:
    """Turn ``ray.nodes()`` entries into :class:`ClusterNode` records."""
    nodes = []
    for raw in raw_nodes:
        resources: Mapping[str, float] = raw.get("Resources") or {}
        labels: Mapping[str, str] = raw.get("Labels") or {}
        nodes.append(
            ClusterNode(
                node_id=str(raw.get("NodeID", "")),
                address=str(raw.get("NodeManagerAddress", "")),
                hostname=str(raw.get("NodeManagerHostname", "")),
                alive=bool(raw.get("Alive")),
                backends=tuple(
                    sorted(name.removeprefix(RESOURCE_PREFIX) for name in resources if name.startswith(RESOURCE_PREFIX))
                ),
                cpus=float(resources.get("CPU", 0.0)),
                versions={
                    key.removeprefix(LABEL_PREFIX): str(value)
                    for key, value in labels.items()
                    if key.startswith(LABEL_PREFIX)
                },
            )
        )
    return nodes


def cluster_nodes() -> list[ClusterNode]:
    """The nodes of the cluster this process is connected to (``ray.init`` first), dead ones included."""
    import ray

    return nodes_from_ray(ray.nodes())


def describe_offers(nodes: Sequence[ClusterNode]) -> str:
    """Each alive node and the backends it offers, on one line."""
    alive = [node for node in nodes if node.alive]
    if not alive:
        return "the cluster has no alive node"
    return "; ".join(f"{node.describe()}: {', '.join(node.backends) or 'no backend'}" for node in alive)


def resolve_cluster_backends(spec: str, nodes: Sequence[ClusterNode]) -> list[str]:
    """The backends a cluster run covers: ``all`` (every backend an alive node offers) or a comma list.

    Unlike a local run, names are checked against what the nodes advertise, not against this
    machine's registry: the driver need not have the vendor's package installed.

    Raises:
        BackendError: for a malformed list.
        BackendUnavailableError: if no alive node offers a named backend (or, for ``all``, any),
            listing the nodes and what each offers.
    """
    offered = sorted({name for node in nodes if node.alive for name in node.backends})
    if spec == "all":
        if not offered:
            raise BackendUnavailableError(
                f"no node of the cluster offers a backend ({describe_offers(nodes)}); start 'portable-moe worker "
                "--join ADDRESS' on the machines that have them"
            )
        return offered
    names = [part.strip() for part in spec.split(",")]
    if not spec.strip() or any(not name for name in names):
        raise BackendError(f"bad backend list {spec!r}: give names separated by commas, e.g. 'cpu,npu-sim'")
    missing = [name for name in names if name not in offered]
    if missing:
        raise BackendUnavailableError(
            f"backend {', '.join(repr(name) for name in missing)} is offered by no node of the cluster; nodes: "
            f"{describe_offers(nodes)}; run 'portable-moe worker --join ADDRESS' on a machine that has it"
        )
    return list(dict.fromkeys(names))


def ray_start_command(
    offer: Advertisement, join: str | None, num_cpus: int | None = None, port: int | None = None
) -> list[str]:
    """The ``ray start`` command line that joins (or, with ``join`` None, starts) a cluster with ``offer``.

    The command blocks in the foreground (``--block``): stopping it (Ctrl-C, SIGTERM) takes the
    node out of the cluster.
    """
    import json

    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block"]
    command += [f"--address={join}"] if join else ["--head"] + ([f"--port={port}"] if port else [])
    command.append(f"--resources={json.dumps(offer.resources, sort_keys=True)}")
    command.append("--labels=" + ",".join(f"{key}={value}" for key, value in sorted(offer.labels.items()) if value))
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    return command


def this_node_stamp() -> dict[str, object]:
    """Where a task runs: the node (Ray's id, address, host name) and its runtime versions."""
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "address": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "versions": runtime_versions(),
    }
