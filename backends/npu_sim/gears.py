"""Gears: the static shapes the simulated device is compiled for, and how inputs are fitted to them.

An offline NPU compiler (ATC) builds static shapes only; dynamic inputs are served by a list of
shape profiles (``--dynamic_batch_size="1,2,4,8"``, ``--dynamic_dims``), each compiled on its own.
npu-sim calls a profile a *gear*: a size for every dynamic dimension of the model ("batch=2
seq=32"). At run time an input is padded up to the smallest gear that holds it, and the outputs
are cut back to the input's size.

Padding is exact for causal decoders: the sequence is padded on the right (a causal mask keeps
real positions from seeing later, padded ones) and the batch with extra rows (rows never mix).
A MoE lowering with a per-expert capacity is the exception: padded tokens take capacity slots, so
results match only while nothing is dropped.

This module also builds the static model of one gear and folds what became constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from portable_moe.errors import BackendError, InputError
from portable_moe.tensors import TensorSpec

DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
DEFAULT_SEQ_LENGTHS = (32, 128, 512)
# Folded constants larger than this stay in the graph (a compiler would keep such weights too).
FOLD_LIMIT_BYTES = 16 << 20
# Never folded: their value is not a function of their inputs.
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


@dataclass(frozen=True, order=True)
class Gear:
    """One static shape profile: a size for each dynamic dimension, by dimension name."""

    sizes: tuple[tuple[str, int], ...]

    @property
    def as_dict(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def elements(self) -> int:
        return math.prod(size for _, size in self.sizes)

    def describe(self) -> str:
        return " ".join(f"{name}={size}" for name, size in self.sizes) or "static"

    def key(self) -> str:
        """A file-name-safe name, e.g. ``batch2-seq32``."""
        return "-".join(f"{''.join(c for c in name if c.isalnum())}{size}" for name, size in self.sizes) or "static"


def int_list(value: Any, option: str) -> list[int]:
    """Sizes from ``'1,2,4'``, ``[1, 2, 4]`` or ``4``, sorted and deduplicated.

    Raises:
        BackendError: unless every size is a positive integer.
    """
    try:
        items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
        sizes = sorted({int(item) for item in items})
    except (TypeError, ValueError):
        raise BackendError(
            f"npu-sim option {option} must be positive integers, e.g. '1,2,4,8'; got {value!r}"
        ) from None
    if not sizes or sizes[0] < 1:
        raise BackendError(f"npu-sim option {option} must be positive integers, e.g. '1,2,4,8'; got {value!r}")
    return sizes


def dynamic_dims(inputs: Sequence[TensorSpec]) -> list[str]:
    """The model's dynamic dimension names, in first-seen order.

    Raises:
        BackendError: if an input axis has neither a size nor a name (no gear could size it).
    """
    names: list[str] = []
    for spec in inputs:
        for axis, dim in enumerate(spec.shape):
            if dim is None:
                raise BackendError(
                    f"input {spec.name!r} axis {axis} has neither a fixed size nor a name; npu-sim compiles static "
                    "shapes and needs named dynamic dimensions (e.g. 'batch', 'seq') to build gears for"
                )
            if isinstance(dim, str) and dim not in names:
                names.append(dim)
    return names


def _parse_explicit(entry: Any, names: Sequence[str]) -> dict[str, int]:
    if isinstance(entry, Mapping):
        return {str(name): int(size) for name, size in entry.items()}
    if isinstance(entry, str) and "x" in entry:
        parts = entry.lower().split("x")
        if len(parts) == len(names):
            return {name: int(part) for name, part in zip(names, parts)}
    raise BackendError(
        f"npu-sim gear {entry!r} is not understood; give a mapping like {{'batch': 2, 'seq': 128}} or "
        f"'{'x'.join(['N'] * len(names))}' for ({', '.join(names)})"
    )


def build_gears(inputs: Sequence[TensorSpec], options: Mapping[str, Any]) -> list[Gear]:
    """The gears to compile, from the options ``batch_sizes``, ``seq_lengths`` and ``gears``.

    ``gears`` (explicit profiles, like ATC's ``--dynamic_dims``) replaces the product of
    ``batch_sizes`` and ``seq_lengths`` (like ``--dynamic_batch_size`` with a sequence axis).

    Raises:
        BackendError: for malformed sizes, or a dynamic dimension no option covers.
    """
    names = dynamic_dims(inputs)
    if not names:
        return [Gear(())]
    if options.get("gears"):
        gears = set()
        for entry in options["gears"]:
            sizes = _parse_explicit(entry, names)
            if sorted(sizes) != sorted(names) or min(sizes.values()) < 1:
                raise BackendError(
                    f"npu-sim gear {entry!r} must give a positive size for each of {', '.join(names)} (and nothing else)"
                )
            gears.add(Gear(tuple((name, sizes[name]) for name in names)))
        return sorted(gears, key=lambda gear: (gear.elements, gear.sizes))
    per_dim = {
        "batch": int_list(options.get("batch_sizes", DEFAULT_BATCH_SIZES), "batch_sizes"),
        "seq": int_list(options.get("seq_lengths", DEFAULT_SEQ_LENGTHS), "seq_lengths"),
    }
    uncovered = [name for name in names if name not in per_dim]
    if uncovered:
        raise BackendError(
            f"the model has dynamic dimension(s) {', '.join(map(repr, uncovered))}; batch_sizes and seq_lengths cover "
            "only 'batch' and 'seq', so give explicit gears, e.g. gears=[{"
            + ", ".join(f"'{name}': 8" for name in names)
            + "}]"
        )
    combos: list[list[tuple[str, int]]] = [[]]
    for name in names:
        combos = [combo + [(name, size)] for combo in combos for size in per_dim[name]]
    return sorted((Gear(tuple(combo)) for combo in combos), key=lambda gear: (gear.elements, gear.sizes))


def feed_sizes(inputs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The size of every dynamic dimension in ``feeds`` (already checked for consistency)."""
    sizes: dict[str, int] = {}
    for spec in inputs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                sizes[dim] = int(feeds[spec.name].shape[axis])
    return sizes


def select_gear(gears: Sequence[Gear], sizes: Mapping[str, int]) -> Gear:
    """The smallest gear (fewest elements) that holds ``sizes``.

    Raises:
        InputError: if the input is larger than every gear (the message lists them).
    """
    fitting = [gear for gear in gears if all(size >= sizes.get(name, 0) for name, size in gear.sizes)]
    if not fitting:
        asked = " ".join(f"{name}={size}" for name, size in sizes.items())
        raise InputError(
            f"input size {asked} is larger than every compiled gear of npu-sim "
            f"({'; '.join(gear.describe() for gear in gears)}); compile with larger batch_sizes / seq_lengths "
            "(or gears) options, or split the input"
        )
    return min(fitting, key=lambda gear: (gear.elements, gear.sizes))


def pad_feeds(inputs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray], gear: Gear) -> dict[str, np.ndarray]:
    """Pad every dynamic axis on the right, with zeros, up to the gear's size."""
    target = gear.as_dict
    padded = {}
    for spec in inputs:
        value = feeds[spec.name]
        widths = [(0, target[dim] - size if isinstance(dim, str) else 0) for dim, size in zip(spec.shape, value.shape)]
        padded[spec.name] = np.pad(value, widths) if any(after for _, after in widths) else value
    return padded


