"""A decoder graph rewritten for a preallocated key/value cache, written in place.

A bundle's decoder graph (``decoder.onnx``) grows its cache: ``present = Concat(past, new, axis=2)``
copies the whole cache every step, and the cache's length changes every step. Ascend-style serving
instead preallocates the cache at a fixed number of positions, writes each step's keys and values
in place at the current position and masks what lies beyond it. :func:`static_cache_graph` makes
that graph from the decoder graph:

- every ``Concat(past, new, axis=2)`` that makes a present output becomes
  ``ScatterElements(cache, positions, new, axis=2)`` with positions ``cache_position ..
  cache_position + new - 1``: the output is the whole cache with the new positions written;
- the past length, which the graph read from the past inputs' shapes (``Shape(past)[2]``), becomes
  a new input, ``cache_position`` (int64 ``[1]``), so rotary positions and the causal mask count
  from the real position, not from the cache's size;
- a ``Range`` that enumerates key positions (its limit depends on the past length, its start
  does not) runs over the whole cache instead: the causal mask then hides every position after the
  query's own, the unwritten ones and any written by padded tokens included.

The cache axis is named ``positions``. Static-shape backends compile it per gear (npu-sim); on
ONNX Runtime the present output can be bound to the past input's own buffer, so that the write
is truly in place (:class:`portable_moe.run.generation.Generator` does so on the CPU, through
:class:`InPlaceCacheSession`, after :func:`divide_by_root_mean_square` has put the RMS norms in the
form ONNX Runtime fuses).

Needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from portable_moe.errors import BackendError

CACHE_POSITION = "cache_position"
POSITIONS_DIM = "positions"
CACHE_AXIS = 2
_PREFIX = "preallocated_cache"


@dataclass(frozen=True)
class CachePair:
    """One cache tensor: the past input and the present output its ``Concat`` appends to it."""

    past: str
    present: str


def _dims(value: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension]:
    return list(value.type.tensor_type.shape.dim)


def find_cache_pairs(proto: onnx.ModelProto) -> list[CachePair]:
    """The decoder graph's cache pairs: graph outputs made by ``Concat(past input, new, axis=2)``.

    Returns an empty list for a graph without a growing cache (an ordinary model).

    Raises:
        BackendError: when some inputs carry a past axis but are not appended to a present output
            this way (npu-sim could not keep such a cache in gears).
    """
    graph = proto.graph
    inputs = {value.name: value for value in graph.input}
    outputs = {value.name for value in graph.output}
    past_dims = {
        name: dims[CACHE_AXIS].dim_param
        for name, value in inputs.items()
        if len(dims := _dims(value)) == 4 and dims[CACHE_AXIS].dim_param
    }
    pairs = []
    for node in graph.node:
        if node.op_type != "Concat" or len(node.input) != 2 or node.input[0] not in past_dims:
            continue
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), None)
        if axis in (CACHE_AXIS, CACHE_AXIS - 4) and node.output[0] in outputs:
            pairs.append(CachePair(node.input[0], node.output[0]))
    if not pairs:
        return []
    cache_dim = past_dims[pairs[0].past]
    carrying = sorted(name for name, dim in past_dims.items() if dim == cache_dim)
    unpaired = sorted(set(carrying) - {pair.past for pair in pairs})
    if unpaired:
        raise BackendError(
            f"npu-sim keeps a decoder's cache in static gears only when every past input is appended to a present "
            f"output with Concat(past, new, axis=2); not appended that way: {', '.join(unpaired)}"
        )
    return pairs


class _Builder:
    """Appends nodes and constants with unique names to a graph being rewritten."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{_PREFIX}_{hint}_{self.count}"

    def constant(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], hint: str, **attributes: Any) -> tuple[onnx.NodeProto, str]:
        output = self.name(hint)
        return helper.make_node(op_type, list(inputs), [output], name=self.name(op_type), **attributes), output


def _shape_range(node: onnx.NodeProto, rank: int) -> range:
    attributes = {attribute.name: attribute.i for attribute in node.attribute}
    start, end = attributes.get("start", 0), attributes.get("end", rank)
    start, end = (value + rank if value < 0 else value for value in (start, end))
    return range(max(0, start), min(rank, end))


