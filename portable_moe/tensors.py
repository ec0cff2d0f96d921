"""Tensor specs (name, dtype, symbolic shape) and the input checks every backend shares.

:func:`check_feeds` is the one place inputs are checked, for every backend: names, dtypes, ranks,
fixed and shared symbolic sizes, empty axes, non-finite floats (``nan_policy``) and token ids
outside the vocabulary. It returns private, C-contiguous, native-byte-order copies, so a backend
can neither see a strided or read-only view nor modify the caller's arrays.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from portable_moe.errors import BundleError, InputError

Dim = int | str | None  # a fixed size, a symbolic name shared between inputs, or unknown

# What to do with NaN or Inf in a float input: refuse it (the default) or pass it to the backend.
NAN_POLICIES = ("reject", "pass")
# numpy dtype names a tensor spec may carry: those of the ONNX tensor types (strings are "object").
DTYPE_NAMES = frozenset(
    np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).name
    for data_type in onnx.TensorProto.DataType.values()
    if data_type != onnx.TensorProto.UNDEFINED
)


# Dynamic axes that may be empty: a key/value cache holds no positions before the first token.
EMPTY_AXES = frozenset({"past"})


def _valid_dim(dim: object) -> bool:
    if isinstance(dim, bool):
        return False
    return dim is None or (isinstance(dim, int) and dim >= 0) or (isinstance(dim, str) and bool(dim))


@dataclass(frozen=True)
class TensorSpec:
    """What a model input or output looks like.

    Attributes:
        name: the graph's input or output name.
        dtype: numpy dtype name, e.g. ``"int64"``.
        shape: one entry per axis: an int (fixed), a str (symbolic, e.g. ``"batch"``), or None.
        containers: what holds the tensor, outermost first: ``()`` for a plain tensor,
            ``("sequence",)`` for a list of such tensors, ``("optional",)`` for such a tensor or
            None, ``("optional", "sequence")`` for a list or None (ONNX's sequence and optional
            types; models exported by portable-moe only have plain tensors).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    containers: tuple[str, ...] = ()

    def describe(self) -> str:
        dims = ", ".join("?" if dim is None else str(dim) for dim in self.shape)
        return " of ".join([*self.containers, f"{self.dtype} [{dims}]"])

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        return {**data, "containers": list(self.containers)} if self.containers else data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        """Rebuild a spec from :meth:`to_dict` output (as read from a manifest).

        Raises:
            ValueError: if the name, dtype or shape is not one a spec can have.
            KeyError / TypeError: if a field is missing or ``data`` is not a mapping.
        """
        name, dtype, shape = data["name"], data["dtype"], data["shape"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"a tensor name must be a non-empty string, got {name!r}")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_valid_dim(dim) for dim in shape):
            raise ValueError(f"tensor {name!r} has shape {shape!r}; give a list of sizes >= 0, names or null")
        containers = data.get("containers", [])
        if not isinstance(containers, list) or not all(kind in CONTAINERS for kind in containers):
            raise ValueError(f"tensor {name!r} has containers {containers!r}; each must be one of {CONTAINERS}")
        return cls(name=name, dtype=dtype, shape=tuple(shape), containers=tuple(containers))


# dtypes numpy has itself; the other ONNX tensor types (bfloat16, float8, int4 ...) exist in numpy
# only through ml_dtypes, and a runtime's Python binding may not carry them.
NUMPY_NATIVE_DTYPES = frozenset(
    {"bool", "object", "float16", "float32", "float64", "complex64", "complex128"}
    | {f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)}
)


def outputs_not_carried(specs: Sequence[TensorSpec], results: Mapping[str, Any]) -> list[str]:
    """Outputs whose spec has a dtype numpy lacks (bfloat16, float8, int4 ...) and came back as another.

    A runtime's Python binding that has no numpy type for such an output hands back its raw bits
    (uint8) or a converted copy (float16): the values cannot be compared. Each entry reads
    ``"y: uint8 for float8_e4m3fn"``.
    """
    found = []
    for spec in specs:
        value = results.get(spec.name)
        if spec.containers or spec.dtype in NUMPY_NATIVE_DTYPES or not isinstance(value, np.ndarray):
            continue
        if value.dtype.name != spec.dtype:
            found.append(f"{spec.name}: {value.dtype.name} for {spec.dtype}")
    return found


