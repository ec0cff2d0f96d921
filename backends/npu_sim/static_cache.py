"""A static-shape key/value cache for npu-sim: the decoder graph rewritten for preallocated gears.

A bundle's decoder graph (``decoder.onnx``) grows its cache: ``present = Concat(past, new, axis=2)``,
so the cache's length changes every step. A static-shape compiler cannot build that. Ascend-style
serving instead preallocates the cache at a fixed number of positions (a *cache gear*: 128, 512,
2048...), writes each step's keys and values in place at the current position and masks what lies
beyond it. :func:`static_cache_graph` makes that graph from the decoder graph:

- every ``Concat(past, new, axis=2)`` that makes a present output becomes
  ``ScatterElements(cache, positions, new, axis=2)`` with positions ``cache_position ..
  cache_position + new - 1``: the output is the whole cache with the new positions written;
- the past length, which the graph read from the past inputs' shapes (``Shape(past)[2]``), becomes
  a new input, ``cache_position`` (int64 ``[1]``), so rotary positions and the causal mask count
  from the real position, not from the cache's size;
- a ``Range`` that enumerates key positions (its limit depends on the past length, its start
  does not) runs over the whole cache instead: the causal mask then hides every position after the
  query's own, the unwritten ones and any written by a padded prompt included.

The cache axis is named ``positions``; with ``batch`` and ``new`` it makes the decoder's gears.
Padding is exact: padded prompt tokens sit after the real ones (causal), and what they write into
the cache lies beyond the real length, masked until a later step overwrites it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from backends.npu_sim.gears import Gear, build_gears, int_list
from portable_moe.backend import CompiledModel, ModelInput
from portable_moe.errors import BackendError, InputError
from portable_moe.tensors import TensorSpec, check_feeds

CACHE_POSITION = "cache_position"
POSITIONS_DIM = "positions"
DEFAULT_CACHE_POSITIONS = (128, 512, 2048)
_CACHE_AXIS = 2
_PREFIX = "npu_sim_static_cache"


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
        name: dims[_CACHE_AXIS].dim_param
        for name, value in inputs.items()
        if len(dims := _dims(value)) == 4 and dims[_CACHE_AXIS].dim_param
    }
    pairs = []
    for node in graph.node:
        if node.op_type != "Concat" or len(node.input) != 2 or node.input[0] not in past_dims:
            continue
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), None)
        if axis in (_CACHE_AXIS, _CACHE_AXIS - 4) and node.output[0] in outputs:
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
    capacity_shape, capacity_1d = build.node("Shape", [first_past], "capacity", start=_CACHE_AXIS, end=_CACHE_AXIS + 1)
    capacity_node, capacity = build.node("Squeeze", [capacity_1d], "capacity_scalar")
    position_node, position = build.node("Squeeze", [CACHE_POSITION], "position_scalar")
    positions_nodes, positions, count = _new_positions(build, position)
    nodes: list[onnx.NodeProto] = [capacity_shape, capacity_node, position_node, *positions_nodes]
    depends_on_position = {CACHE_POSITION}
    replaced_shapes = 0
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] in past_names:
            span = _shape_range(node, 4)
            if _CACHE_AXIS in span and len(span) > 1:
                raise BackendError(
                    f"npu-sim cannot keep this decoder's cache in static gears: node {node.name!r} reads the shape of "
                    f"{node.input[0]!r} across the cache axis and others; it expects Shape(past, start=2, end=3)"
                )
            if _CACHE_AXIS in span:
                nodes.append(helper.make_node("Identity", [CACHE_POSITION], list(node.output), name=node.name))
                depends_on_position.update(node.output)
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
            dim = value.type.tensor_type.shape.dim[_CACHE_AXIS]
            dim.Clear()
            dim.dim_param = POSITIONS_DIM
    # Intermediate shapes mentioned the growing length; shape inference recomputes them per gear.
    del graph.value_info[:]
    return model


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
    outer_node, outer = build.node("Shape", [cache], "batch_heads", start=0, end=_CACHE_AXIS)
    inner_node, inner = build.node("Shape", [cache], "head_dim", start=_CACHE_AXIS + 1)
    shape_node, shape = build.node("Concat", [outer, count, inner], "new_shape", axis=0)
    indices_node, indices = build.node("Expand", [positions, shape], "indices")
    scatter = helper.make_node(
        "ScatterElements", [cache, indices, new], list(node.output), name=node.name, axis=_CACHE_AXIS
    )
    return [outer_node, inner_node, shape_node, indices_node, scatter]


def decoder_gears(inputs: Sequence[TensorSpec], options: Mapping[str, Any]) -> list[Gear]:
    """The gears of a static-cache decoder graph: batch x new tokens x cache positions.

    ``new`` takes 1 (a decode step) and the ``seq_lengths`` (prompt chunks for prefill: a longer
    prompt is prefilled in chunks); ``positions`` the ``cache_positions``; only gears whose new
    tokens fit their cache are kept.
    Explicit ``gears`` (mappings over batch, new, positions) replace the product.

    Raises:
        BackendError: for malformed sizes, or explicit gears missing a dimension.
    """
    if options.get("gears"):
        return build_gears(inputs, options)
    batches = int_list(options["batch_sizes"], "batch_sizes")
    news = sorted({1, *int_list(options["seq_lengths"], "seq_lengths")})
    positions = int_list(options["cache_positions"], "cache_positions")
    gears = [
        Gear((("batch", batch), ("new", new), (POSITIONS_DIM, size)))
        for batch in batches
        for new in news
        for size in positions
        if new <= size
    ]
    return sorted(gears, key=lambda gear: (gear.as_dict[POSITIONS_DIM], gear.as_dict["batch"], gear.as_dict["new"]))


def select_cache_gear(gears: Sequence[Gear], batch: int, new: int, length: int, at_least: int = 0) -> Gear:
    """The gear for ``new`` tokens after ``length`` cached positions in a batch of ``batch``.

    The smallest cache (at least ``at_least`` positions: a cache never shrinks during a request)
    whose positions hold the padded new tokens after ``length``; then the smallest batch and new.

    Raises:
        InputError: when no gear holds them (the message gives the largest cache and what to do).
    """
    fitting = [
        gear
        for gear in gears
        if (sizes := gear.as_dict)["batch"] >= batch
        and sizes["new"] >= new
        and sizes[POSITIONS_DIM] >= max(at_least, length + sizes["new"])
    ]
    if not fitting:
        largest = max(gear.as_dict[POSITIONS_DIM] for gear in gears)
        raise InputError(
            f"{length + new} positions (batch {batch}, {new} new after {length}) do not fit npu-sim's cache gears "
            f"(largest: {largest} positions); shorten the prompt or generate fewer tokens, or compile with larger "
            "cache_positions (-O cache_positions=...)"
        )
    return min(fitting, key=lambda gear: (gear.as_dict[POSITIONS_DIM], gear.as_dict["batch"], gear.as_dict["new"]))


def _into_gear(values: Mapping[str, np.ndarray], gear: Gear) -> dict[str, np.ndarray]:
    """Caches padded with zeros to ``gear``'s batch and positions (arrays already that size are kept)."""
    sizes = gear.as_dict
    padded = {}
    for name, value in values.items():
        widths = [(0, sizes["batch"] - value.shape[0]), (0, 0), (0, sizes[POSITIONS_DIM] - value.shape[2]), (0, 0)]
        padded[name] = np.pad(value, widths) if any(after for _, after in widths) else value
    return padded


