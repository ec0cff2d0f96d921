"""Expected failures of the op suite: per backend, the cases it is known to fail, and why.

A backend names its file in ``Backend.expected_failures_file`` (a TOML file kept beside the
adapter, as ONNX Runtime keeps its backend-test filters beside its providers). Each entry::

    [[case]]
    name = "test_strnorm_model_monday_casesensintive_lower"
    category = "platform-limit"
    reason = "StringNormalizer builds the en_US.UTF-8 locale, which this machine may not have"

A listed case that fails, errors or times out is reported as *expected failure* (never hidden,
never a pass); a listed case that passes is an *unexpected pass*, which fails the run, so the list
cannot outlive the bug it records.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from portable_moe._compat import StrEnum, tomllib
from portable_moe.errors import BackendError


class FailureCategory(StrEnum):
    """Why a backend is expected to fail a case."""

    RUNTIME_BUG = "runtime-bug"
    """The runtime computes a wrong value or fails on valid input (the reason gives the symptom)."""
    PLATFORM_LIMIT = "platform-limit"
    """Something the machine lacks, not the runtime (a locale, an instruction set)."""
    MISSING_FEATURE = "missing-feature"
    """The runtime does not implement an attribute or mode, but says so with a generic failure."""
    SPEC_AMBIGUITY = "spec-ambiguity"
    """The specification allows the backend's answer; onnx's expected output picks another."""


@dataclass(frozen=True)
class ExpectedFailure:
    """One listed case.

    Attributes:
        case: the case name, e.g. ``"test_rnn_batchwise"``.
        category: the :class:`FailureCategory`.
        reason: why, in words a reader can check (the symptom, the version it was seen with).
    """

    case: str
    category: FailureCategory
    reason: str

    def describe(self) -> str:
        return f"{self.category}: {self.reason}"


def load_expected_failures(path: str | Path) -> dict[str, ExpectedFailure]:
    """Read an expected-failures file: case name -> entry.

    Raises:
        BackendError: if the file cannot be read or parsed, or an entry lacks a field, has an
            unknown category, or repeats a case; the message names the file and the entry.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise BackendError(f"expected-failures file {path}: cannot be read: {error}") from None
    entries = data.get("case", [])
    if not isinstance(entries, list):
        raise BackendError(f"expected-failures file {path}: 'case' must be an array of tables ([[case]])")
    categories = ", ".join(category.value for category in FailureCategory)
    listed: dict[str, ExpectedFailure] = {}
    for number, entry in enumerate(entries, start=1):
        where = f"expected-failures file {path}, entry {number}"
        fields = {key: entry.get(key) if isinstance(entry, dict) else None for key in ("name", "category", "reason")}
        missing = [key for key, value in fields.items() if not isinstance(value, str) or not value.strip()]
        if missing:
            raise BackendError(f"{where}: give {', '.join(missing)} (non-empty strings)")
        if fields["category"] not in {category.value for category in FailureCategory}:
            raise BackendError(f"{where}: unknown category {fields['category']!r}; use one of {categories}")
        if fields["name"] in listed:
            raise BackendError(f"{where}: case {fields['name']!r} is listed twice")
        listed[fields["name"]] = ExpectedFailure(fields["name"], FailureCategory(fields["category"]), fields["reason"])
    return listed


@functools.cache
def expected_failures_of(backend_name: str) -> dict[str, ExpectedFailure]:
    """The expected failures a registered backend declares (empty when it names no file).

    Raises:
        BackendError: if the backend is unknown or its file is malformed.
    """
    from portable_moe.registry import get_backend

    path = get_backend(backend_name).expected_failures_file
    return load_expected_failures(path) if path is not None else {}
