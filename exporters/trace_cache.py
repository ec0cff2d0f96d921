"""A cache of traced layer pieces, keyed by the model's structure: in this process, and optionally on disk.

Layer-wise export (:mod:`exporters.layer_graphs`) traces the prologue, one layer of each kind and the
head with every weight a graph *input*, so the traced graph depends on the model's structure (module
classes and their settings, tensor shapes and dtypes, the lowering's routed experts and translation
table, the opset, the example's shape), never on weight values. Exporting the same architecture
again, with other weights, another seed or another weight format, can therefore reuse the traced
graph and skip ``torch.export``, its decompositions and the translation to ONNX: most of an
export's time.

The key describes everything the trace can read: every module reachable from the traced model
(class, plain attributes, hooks), the shapes and dtypes of its parameters and buffers, the values
of any other tensor it holds (those become constants of the graph), the code, defaults and closure
of every function it holds (a lowering's routed experts bound to their options, for one), and
torch's default dtype; then the source files of every module whose classes or functions it met and
of this package, and the versions of the exporting stack (Python, torch, onnxscript, onnx-ir, onnx).
A value the key cannot describe makes the export skip the cache rather than risk a wrong hit.

Traced graphs are kept serialized, and every export composes from its own deserialized copy, so an
export composes from the same bytes whether it traced or not. With ``PORTABLE_MOE_TRACE_CACHE`` set
to a directory, they are also written there (one ``<key>.onnx`` each, holding no weights) and read
by later processes: re-exports in CI, or the many exports of a test session.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENVIRONMENT_VARIABLE = "PORTABLE_MOE_TRACE_CACHE"
# Traced graphs kept in memory (least recently used dropped first); each holds no weights.
_CAPACITY = 16
_TRACES: OrderedDict[str, bytes] = OrderedDict()
_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes)
_ROLES = "portable_moe.trace_roles"  # metadata entry of a cached graph: TracedPieces' roles, as JSON
_STACK = ("torch", "onnxscript", "onnx-ir", "onnx")
# Since the process started: graphs traced and stored, and lookups answered from the cache.
_STATISTICS = {"traced": 0, "reused": 0}


class _Undescribable(Exception):
    """A value the structure key cannot describe: the export traces without the cache."""


@dataclasses.dataclass
class TracedPieces:
    """A traced graph and what its outputs are.

    Attributes:
        model: the exported ``onnx_ir.Model``.
        roles: the role of each graph output (see ``exporters.layer_graphs``).
        output_roles: per layer kind, the roles of that kind's outputs.
    """

    model: Any
    roles: list[str]
    output_roles: list[tuple[str, ...]]


def _serialize(pieces: TracedPieces) -> bytes:
    import onnx_ir

    proto = onnx_ir.to_proto(pieces.model)
    entry = proto.metadata_props.add()
    entry.key, entry.value = _ROLES, json.dumps([pieces.roles, pieces.output_roles])
    return proto.SerializeToString()


def _deserialize(data: bytes) -> TracedPieces:
    import onnx
    import onnx_ir

    proto = onnx.ModelProto.FromString(data)
    roles, output_roles = json.loads(next(entry.value for entry in proto.metadata_props if entry.key == _ROLES))
    del proto.metadata_props[:]
    return TracedPieces(onnx_ir.from_proto(proto), roles, [tuple(item) for item in output_roles])


def _disk_directory() -> Path | None:
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    return Path(value).expanduser() if value else None


def lookup(key: str | None) -> TracedPieces | None:
    """A private copy of the pieces stored under ``key`` (in memory, else on disk), or None."""
    if key is None:
        return None
    if key not in _TRACES:
        directory = _disk_directory()
        path = directory / f"{key}.onnx" if directory is not None else None
        if path is None or not path.is_file():
            return None
        data = path.read_bytes()
        try:
            pieces = _deserialize(data)
        except Exception:  # unreadable (truncated, not ours): trace again, and store() replaces it
            return None
        _remember(key, data)
        _STATISTICS["reused"] += 1
        return pieces
    _TRACES.move_to_end(key)
    _STATISTICS["reused"] += 1
    return _deserialize(_TRACES[key])


def store(key: str | None, pieces: TracedPieces) -> TracedPieces:
    """Keep ``pieces`` under ``key`` (a None key keeps nothing) and return a private copy of them.

    The copy is what every later :func:`lookup` returns too: a traced export and a cached one
    compose from the same bytes.
    """
    data = _serialize(pieces)
    if key is not None:
        _remember(key, data)
        _STATISTICS["traced"] += 1
        directory = _disk_directory()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            staging = directory / f".{key}.{os.getpid()}.partial"
            staging.write_bytes(data)
            staging.replace(directory / f"{key}.onnx")  # atomic: a reader sees the whole file or none
    return _deserialize(data)


def _remember(key: str, data: bytes) -> None:
    _TRACES[key] = data
    _TRACES.move_to_end(key)
    while len(_TRACES) > _CAPACITY:
        _TRACES.popitem(last=False)


def clear_trace_cache() -> None:
    """Forget every traced graph held in memory (the disk directory, if any, is left alone)."""
    _TRACES.clear()


def trace_cache_statistics() -> dict[str, int]:
    """``{"traced": graphs traced and stored, "reused": exports that took one from the cache}``."""
    return dict(_STATISTICS)


def structure_key(*parts: Any) -> str | None:
    """A digest of ``parts`` (modules, tensors, functions, plain values) and the code they run, or None.

    Parameters and buffers of modules are described by shape and dtype only (they are graph inputs
    while tracing); any other tensor by its values too. The source files of the modules whose
    classes and functions were met, this package's files and the exporting stack's versions are
    part of the digest. None when something cannot be described.
    """
    import torch

    describer = _Describer(torch)
    try:
        description = describer.describe((parts, torch.get_default_dtype()))
    except _Undescribable:
        return None
    sources = sorted(_source_digest(name) for name in describer.modules | {__name__})
    versions = [platform.python_version(), *(_version(name) for name in _STACK)]
    return hashlib.sha256(repr((description, sources, versions)).encode()).hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _source_digest(module_name: str) -> tuple[str, str | None]:
    """The digest of the module's source file; for this package's modules, of all its files (the
    trace calls their functions by name: they are code the description does not reach)."""
    if module_name.split(".")[0] == __name__.split(".")[0]:
        return ("exporters", _digest(tuple(sorted(Path(__file__).parent.rglob("*.py")))))
    path = getattr(sys.modules.get(module_name), "__file__", None)
    return (module_name, _digest((Path(path),)) if path else None)


@functools.cache
def _digest(files: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled (a name assigned after the function was made)
        return _EMPTY_CELL


_EMPTY_CELL = ("empty cell",)


class _Describer:
    """Turns an object graph into nested tuples of plain values; a shared object is described once."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.seen: dict[int, int] = {}  # id(object) -> its position among the described objects
        self.modules: set[str] = set()  # modules whose classes and functions were met

    def describe(self, value: Any) -> Any:
        torch = self.torch
        if isinstance(value, _PRIMITIVES):
            return (type(value).__name__, repr(value))
        if isinstance(value, (enum.Enum, torch.dtype, torch.device, torch.Size)):
            return (type(value).__name__, str(value))
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, *map(self.describe, value))
        if isinstance(value, type):
            self.modules.add(value.__module__)
            return ("class", value.__module__, value.__qualname__)
        if isinstance(value, (types.ModuleType, types.BuiltinFunctionType)):
            return ("named", getattr(value, "__module__", None), value.__name__)
        if id(value) in self.seen:  # shared or cyclic references
            return ("ref", self.seen[id(value)])
        self.seen[id(value)] = len(self.seen)
        if isinstance(value, torch.Tensor):
            return self._tensor(value, with_values=True)
        if isinstance(value, Mapping):
            return ("dict", *sorted((repr(self.describe(key)), self.describe(item)) for key, item in value.items()))
        if isinstance(value, (set, frozenset)):
            return ("set", *sorted(repr(self.describe(item)) for item in value))
        if isinstance(value, torch.nn.Module):
            return self._module(value)
        if isinstance(value, functools.partial):
            return ("partial", self.describe(value.func), self.describe(value.args), self.describe(value.keywords))
        if isinstance(value, types.MethodType):
            return ("method", self.describe(value.__func__), self.describe(value.__self__))
        if isinstance(value, types.FunctionType):
            return self._function(value)
        if isinstance(value, types.CodeType):
            return self._code(value)
        if isinstance(value, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return ("op", str(value))
        if dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
            return ("object", self.describe(type(value)), self.describe(vars(value)))
        raise _Undescribable(type(value).__qualname__)

    def _tensor(self, tensor: Any, with_values: bool) -> tuple:
        described = ("tensor", str(tensor.dtype), tuple(tensor.shape), tensor.requires_grad)
        if not with_values:
            return described
        if tensor.is_meta or tensor.layout != self.torch.strided:
            raise _Undescribable("a tensor whose values cannot be read")
        data = tensor.detach().contiguous().cpu().view(-1).view(self.torch.uint8).numpy().tobytes()
        return (*described, hashlib.sha256(data).hexdigest())

    def _module(self, module: Any) -> tuple:
        fields = []
        for name, item in sorted(vars(module).items()):
            if name in ("_parameters", "_buffers"):
                # Graph inputs while tracing: their shapes matter, their values do not.
                item = {key: None if tensor is None else self._tensor(tensor, False) for key, tensor in item.items()}
                fields.append((name, tuple(sorted(item.items()))))
            elif name.endswith(("hooks", "hooks_with_kwargs", "hooks_always_called")) and isinstance(item, Mapping):
                fields.append((name, self.describe(list(item.values()))))  # keys are process-wide handle ids
            else:
                fields.append((name, self.describe(item)))
        return ("module", self.describe(type(module)), tuple(fields))

    def _function(self, function: types.FunctionType) -> tuple:
        closure = [_cell_contents(cell) for cell in function.__closure__ or ()]
        if isinstance(function.__module__, str):
            self.modules.add(function.__module__)
        return (
            "function",
            function.__module__,
            function.__qualname__,
            self._code(function.__code__),
            self.describe(function.__defaults__),
            self.describe(function.__kwdefaults__),
            self.describe(closure),
        )

    def _code(self, code: types.CodeType) -> tuple:
        return ("code", code.co_code.hex(), tuple(map(self._constant, code.co_consts)), code.co_names)

    def _constant(self, constant: Any) -> Any:
        """A code object's constant; a set literal in sorted order (its repr's order varies by process)."""
        if isinstance(constant, types.CodeType):
            return self._code(constant)
        if isinstance(constant, frozenset):
            return ("frozenset", *sorted(map(repr, constant)))
        if isinstance(constant, tuple):
            return tuple(map(self._constant, constant))
        return repr(constant)
