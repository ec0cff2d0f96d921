"""Backend discovery through the ``portable_moe.backends`` entry-point group.

The built-in backends register exactly as a vendor's package would, in its ``pyproject.toml``::

    [project.entry-points."portable_moe.backends"]
    my-npu = "my_vendor_package.adapter:MyNpuBackend"

The entry point names a :class:`~portable_moe.backend.Backend` subclass (or any callable that
returns a Backend). A backend whose import, construction or probe fails stays listed as
unavailable, with the error as its reason: it is never dropped silently.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from portable_moe.backend import Backend, Capabilities, CompiledModel, ModelInput, ProbeResult
from portable_moe.errors import BackendError, BackendUnavailableError

ENTRY_POINT_GROUP = "portable_moe.backends"


class _BrokenBackend(Backend):
    """Stands in for a registered backend that could not be loaded, carrying the reason."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.vendor = "unknown"
        self.description = "failed to load"
        self._reason = reason

    def probe(self) -> ProbeResult:
        return ProbeResult(False, self._reason)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(moe_lowerings=("dense",))

    def _compile(self, model: ModelInput, options: dict[str, Any]) -> CompiledModel:
        raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {self._reason}")


@dataclass(frozen=True)
class BackendStatus:
    """One row of ``portable-moe backends``."""

    name: str
    vendor: str
    description: str
    simulated: bool
    available: bool
    reason: str
    source: str


_lock = threading.RLock()
_backends: dict[str, Backend] | None = None
_sources: dict[str, str] = {}
_extra_factories: dict[str, Callable[[], Backend]] = {}


def _instantiate(name: str, factory: Callable[[], Any], source: str) -> Backend:
    try:
        backend = factory()
    except Exception as error:
        return _BrokenBackend(name, f"{source} failed to construct: {type(error).__name__}: {error}")
    if not isinstance(backend, Backend):
        return _BrokenBackend(name, f"{source} did not produce a portable_moe Backend (got {type(backend).__name__})")
    if backend.name != name:
        backend.name = name  # the registry name is the one users type
    return backend


def _discover() -> dict[str, Backend]:
    found: dict[str, Backend] = {}
    for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        source = f"entry point {entry_point.name} = {entry_point.value}"
        if entry_point.name in found:
            found[entry_point.name] = _BrokenBackend(
                entry_point.name, f"registered twice ({_sources[entry_point.name]} and {source}); uninstall one"
            )
            continue
        _sources[entry_point.name] = source
        try:
            factory = entry_point.load()
        except Exception as error:
            found[entry_point.name] = _BrokenBackend(
                entry_point.name, f"{source} failed to import: {type(error).__name__}: {error}"
            )
            continue
        found[entry_point.name] = _instantiate(entry_point.name, factory, source)
    for name, factory in _extra_factories.items():
        _sources[name] = "registered in-process"
        found[name] = _instantiate(name, factory, _sources[name])
    return found


def _registry() -> dict[str, Backend]:
    global _backends
    with _lock:
        if _backends is None:
            _backends = _discover()
        return _backends