# ONNX types that hold tensors, by the name a spec gives them (maps are not carried).
CONTAINERS = ("sequence", "optional")


def _spec_from_value_info(value: onnx.ValueInfoProto, source: str) -> TensorSpec:
    type_proto, containers = value.type, []
    while type_proto.WhichOneof("value") in ("sequence_type", "optional_type"):
        kind = type_proto.WhichOneof("value")
        containers.append(kind.removesuffix("_type"))
        type_proto = getattr(type_proto, kind).elem_type
    kind = type_proto.WhichOneof("value")
    if kind != "tensor_type":
        raise BundleError(
            f"{source}: graph input/output {value.name!r} is {kind or 'untyped'}, not a tensor; "
            "portable-moe passes tensors, and sequences and optionals of tensors, only"
        )
    tensor_type = type_proto.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    except Exception:  # onnx raises KeyError (or ValueError in some versions) for an unknown type
        raise BundleError(
            f"{source}: graph input/output {value.name!r} has unknown element type {tensor_type.elem_type}"
        ) from None
    shape: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        else:
            shape.append(None)
    return TensorSpec(value.name, dtype, tuple(shape), tuple(containers))


def specs_from_onnx(model: onnx.ModelProto, source: str = "the model") -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of an ONNX graph (initializers listed as inputs are left out).

    Raises:
        BundleError: if an input or output is not a tensor of a known element type.
    """
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_spec_from_value_info(v, source) for v in model.graph.input if v.name not in initializers]
    outputs = [_spec_from_value_info(v, source) for v in model.graph.output]
    return inputs, outputs


def check_nan_policy(policy: object) -> str:
    """Return ``policy`` if it is one of :data:`NAN_POLICIES`.

    Raises:
        InputError: naming the policies that exist.
    """
    if policy not in NAN_POLICIES:
        raise InputError(f"nan_policy must be one of {', '.join(map(repr, NAN_POLICIES))}, got {policy!r}")
    return str(policy)


def _first_position(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(index) for index in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _private_copy(value: np.ndarray) -> np.ndarray:
    """A C-contiguous, writeable, native-byte-order copy: the backend never touches the caller's array."""
    return np.array(value, dtype=value.dtype.newbyteorder("="), order="C", copy=True)


def _check_values(name: str, value: np.ndarray, nan_policy: str, token_id_limit: int | None) -> None:
    # ml_dtypes' bfloat16 and float8 types have numpy kind "V", so go by name as well.
    is_float = value.dtype.kind in "fc" or value.dtype.name.startswith(("float", "bfloat"))
    if nan_policy == "reject" and is_float:
        non_finite = ~np.isfinite(value)
        if non_finite.any():
            position = _first_position(non_finite)
            raise InputError(
                f"input {name!r} contains {int(non_finite.sum())} NaN/Inf value(s), the first ({value[position]}) at "
                f"position {position}; clean the input, or pass nan_policy='pass' to let non-finite values through"
            )
    if token_id_limit is not None and value.dtype.kind in "iu":
        outside = (value < 0) | (value >= token_id_limit)
        if outside.any():
            position = _first_position(outside)
            raise InputError(
                f"input {name!r} has token id {int(value[position])} at position {position}, outside the vocabulary: "
                f"valid ids are 0 to {token_id_limit - 1} (vocab_size {token_id_limit}); "
                f"{int(outside.sum())} id(s) out of range"
            )


