"""JUnit XML for the op suite, the format CI systems read: one testsuite per backend, one testcase per case.

A failed case and an unexpected pass get a ``<failure>``, an error and a timeout an ``<error>``;
an unsupported case, an expected failure, an unavailable backend and a backend that does not take
the bundle get a ``<skipped>`` whose message starts with the status and gives the reason: CI shows
skips as skips, never as passes.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from portable_moe.opsuite import CaseResult

_ELEMENTS = {
    "failed": "failure",
    "unexpected-pass": "failure",
    "error": "error",
    "timeout": "error",
    "unsupported": "skipped",
    "expected-failure": "skipped",
    "unavailable": "skipped",
    "skipped": "skipped",
}


def junit_tree(results: Sequence[CaseResult], suite_name: str = "portable-moe ops") -> ElementTree.ElementTree:
    """Build the XML tree: ``<testsuites>``, a ``<testsuite>`` per backend (in first-seen order)."""
    root = ElementTree.Element("testsuites", name=suite_name)
    by_backend: dict[str, list[CaseResult]] = {}
    for outcome in results:
        by_backend.setdefault(outcome.backend, []).append(outcome)
    for backend, outcomes in by_backend.items():
        counts = {element: sum(_ELEMENTS.get(o.status) == element for o in outcomes) for element in _ELEMENTS.values()}
        suite = ElementTree.SubElement(
            root,
            "testsuite",
            name=f"{suite_name} on {backend}",
            tests=str(len(outcomes)),
            failures=str(counts["failure"]),
            errors=str(counts["error"]),
            skipped=str(counts["skipped"]),
            time=f"{sum(o.seconds for o in outcomes):.3f}",
        )
        for outcome in outcomes:
            case = ElementTree.SubElement(
                suite, "testcase", classname=f"{backend}.{outcome.op}", name=outcome.case, time=f"{outcome.seconds:.3f}"
            )
            element = _ELEMENTS.get(outcome.status)
            if element is not None:
                # The message attribute holds one line for CI summaries; the text keeps it whole.
                first_line = outcome.reason.splitlines()[0] if outcome.reason else ""
                label = f"{outcome.status} ({outcome.code})" if outcome.code else str(outcome.status)
                detail = ElementTree.SubElement(case, element, message=f"{label}: {first_line}"[:500], type=label)
                detail.text = outcome.reason
    ElementTree.indent(root)
    return ElementTree.ElementTree(root)


def write_junit(
    results: Sequence[CaseResult], path: str | os.PathLike[str], suite_name: str = "portable-moe ops"
) -> None:
    """Write ``results`` as JUnit XML to ``path``."""
    junit_tree(results, suite_name).write(path, encoding="utf-8", xml_declaration=True)