def unpad_outputs(
    outputs: Sequence[TensorSpec], results: Mapping[str, np.ndarray], sizes: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Cut every output axis named after a dynamic dimension back to the input's size."""
    cut = {}
    for spec in outputs:
        value = results[spec.name]
        index = tuple(
            slice(0, sizes[dim]) if isinstance(dim, str) and dim in sizes else slice(None) for dim in spec.shape
        )
        needs_cut = any(part != slice(None) for part in index)
        # (np.ascontiguousarray would turn a 0-d output into shape [1]: leave uncut outputs alone.)
        cut[spec.name] = np.ascontiguousarray(value[index]) if needs_cut else value
    return cut


def check_unpaddable(outputs: Sequence[TensorSpec], names: Iterable[str]) -> None:
    """Refuse outputs with a symbolic axis that is not a gear dimension (it could not be cut back).

    Raises:
        BackendError: naming the output and the axis.
    """
    known = set(names)
    for spec in outputs:
        for axis, dim in enumerate(spec.shape):
            if dim is None or (isinstance(dim, str) and dim not in known):
                raise BackendError(
                    f"output {spec.name!r} axis {axis} is {dim!r}, not one of the input dimensions "
                    f"({', '.join(sorted(known)) or 'none'}); npu-sim pads inputs to gears and cannot cut such an axis back"
                )


def _fix_dims(value: onnx.ValueInfoProto, sizes: Mapping[str, int]) -> None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_param"):
            name = dim.dim_param
            dim.Clear()
            if name in sizes:
                dim.dim_value = sizes[name]


def static_model(proto: onnx.ModelProto, gear: Gear) -> onnx.ModelProto:
    """A copy of ``proto`` whose dynamic dimensions have the gear's sizes (and whose nodes all have names).

    Symbolic dimensions that are not gear dimensions (e.g. ``seq*batch`` left by an exporter) are
    cleared, so that shape inference recomputes them from the now static inputs.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    name_nodes(model)
    sizes = gear.as_dict
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        _fix_dims(value, sizes)
    return model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference with data propagation (so Shape -> Concat -> Reshape chains resolve).

    onnx knows no contrib operators (com.microsoft::MoE...): for a model that has some, ONNX
    Runtime's symbolic shape inference, which does, completes the shapes when it can.
    """
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    if all(node.domain in ("", "ai.onnx") for node in model.graph.node):
        return inferred
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(inferred, auto_merge=True, guess_output_rank=True)
    except Exception:  # it refuses some graphs; onnx's partial answer is still right, only less complete
        return inferred


def value_types(model: onnx.ModelProto) -> dict[str, tuple[str | None, tuple[int | None, ...] | None]]:
    """Every typed value of an (inferred) model: name -> (numpy dtype name or None, shape or None)."""
    types: dict[str, tuple[str | None, tuple[int | None, ...] | None]] = {}
    for init in model.graph.initializer:
        types[init.name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).name, tuple(init.dims))
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        tensor_type = value.type.tensor_type if value.type.HasField("tensor_type") else None
        if tensor_type is None or tensor_type.elem_type == 0:
            continue
        try:
            dtype: str | None = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        except (KeyError, TypeError, ValueError):
            dtype = None
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        types.setdefault(value.name, (dtype, shape))
    return types


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(
        attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attribute in node.attribute
    )


