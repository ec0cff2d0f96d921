"""Tensor specs (name, dtype, symbolic shape) and the input checks every backend shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from portable_moe.errors import InputError

Dim = int | str | None  # a fixed size, a symbolic name shared between inputs, or unknown


@dataclass(frozen=True)
class TensorSpec:
    """What a model input or output looks like.

    Attributes:
        name: the graph's input or output name.
        dtype: numpy dtype name, e.g. ``"int64"``.
        shape: one entry per axis: an int (fixed), a str (symbolic, e.g. ``"batch"``), or None.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if dim is None else str(dim) for dim in self.shape)
        return f"{self.dtype} [{dims}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(data["shape"]))


def _spec_from_value_info(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    shape: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        else:
            shape.append(None)
    return TensorSpec(value.name, dtype, tuple(shape))


def specs_from_onnx(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of an ONNX graph (initializers listed as inputs are left out)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_spec_from_value_info(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_spec_from_value_info(v) for v in model.graph.output]
    return inputs, outputs


def check_feeds(specs: Sequence[TensorSpec], feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check feeds against the input specs; return them as contiguous numpy arrays.

    Checks names, dtypes, ranks, fixed dimensions, and that a symbolic dimension (``batch``) has
    the same size in every input that uses it.

    Raises:
        InputError: naming the input, what it got and what the model expects.
    """
    if not isinstance(feeds, Mapping):
        raise InputError(f"feeds must be a mapping of input name to array, got {type(feeds).__name__}")
    expected_names = [spec.name for spec in specs]
    missing = [name for name in expected_names if name not in feeds]
    unexpected = [name for name in feeds if name not in expected_names]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if unexpected:
            parts.append(f"unexpected input(s) {', '.join(map(repr, unexpected))}")
        expected = ", ".join(f"{spec.name!r}: {spec.describe()}" for spec in specs)
        raise InputError(f"{'; '.join(parts)}; the model takes {expected}")

    checked: dict[str, np.ndarray] = {}
    symbolic_sizes: dict[str, tuple[int, str]] = {}
    for spec in specs:
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            raise InputError(
                f"input {spec.name!r} is a {type(value).__name__}, expected a numpy array of {spec.describe()}"
            )
        if value.dtype.name != spec.dtype:
            raise InputError(f"input {spec.name!r} has dtype {value.dtype.name}, expected {spec.describe()}")
        if value.ndim != len(spec.shape):
            raise InputError(
                f"input {spec.name!r} has rank {value.ndim} (shape {list(value.shape)}), expected {spec.describe()}"
            )
        for axis, (size, dim) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(dim, int) and size != dim:
                raise InputError(
                    f"input {spec.name!r} has size {size} on axis {axis}, expected {dim} ({spec.describe()})"
                )
            if isinstance(dim, str):
                if size == 0:
                    raise InputError(f"input {spec.name!r} is empty on axis {axis} ({dim}); give at least one element")
                seen = symbolic_sizes.setdefault(dim, (size, spec.name))
                if seen[0] != size:
                    raise InputError(
                        f"input {spec.name!r} has {dim}={size} on axis {axis}, but input {seen[1]!r} has {dim}={seen[0]}"
                    )
        checked[spec.name] = np.ascontiguousarray(value)
    return checked
