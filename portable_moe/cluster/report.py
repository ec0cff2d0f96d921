"""Cluster runs in the usual reports: the node of each result, the nodes themselves, version skew.

The JSON report of a cluster run is the local one (:func:`portable_moe.conformance.model_check.report_dict`
or :func:`portable_moe.conformance.ops.report_dict`) with two additions: each result gains ``node`` (the
node it ran on, or null when it never finished) and ``infrastructure_error``, and a top-level
``cluster`` object lists the nodes and any version skew. JUnit XML gains a ``node`` property per
test case.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from portable_moe.cluster.jobs import ClusterRun
from portable_moe.cluster.nodes import node_name


def stamp_name(stamp: Mapping[str, Any] | None) -> str:
    """The name of the node a stamp comes from ("" for None: the task never finished)."""
    if stamp is None:
        return ""
    return node_name(str(stamp["hostname"]), str(stamp["address"]), str(stamp["node_id"]))


def version_skew(ran: Iterable[tuple[str, Mapping[str, Any] | None]]) -> dict[str, dict[str, dict[str, list[str]]]]:
    """Runtime versions that differ between the nodes that ran the same backend.

    Args:
        ran: ``(backend, stamp)`` per result.

    Returns:
        ``{backend: {package: {version: [nodes]}}}``, only for packages with more than one version.
    """
    by_backend: dict[str, dict[str, Mapping[str, str]]] = {}
    for backend, stamp in ran:
        if stamp is not None:
            by_backend.setdefault(backend, {})[stamp_name(stamp)] = stamp["versions"]
    skew: dict[str, dict[str, dict[str, list[str]]]] = {}
    for backend, versions_by_node in by_backend.items():
        packages = sorted({key for versions in versions_by_node.values() for key in versions})
        for package in packages:
            seen: dict[str, list[str]] = {}
            for node, versions in sorted(versions_by_node.items()):
                seen.setdefault(versions.get(package, "absent"), []).append(node)
            if len(seen) > 1:
                skew.setdefault(backend, {})[package] = seen
    return skew


def describe_skew(skew: Mapping[str, Mapping[str, Mapping[str, Sequence[str]]]]) -> list[str]:
    """One line per (backend, package) whose versions differ between nodes."""
    return [
        f"{backend}: {package} " + "; ".join(f"{version} on {', '.join(nodes)}" for version, nodes in seen.items())
        for backend, packages in skew.items()
        for package, seen in packages.items()
    ]


def cluster_section(run: ClusterRun, backends: Sequence[str], address: str) -> dict[str, Any]:
    """The report's ``cluster`` object: the address, every node and the version skew."""
    return {
        "address": address,
        "nodes": [
            {
                "name": node.describe(),
                "node_id": node.node_id,
                "address": node.address,
                "hostname": node.hostname,
                "alive_at_start": node.alive,
                "backends": list(node.backends),
                "cpus": node.cpus,
                "versions": node.versions,
            }
            for node in run.nodes
        ],
        "version_skew": version_skew(zip(backends, run.stamps)),
    }


def annotate_report(report: dict[str, Any], run: ClusterRun, backends: Sequence[str], address: str) -> dict[str, Any]:
    """Add the node of each result and the ``cluster`` object to a local-format JSON report (in place).

    Args:
        report: the report, whose ``results`` are in the order of ``run.results``.
        run: the cluster run.
        backends: the backend of each result, in the same order.
        address: the cluster address the run used.
    """
    for entry, stamp, infrastructure in zip(report["results"], run.stamps, run.infrastructure):
        entry["node"] = stamp_name(stamp) or None
        entry["infrastructure_error"] = infrastructure
    report["cluster"] = cluster_section(run, backends, address)
    return report


def write_junit_with_nodes(
    cases: Sequence[Any],
    node_of: Callable[[Any], str],
    path: str | os.PathLike[str],
    suite_name: str,
) -> None:
    """Write JUnit XML as :func:`portable_moe.conformance.junit.write_junit` does, with a ``node`` property per test case.

    Args:
        cases: what ``write_junit`` takes (op-suite results or check cases).
        node_of: the node name of a case ("" when it never ran on one).
        path: the file to write.
        suite_name: the name of the test suites.
    """
    from portable_moe.conformance.junit import junit_tree

    tree = junit_tree(cases, suite_name)
    grouped: dict[str, list[Any]] = {}
    for case in cases:  # junit_tree groups by backend in first-seen order
        grouped.setdefault(case.backend, []).append(case)
    ordered = [case for group in grouped.values() for case in group]
    for element, case in zip(tree.getroot().iter("testcase"), ordered):
        properties = ElementTree.Element("properties")
        ElementTree.SubElement(properties, "property", name="node", value=node_of(case) or "none")
        element.insert(0, properties)
    ElementTree.indent(tree.getroot())
    tree.write(path, encoding="utf-8", xml_declaration=True)