@dataclass
class GearCache:
    """A cache preallocated at a gear: one array per cache input, ``[gear batch, heads, positions, head_dim]``.

    Attributes:
        values: cache input name -> array, as the last step's run wrote it.
        batch: the request's real batch (the arrays may hold padding rows).
        gear: the gear the cache was last run at (its positions are the cache's size).
    """

    values: dict[str, np.ndarray]
    batch: int
    gear: Gear

    @property
    def positions(self) -> int:
        return self.gear.as_dict[POSITIONS_DIM]


class StaticCacheDecoder(CompiledModel):
    """A decoder graph compiled for npu-sim with its cache in static gears.

    ``run`` keeps the decoder graph's interface (past caches of any length in, present ones
    out: each call places the past into a gear's cache and cuts the present back).
    :meth:`new_cache` and :meth:`run_with_cache` keep the cache in its gear between steps, as a
    generation loop does (:class:`portable_moe.run.generation.Generator` uses them).

    Args:
        backend: the npu-sim backend.
        model: the decoder graph as given (its dynamic specs are what ``run`` checks).
        device: the static-cache graph compiled for npu-sim (gears over batch, new, positions).
        pairs: the cache pairs (:func:`find_cache_pairs`).
    """

    def __init__(self, backend: Any, model: ModelInput, device: Any, pairs: Sequence[CachePair]) -> None:
        super().__init__(backend, model)
        self.device = device
        self.precision = device.precision
        self.gears = device.gears
        self.pairs = list(pairs)
        self._ids_spec = [spec for spec in model.inputs if spec.name == "input_ids"]
        self._cache_gears: Counter[str] = Counter()
        self._lock = threading.Lock()

    def placement(self) -> dict[str, int]:
        return self.device.placement()

    def report(self) -> Any:
        """npu-sim's compile report, with the cache gear each request was given."""
        report = self.device.report()
        with self._lock:
            report.runs["cache_gears"] = dict(self._cache_gears)
        return report

    def cache_gear(self, batch: int, positions: int) -> Gear:
        """The gear a request of ``batch`` sequences needing ``positions`` positions gets.

        Raises:
            InputError: when ``positions`` exceeds the largest cache gear.
        """
        largest = max(gear.as_dict[POSITIONS_DIM] for gear in self.gears)
        if positions > largest:
            raise InputError(
                f"the request needs {positions} cache positions (prompt plus new tokens); npu-sim's largest cache gear "
                f"holds {largest}: shorten the prompt or generate fewer tokens, or compile with larger cache_positions "
                "(-O cache_positions=...)"
            )
        return select_cache_gear(self.gears, batch, 1, positions - 1)

    def new_cache(self, batch: int, positions: int) -> GearCache:
        """An empty cache preallocated at the gear for ``positions`` (recorded in the compile report).

        Raises:
            InputError: when ``positions`` exceeds the largest cache gear.
        """
        gear = self.cache_gear(batch, positions)
        with self._lock:
            self._cache_gears[f"{POSITIONS_DIM}={gear.as_dict[POSITIONS_DIM]}"] += 1
        sizes = gear.as_dict
        values = {}
        for spec in self.device.inputs:
            if len(spec.shape) == 4 and spec.shape[_CACHE_AXIS] == POSITIONS_DIM:
                shape = [sizes[dim] if isinstance(dim, str) else dim for dim in spec.shape]
                values[spec.name] = np.zeros(shape, dtype=np.dtype(spec.dtype))
        return GearCache(values, batch, gear)

    def run_with_cache(
        self, input_ids: np.ndarray, cache: GearCache, length: int
    ) -> tuple[dict[str, np.ndarray], GearCache]:
        """Run ``input_ids`` after the ``length`` positions ``cache`` holds; write the new ones in place.

        A step whose padded tokens would not fit the cache's gear moves the cache into the next
        larger one.

        Returns:
            ``(outputs other than the caches, cut to the real batch and tokens; the cache after the step)``.

        Raises:
            InputError: for bad token ids, a batch other than the cache's, or a step past the largest gear.
        """
        ids = check_feeds(self._ids_spec, {"input_ids": input_ids}, token_id_limits=self.token_id_limits)["input_ids"]
        if ids.shape[0] != cache.batch:
            raise InputError(f"input_ids has batch {ids.shape[0]}, the cache holds {cache.batch}; start a new cache")
        # More new tokens than the largest gear takes are run in chunks (chunked prefill).
        chunk = max(gear.as_dict["new"] for gear in self.gears)
        pieces = []
        for start in range(0, ids.shape[1], chunk):
            outputs, cache = self._run_chunk(ids[:, start : start + chunk], cache, length + start)
            pieces.append(outputs)
        if len(pieces) == 1:
            return pieces[0], cache
        return {name: np.concatenate([piece[name] for piece in pieces], axis=1) for name in pieces[0]}, cache

    def _run_chunk(self, ids: np.ndarray, cache: GearCache, length: int) -> tuple[dict[str, np.ndarray], GearCache]:
        batch, new = ids.shape
        gear = select_cache_gear(self.gears, cache.gear.as_dict["batch"], new, length, at_least=cache.positions)
        sizes = gear.as_dict
        feeds = {
            "input_ids": np.pad(ids, ((0, sizes["batch"] - batch), (0, sizes["new"] - new))),
            CACHE_POSITION: np.array([length], dtype=np.int64),
            **_into_gear(cache.values, gear),
        }
        results = self.device.run_gear(gear, feeds, (sizes["batch"], sizes["new"]) != (batch, new))
        present = {pair.past: results[pair.present] for pair in self.pairs}
        cache_outputs = {pair.present for pair in self.pairs}
        outputs = {
            name: np.ascontiguousarray(value[:batch, :new])
            for name, value in results.items()
            if name not in cache_outputs
        }
        return outputs, GearCache(present, batch, gear)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch, new = feeds["input_ids"].shape
        length = feeds[self.pairs[0].past].shape[_CACHE_AXIS]
        gear = select_cache_gear(self.gears, batch, new, length)
        with self._lock:
            self._cache_gears[f"{POSITIONS_DIM}={gear.as_dict[POSITIONS_DIM]}"] += 1
        past = GearCache({pair.past: feeds[pair.past] for pair in self.pairs}, batch, gear)
        outputs, cache = self.run_with_cache(feeds["input_ids"], past, length)
        for pair in self.pairs:
            outputs[pair.present] = np.ascontiguousarray(cache.values[pair.past][:batch, :, : length + new])
        return outputs