def refresh() -> None:
    """Forget discovered backends, so the next lookup reads the entry points again."""
    global _backends
    with _lock:
        _backends = None
        _sources.clear()


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend in this process only (for experiments and tests; packages use entry points)."""
    with _lock:
        _extra_factories[name] = factory
        refresh()


def unregister_backend(name: str) -> None:
    """Undo :func:`register_backend`."""
    with _lock:
        _extra_factories.pop(name, None)
        refresh()


def in_process_factories() -> dict[str, Callable[[], Backend]]:
    """The backends registered with :func:`register_backend` (name -> factory), e.g. to hand to a worker process."""
    with _lock:
        return dict(_extra_factories)


def backend_names() -> list[str]:
    return sorted(_registry())


def canonical_name(name: str) -> str:
    """The registered name a user meant: ``name`` itself, or its case-insensitive match ("CPU" -> "cpu").

    Raises:
        BackendError: if no backend has that name; the message lists the names that exist and
            suggests the likeliest ones (close spellings, and backends whose vendor or description
            mentions the word, e.g. "gpu" -> cuda).
    """
    registry = _registry()
    if name in registry:
        return name
    folded = {registered.casefold(): registered for registered in registry}
    if name.strip().casefold() in folded:
        return folded[name.strip().casefold()]
    known = ", ".join(sorted(registry)) or "none (is portable-moe installed?)"
    raise BackendError(f"unknown backend {name!r}; registered backends: {known}{_suggestion(name, registry)}")


def _suggestion(name: str, registry: dict[str, Backend]) -> str:
    """ "; did you mean ...?" naming up to three backends: names it starts, mentions of it as a word, close spellings."""
    typed = name.strip().casefold()
    prefixed = [registered for registered in sorted(registry) if typed and registered.casefold().startswith(typed)]
    word = re.compile(rf"\b{re.escape(typed)}\b", re.IGNORECASE)
    mentioned = [
        registered
        for registered, backend in sorted(registry.items())
        if typed and word.search(f"{backend.vendor} {backend.description}")
    ]
    spelled = difflib.get_close_matches(typed, sorted(registry), n=3, cutoff=0.6)
    likely = list(dict.fromkeys([*prefixed, *mentioned, *spelled]))[:3]
    if not likely:
        return ""
    quoted = [repr(candidate) for candidate in likely]
    return (
        "; did you mean "
        + (" or ".join(quoted) if len(quoted) < 3 else f"{quoted[0]}, {quoted[1]} or {quoted[2]}")
        + "?"
    )


def get_backend(name: str) -> Backend:
    """Return the registered backend called ``name`` (case-insensitive), available or not.

    Raises:
        BackendError: if no backend has that name (the message lists the names that exist and
            suggests the likeliest).
    """
    return _registry()[canonical_name(name)]


def as_backend(backend: Backend | str) -> Backend:
    """A Backend as given, or the registered one of that name (for parameters that take either).

    Raises:
        BackendError: for a name no backend has.
    """
    return backend if isinstance(backend, Backend) else get_backend(backend)


def list_backends() -> list[BackendStatus]:
    """Every registered backend with its availability and the reason when unavailable."""
    statuses = []
    for name, backend in sorted(_registry().items()):
        probe = backend.safe_probe()
        statuses.append(
            BackendStatus(
                name=name,
                vendor=backend.vendor,
                description=backend.description,
                simulated=backend.simulated,
                available=probe.available,
                reason=probe.reason,
                source=_sources.get(name, ""),
            )
        )
    return statuses


def parse_backend_list(spec: str) -> list[str]:
    """Split ``"npu-sim,cpu"`` into registered names (case-insensitive), refusing empty entries and unknown names."""
    names = [part.strip() for part in spec.split(",")]
    if not spec.strip() or any(not name for name in names):
        raise BackendError(f"bad backend list {spec!r}: give names separated by commas, e.g. 'npu-sim,cpu'")
    return [canonical_name(name) for name in names]


def select_backend(spec: str) -> tuple[Backend, list[tuple[str, str]]]:
    """Resolve a fallback list: the first available backend, in the order given.

    Returns:
        ``(backend, skipped)`` where ``skipped`` lists ``(name, reason)`` for the backends passed over.

    Raises:
        BackendUnavailableError: if none of them is available (with every reason).
    """
    skipped: list[tuple[str, str]] = []
    for name in parse_backend_list(spec):
        backend = get_backend(name)
        probe = backend.safe_probe()
        if probe.available:
            return backend, skipped
        skipped.append((name, probe.reason))
    reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped)
    raise BackendUnavailableError(f"no backend in {spec!r} is available ({reasons})")


def resolve_lowering(lowering: str, backend_name: str) -> str:
    """Turn ``auto`` into the named backend's preferred MoE lowering; pass other names through."""
    if lowering != "auto":
        return lowering
    return get_backend(backend_name).capabilities.preferred_lowering


__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendStatus",
    "backend_names",
    "canonical_name",
    "get_backend",
    "in_process_factories",
    "list_backends",
    "parse_backend_list",
    "refresh",
    "register_backend",
    "resolve_lowering",
    "select_backend",
    "unregister_backend",
]
