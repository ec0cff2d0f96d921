"""An in-process cache of traced layer pieces, keyed by the model's structure.

Layer-wise export (:mod:`exporters.layer_graphs`) traces the prologue, one layer of each kind and the
head with every weight a graph *input*, so the traced graph depends on the model's structure (module
classes and their settings, tensor shapes and dtypes, the lowering and its options, the opset, the
example's shape), never on weight values. Exporting the same architecture again, with other
weights, another seed or another weight format, can therefore reuse the traced graph and skip
``torch.export``, its decompositions and the translation to ONNX: most of an export's time.

The key describes everything the trace can read: every module reachable from the traced model
(class, plain attributes, hooks), the shapes and dtypes of its parameters and buffers, the values
of any other tensor it holds (those become constants of the graph), the code, defaults and closure
of every function it holds (a lowering's routed experts bound to their options, for one), the
lowering's translation table, and torch's default dtype. A value the key cannot describe makes the
export skip the cache rather than risk a wrong hit. Code is not re-read: the cache assumes the
exporting code does not change within one process.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import types
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

# Traced graphs kept (least recently used dropped first); each holds no weights, only the graph.
_CAPACITY = 16
_TRACES: OrderedDict[Hashable, Any] = OrderedDict()
_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes)
# Since the process started: graphs traced and stored, and lookups answered from the cache.
_STATISTICS = {"traced": 0, "reused": 0}


class _Undescribable(Exception):
    """A value the structure key cannot describe: the export traces without the cache."""


def lookup(key: Hashable | None) -> Any:
    """The entry stored under ``key``, or None (also for a None key)."""
    if key is None or key not in _TRACES:
        return None
    _TRACES.move_to_end(key)
    _STATISTICS["reused"] += 1
    return _TRACES[key]


def store(key: Hashable | None, entry: Any) -> None:
    """Keep ``entry`` under ``key`` (a None key stores nothing)."""
    if key is None:
        return
    _TRACES[key] = entry
    _TRACES.move_to_end(key)
    _STATISTICS["traced"] += 1
    while len(_TRACES) > _CAPACITY:
        _TRACES.popitem(last=False)


def clear_trace_cache() -> None:
    """Forget every traced graph: the next export of any model traces it again."""
    _TRACES.clear()


def trace_cache_statistics() -> dict[str, int]:
    """``{"traced": graphs traced and stored, "reused": exports that took one from the cache}``."""
    return dict(_STATISTICS)


def structure_key(*parts: Any) -> Hashable | None:
    """A hashable description of ``parts`` (modules, tensors, functions, plain values), or None.

    Parameters and buffers of modules are described by shape and dtype only (they are graph inputs
    while tracing); any other tensor by its values too. None when something cannot be described.
    """
    import torch

    try:
        description = _Describer(torch).describe((parts, torch.get_default_dtype()))
    except _Undescribable:
        return None
    return hashlib.sha256(repr(description).encode()).hexdigest()


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

    def describe(self, value: Any) -> Any:
        torch = self.torch
        if isinstance(value, _PRIMITIVES):
            return (type(value).__name__, repr(value))
        if isinstance(value, (enum.Enum, torch.dtype, torch.device, torch.Size)):
            return (type(value).__name__, str(value))
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, *map(self.describe, value))
        if isinstance(value, type):
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
        constants = tuple(
            self._code(item) if isinstance(item, types.CodeType) else repr(item) for item in code.co_consts
        )
        return ("code", code.co_code.hex(), constants, code.co_names)