def referenced_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name ``node`` reads, including names its subgraphs (If, Loop, Scan) read from outside."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names |= referenced_names(inner)
    return names


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a stable name (``OpType_index``) so reports and gears can refer to them."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)


def fold_constants(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    """Evaluate, at compile time on the host, every node whose value no longer depends on the inputs.

    With static shapes, ``Shape`` nodes are constants, and so is everything computed only from
    them and from initializers (position tables, causal masks, reshape targets). A static-shape
    compiler folds these; so does npu-sim, with ONNX's reference evaluator.

    Args:
        model: a static model (see :func:`static_model`), shape-inferred.
        opset: the model's ai.onnx opset.

    Returns:
        ``(folded model, the nodes that were folded)``.
    """
    from onnx.reference import ReferenceEvaluator

    types = value_types(model)
    initializers = {init.name: init for init in model.graph.initializer}
    graph_inputs = {value.name for value in model.graph.input}
    graph_outputs = {value.name for value in model.graph.output}
    values: dict[str, np.ndarray] = {}

    def is_constant(name: str) -> bool:
        return not name or name in values or (name in initializers and name not in graph_inputs)

    def value_of(name: str) -> np.ndarray:
        if name not in values:
            values[name] = numpy_helper.to_array(initializers[name])
        return values[name]

    def expected_bytes(node: onnx.NodeProto) -> int | None:
        total = 0
        for name in node.output:
            dtype, shape = types.get(name, (None, None))
            if dtype is None or shape is None or None in shape:
                return None
            total += math.prod(shape) * np.dtype(dtype).itemsize  # type: ignore[arg-type]
        return total

    kept: list[onnx.NodeProto] = []
    folded: list[onnx.NodeProto] = []
    for node in model.graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NONDETERMINISTIC
            and not _has_subgraph(node)
            and not graph_outputs.intersection(node.output)
        )
        if foldable and node.op_type in ("Shape", "Size") and not is_constant(node.input[0]):
            shape = types.get(node.input[0], (None, None))[1]
            if shape is None or None in shape:
                kept.append(node)
                continue
            dims = np.array(shape, dtype=np.int64)
            if node.op_type == "Size":
                values[node.output[0]] = np.array(dims.prod(), dtype=np.int64)
            else:
                attributes = {a.name: a.i for a in node.attribute}
                values[node.output[0]] = dims[attributes.get("start", 0) : attributes.get("end", len(dims))]
            folded.append(node)
            continue
        size = expected_bytes(node)
        if not (foldable and all(is_constant(name) for name in node.input)) or (size or 0) > FOLD_LIMIT_BYTES:
            kept.append(node)
            continue
        try:
            evaluator = ReferenceEvaluator(node, opsets={"": opset})
            results = evaluator.run(None, {name: value_of(name) for name in node.input if name})
        except Exception:  # an op the reference evaluator cannot run stays in the graph
            kept.append(node)
            continue
        if sum(np.asarray(result).nbytes for result in results) > FOLD_LIMIT_BYTES:
            kept.append(node)
            continue
        for name, result in zip(node.output, results):
            values[name] = np.asarray(result)
        folded.append(node)

    if not folded:
        return model, []
    used = set().union(*(referenced_names(node) for node in kept)) | graph_outputs
    new_initializers = [init for init in model.graph.initializer if init.name in used or init.name in graph_inputs]
    present = {init.name for init in new_initializers}
    new_initializers += [
        numpy_helper.from_array(values[node_output], node_output)
        for node in folded
        for node_output in node.output
        if node_output in used and node_output not in present
    ]
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(kept)
    del result.graph.initializer[:]
    result.graph.initializer.extend(new_initializers)
    folded_outputs = {name for node in folded for name in node.output}
    kept_value_info = [value for value in result.graph.value_info if value.name not in folded_outputs]
    del result.graph.value_info[:]
    result.graph.value_info.extend(kept_value_info)
    return result, folded