def static_cache_graph(proto: onnx.ModelProto, pairs: Sequence[CachePair]) -> onnx.ModelProto:
    """The decoder graph with a preallocated cache written in place (see the module docstring).

    Args:
        proto: the decoder graph.
        pairs: its cache pairs (:func:`find_cache_pairs`), not empty.

    Returns:
        a new model: inputs ``input_ids``, the caches ``[batch, heads, positions, head_dim]`` and
        ``cache_position``; outputs as before, the present caches at ``positions``.

    Raises:
        BackendError: when the graph reads the past length in a way the rewrite does not know
            (a ``Shape`` of a past input spanning the cache axis and others), or never reads it.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    build = _Builder(graph)
    past_names = {pair.past for pair in pairs}
    presents = {pair.present for pair in pairs}
    first_past = pairs[0].past

    # The cache's size (its positions) for the key ranges: a static constant once a gear is chosen.
    capacity_shape, capacity_1d = build.node("Shape", [first_past], "capacity", start=CACHE_AXIS, end=CACHE_AXIS + 1)
    capacity_node, capacity = build.node("Squeeze", [capacity_1d], "capacity_scalar")
    position_node, position = build.node("Squeeze", [CACHE_POSITION], "position_scalar")
    positions_nodes, positions, count = _new_positions(build, position)
    nodes: list[onnx.NodeProto] = [capacity_shape, capacity_node, position_node, *positions_nodes]
    depends_on_position = {CACHE_POSITION}
    # The past length and the new tokens' count as the graph reads them (Shape, then reshaped or cast).
    past_length: set[str] = set()
    new_length: set[str] = set()
    replaced_shapes = 0
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] == "input_ids" and list(_shape_range(node, 2)) == [1]:
            new_length.update(node.output)
        elif node.op_type in _SAME_VALUE and node.input and node.input[0] in new_length:
            new_length.update(node.output)
        if node.op_type in _SAME_VALUE and node.input and node.input[0] in past_length:
            past_length.update(node.output)
        if node.op_type == "Add" and len(node.input) == 2 and _one_each(node.input, past_length, new_length):
            nodes += _capacity_like(build, node, capacity)
            continue  # the grown cache's length (past + new) is the preallocated cache's size now
        if node.op_type == "Shape" and node.input[0] in past_names:
            span = _shape_range(node, 4)
            if CACHE_AXIS in span and len(span) > 1:
                raise BackendError(
                    f"npu-sim cannot keep this decoder's cache in static gears: node {node.name!r} reads the shape of "
                    f"{node.input[0]!r} across the cache axis and others; it expects Shape(past, start=2, end=3)"
                )
            if CACHE_AXIS in span:
                nodes.append(helper.make_node("Identity", [CACHE_POSITION], list(node.output), name=node.name))
                depends_on_position.update(node.output)
                past_length.update(node.output)
                replaced_shapes += 1
                continue
        if node.op_type == "Concat" and node.output[0] in presents:
            nodes += _write_in_place(build, node, positions, count)
            continue
        if (
            node.op_type == "Range"
            and node.input[1] in depends_on_position
            and node.input[0] not in depends_on_position
        ):
            cast, limit = build.node("CastLike", [capacity, node.input[0]], "key_positions")
            nodes.append(cast)
            rewritten = onnx.NodeProto()
            rewritten.CopyFrom(node)
            rewritten.input[1] = limit
            nodes.append(rewritten)
            continue  # enumerates the whole cache now, whatever the past length
        if depends_on_position.intersection(node.input):
            depends_on_position.update(node.output)
        nodes.append(node)
    if not replaced_shapes:
        raise BackendError(
            "npu-sim cannot keep this decoder's cache in static gears: the graph never reads the past length "
            "(Shape(past, start=2, end=3)), so positions could not be taken from cache_position"
        )
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info(CACHE_POSITION, onnx.TensorProto.INT64, [1]))
    for value in [*graph.input, *graph.output]:
        if value.name in past_names or value.name in presents:
            dim = value.type.tensor_type.shape.dim[CACHE_AXIS]
            dim.Clear()
            dim.dim_param = POSITIONS_DIM
    # Intermediate shapes mentioned the growing length; shape inference recomputes them per gear.
    del graph.value_info[:]
    return model


# Ops that pass a length on unchanged in value (its rank or type may change).
_SAME_VALUE = ("Squeeze", "Unsqueeze", "Reshape", "Cast", "Identity")


def _one_each(inputs: Sequence[str], first: set[str], second: set[str]) -> bool:
    return (inputs[0] in first and inputs[1] in second) or (inputs[0] in second and inputs[1] in first)


def _capacity_like(build: _Builder, node: onnx.NodeProto, capacity: str) -> list[onnx.NodeProto]:
    """The cache's capacity in place of ``node`` (past length + new count), of its input's type and shape."""
    cast, value = build.node("CastLike", [capacity, node.input[0]], "capacity_like")
    shape_node, shape = build.node("Shape", [node.input[0]], "length_shape")
    reshape = helper.make_node("Reshape", [value, shape], list(node.output), name=node.name)
    return [cast, shape_node, reshape]


def divide_by_root_mean_square(proto: onnx.ModelProto) -> int:
    """Rewrite ``x * Reciprocal(Sqrt(v))`` as ``x / Sqrt(v)``, in place; returns how many were rewritten.

    The exported RMS norms multiply by the reciprocal of the root mean square; ONNX Runtime fuses a
    norm into one ``SimplifiedLayerNormalization`` node only when it divides by the root, so each
    norm runs as one node instead of seven (a decode step dispatches ~30 nodes fewer on the small
    preset). The value is the same up to float32 rounding. A ``Reciprocal`` with another consumer is
    left alone.
    """
    graph = proto.graph
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {value.name for value in graph.output}
    removed = []
    for node in graph.node:
        root = producers.get(node.input[0]) if node.op_type == "Reciprocal" else None
        users = consumers.get(node.output[0], []) if root is not None else []
        if root is None or root.op_type != "Sqrt" or node.output[0] in graph_outputs or len(users) != 1:
            continue
        (multiply,) = users
        if (
            multiply.op_type != "Mul"
            or multiply.domain not in ("", "ai.onnx")
            or list(multiply.input).count(node.output[0]) != 1
        ):
            continue
        dividend = next(name for name in multiply.input if name != node.output[0])
        multiply.op_type = "Div"
        del multiply.input[:]
        multiply.input.extend([dividend, node.input[0]])
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def _new_positions(build: _Builder, position: str) -> tuple[list[onnx.NodeProto], str, str]:
    """Nodes computing the new tokens' cache positions ``[1, 1, new, 1]`` and their count ``[1]``.

    The count is read from ``input_ids`` (static at every gear), so the positions' shape is known
    at compile time and only their values depend on ``cache_position``.
    """
    zero = build.constant("zero", np.array(0, dtype=np.int64))
    one = build.constant("one", np.array(1, dtype=np.int64))
    axes = build.constant("axes", np.array([0, 1, 3], dtype=np.int64))
    count_node, count = build.node("Shape", ["input_ids"], "new_count", start=1, end=2)
    scalar_node, scalar = build.node("Squeeze", [count], "new_count_scalar")
    offsets_node, offsets = build.node("Range", [zero, scalar, one], "offsets")
    positions_node, positions = build.node("Add", [offsets, position], "positions")
    shaped_node, shaped = build.node("Unsqueeze", [positions, axes], "positions_4d")
    return [count_node, scalar_node, offsets_node, positions_node, shaped_node], shaped, count


def _write_in_place(build: _Builder, node: onnx.NodeProto, positions: str, count: str) -> list[onnx.NodeProto]:
    """``ScatterElements`` writing ``new`` into the cache at ``positions`` (replaces ``Concat(cache, new)``)."""
    cache, new = node.input[0], node.input[1]
    outer_node, outer = build.node("Shape", [cache], "batch_heads", start=0, end=CACHE_AXIS)
    inner_node, inner = build.node("Shape", [cache], "head_dim", start=CACHE_AXIS + 1)
    shape_node, shape = build.node("Concat", [outer, count, inner], "new_shape", axis=0)
    indices_node, indices = build.node("Expand", [positions, shape], "indices")
    scatter = helper.make_node(
        "ScatterElements", [cache, indices, new], list(node.output), name=node.name, axis=CACHE_AXIS
    )
    return [outer_node, inner_node, shape_node, indices_node, scatter]


class InPlaceCacheSession:
    """The rewritten decoder on an ONNX Runtime CPU session, each present output bound to its past's buffer.

    ``ScatterElements`` whose output is its input's own buffer writes only the new positions, so a
    step no longer copies the cache (the dynamic graph's ``Concat`` copies all of it every step).

    Args:
        compiled: the rewritten graph compiled by an ONNX Runtime backend (it has ``session``).
        pairs: the cache pairs of the graph (:func:`find_cache_pairs`).
        fused_attention: the graph's attention is ONNX Runtime's ``GroupQueryAttention``
            (:mod:`portable_moe.run.fused_attention`), whose CPU kernel refuses several new tokens
            after a past for more than one sequence: such a chunk runs one token at a time.
    """

    def __init__(self, compiled: Any, pairs: Sequence[CachePair], fused_attention: bool = False) -> None:
        self.compiled = compiled
        self.fused_attention = fused_attention
        self.session = compiled.session
        self.pairs = list(pairs)
        presents = {pair.present for pair in self.pairs}
        self.host_outputs = [output.name for output in self.session.get_outputs() if output.name not in presents]
        # get_outputs() lists the bound outputs in the order they were first bound: the caches, then these.
        self._host_indices = {name: len(self.pairs) + index for index, name in enumerate(self.host_outputs)}
        self._binding: Any = None
        self._bound_values: list[Any] | None = None

    def allocate(self, shape: Sequence[int], previous: Sequence[Any] = (), filled: int = 0) -> list[Any]:
        """Zeroed caches of ``shape`` (``[batch, heads, positions, head_dim]``), one per cache input,
        holding the first ``filled`` positions of ``previous`` (a cache being grown)."""
        import onnxruntime

        values = []
        for index in range(len(self.pairs)):
            array = np.zeros(tuple(shape), dtype=np.float32)
            if filled:
                array[:, :, :filled] = previous[index].numpy()[:, :, :filled]
            values.append(onnxruntime.OrtValue.ortvalue_from_numpy(array, "cpu", 0))
        return values

    def run(self, input_ids: np.ndarray, values: Sequence[Any], length: int) -> dict[str, np.ndarray]:
        """One step after ``length`` positions; writes the new ones into ``values``; returns the other outputs.

        The caches are bound once per set of ``values`` (each present output to its past's buffer);
        a step then only binds its token ids and position and asks for the host outputs again.
        """
        batch, new = input_ids.shape
        if self.fused_attention and batch > 1 and new > 1 and length > 0:
            # Causal attention gives each position the same result whether its block runs at once or
            # token by token; every host output is per position ([batch, new, ...]).
            steps = [self.run(input_ids[:, index : index + 1], values, length + index) for index in range(new)]
            return {name: np.concatenate([step[name] for step in steps], axis=1) for name in self.host_outputs}
        if (
            self._bound_values is None
            or len(self._bound_values) != len(values)
            or any(bound is not value for bound, value in zip(self._bound_values, values))
        ):
            self._binding = self.session.io_binding()
            for pair, value in zip(self.pairs, values):
                self._binding.bind_ortvalue_input(pair.past, value)
                self._binding.bind_ortvalue_output(pair.present, value)
            self._bound_values = list(values)
        binding = self._binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(CACHE_POSITION, np.array([length], dtype=np.int64))
        for name in self.host_outputs:
            binding.bind_output(name, "cpu")  # the shape follows the step's token count
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return {name: outputs[index].numpy() for name, index in self._host_indices.items()}


Run = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def verify_rewrite(proto: onnx.ModelProto, pairs: Sequence[CachePair], run_grown: Run, run_rewritten: Run) -> None:
    """Check the rewritten graph against the decoder graph: a 3-token prefill, one decode step, then a 2-token chunk.

    The rewrite recognises how the exported graphs it knows read the past length; a graph that
    reads it some other way (a mask expanded to the grown length, say) would be rewritten wrongly,
    so the two are compared before the rewritten one is used.

    Args:
        proto: the decoder graph (its cache inputs give heads and head size).
        pairs: its cache pairs.
        run_grown / run_rewritten: run the decoder graph / the rewritten graph on numpy feeds.

    Raises:
        BackendError: when the rewritten graph fails or its logits differ from the decoder graph's.
    """
    inputs = {value.name: value for value in proto.graph.input}
    shapes = {}
    for pair in pairs:
        dims = [dim.dim_value for dim in inputs[pair.past].type.tensor_type.shape.dim]
        shapes[pair.past] = (1, dims[1], 0, dims[3])
    grown = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
    capacity = 8  # more than the 6 positions written: unwritten ones stay in the cache at every step
    cache = {name: np.zeros((1, shape[1], capacity, shape[3]), dtype=np.float32) for name, shape in shapes.items()}
    steps = [np.array([[1, 2, 3]], dtype=np.int64), np.array([[4]], dtype=np.int64), np.array([[5, 6]], dtype=np.int64)]
    length = 0
    try:
        for ids in steps:
            expected = run_grown({"input_ids": ids, **grown})
            actual = run_rewritten({"input_ids": ids, CACHE_POSITION: np.array([length], dtype=np.int64), **cache})
            if not np.allclose(actual["logits"], expected["logits"], rtol=1e-4, atol=1e-5):
                worst = float(np.max(np.abs(actual["logits"] - expected["logits"])))
                raise BackendError(f"its logits differ from the decoder graph's by up to {worst:.3g}")
            grown = {pair.past: np.asarray(expected[pair.present]) for pair in pairs}
            cache = {pair.past: np.asarray(actual[pair.present]) for pair in pairs}
            length += ids.shape[1]
    except BackendError as error:
        raise BackendError(f"the decoder graph rewritten for a preallocated cache does not hold: {error}") from None
    except Exception as error:  # the runtime refuses the rewritten graph: it is not one the rewrite knows
        raise BackendError(
            f"the decoder graph rewritten for a preallocated cache does not run: {type(error).__name__}: {error}"
        ) from None