def check_feeds(
    specs: Sequence[TensorSpec],
    feeds: Mapping[str, Any],
    *,
    nan_policy: str = "reject",
    token_id_limits: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Check feeds against the input specs; return private copies the backend may use freely.

    Checks names, dtypes, ranks, fixed dimensions, that a symbolic dimension (``batch``) has the
    same size in every input that uses it, that no axis is empty, that float inputs hold no NaN
    or Inf (unless ``nan_policy="pass"``), and that token ids lie inside the vocabulary.
    Non-contiguous, read-only and byte-swapped arrays are accepted: the returned copies are
    C-contiguous, writeable and in native byte order, and the caller's arrays are never modified.

    Args:
        specs: the model's input specs.
        feeds: input name -> numpy array (a list of arrays for a sequence input, None for an
            absent optional one).
        nan_policy: "reject" (default) refuses NaN/Inf in float inputs; "pass" lets them through.
        token_id_limits: input name -> vocabulary size, for inputs that carry token ids.

    Raises:
        InputError: naming the input, what it got and what the model expects.
    """
    check_nan_policy(nan_policy)
    limits = dict(token_id_limits or {})
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

    checked: dict[str, Any] = {}
    symbolic_sizes: dict[str, tuple[int, str]] = {}
    for spec in specs:
        if spec.containers:
            checked[spec.name] = _check_contained(spec, feeds[spec.name], spec.containers, nan_policy)
            continue
        value = feeds[spec.name]
        _check_tensor(spec, value)
        for axis, (size, dim) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(dim, str):
                if size == 0 and dim not in EMPTY_AXES:
                    raise InputError(f"input {spec.name!r} is empty on axis {axis} ({dim}); give at least one element")
                seen = symbolic_sizes.setdefault(dim, (size, spec.name))
                if seen[0] != size:
                    raise InputError(
                        f"input {spec.name!r} has {dim}={size} on axis {axis}, but input {seen[1]!r} has {dim}={seen[0]}"
                    )
        _check_values(spec.name, value, nan_policy, limits.get(spec.name))
        checked[spec.name] = _private_copy(value)
    return checked


# The first bytes of a zip archive (an .npz) and of a single .npy array.
_ZIP_MAGIC, _NPY_MAGIC = b"PK", b"\x93NUMPY"


def load_npz(path: str | os.PathLike[str], flag: str = "--input") -> dict[str, np.ndarray]:
    """Read an ``.npz`` file (one array per name), refusing anything else with a message saying what it is.

    Args:
        path: the file.
        flag: how the user named the file (for the message).

    Raises:
        InputError: if the file is missing, is not an .npz (a text file, a single .npy array) or
            cannot be read; never unpickles.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{flag} {file}: no such file; give an .npz with one array per model input")
    with file.open("rb") as handle:
        head = handle.read(len(_NPY_MAGIC))
    save_hint = "write one with numpy.savez(path, input_ids=array)"
    if head.startswith(_NPY_MAGIC):
        raise InputError(f"{flag} {file}: a single .npy array, not an .npz; {save_hint}")
    if not head.startswith(_ZIP_MAGIC):
        raise InputError(f"{flag} {file}: not an .npz file (an .npz is a zip archive of arrays); {save_hint}")
    try:
        with np.load(file, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except Exception as error:
        raise InputError(f"{flag} {file}: not a readable .npz file ({error})") from None


def _check_tensor(spec: TensorSpec, value: Any) -> None:
    """Type, dtype, rank and fixed sizes of one tensor against its spec."""
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
            raise InputError(f"input {spec.name!r} has size {size} on axis {axis}, expected {dim} ({spec.describe()})")


def _check_contained(spec: TensorSpec, value: Any, containers: tuple[str, ...], nan_policy: str) -> Any:
    """A sequence (list of tensors) or optional (None or the value) input, checked and copied.

    Symbolic sizes are not matched across a sequence's tensors: they may differ from one to the
    next. ONNX often gives a contained tensor no shape at all: then only its dtype is checked.
    """
    if not containers:
        if spec.shape:
            _check_tensor(spec, value)
        elif not isinstance(value, np.ndarray) or value.dtype.name != spec.dtype:
            got = f"dtype {value.dtype.name}" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
            raise InputError(f"input {spec.name!r} holds {got}, expected {spec.describe()}")
        _check_values(spec.name, value, nan_policy, None)
        return _private_copy(value)
    kind, inner = containers[0], containers[1:]
    if kind == "optional":
        return None if value is None else _check_contained(spec, value, inner, nan_policy)
    if not isinstance(value, list | tuple):
        raise InputError(f"input {spec.name!r} is a {type(value).__name__}, expected a list: {spec.describe()}")
    return [_check_contained(spec, item, inner, nan_policy) for item in value]
