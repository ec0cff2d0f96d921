"""The preallocated-cache decoder's attention as ONNX Runtime's fused ``GroupQueryAttention``.

:func:`~portable_moe.run.preallocated_cache.static_cache_graph` leaves each layer's attention as the
exporter wrote it: the projections are split into heads (``Reshape``, ``Transpose``), rotated
(rotate-half rotary: ``x * cos + Concat(-x2, x1) * sin``), the new keys and values are written into
the cache (``ScatterElements``), and the core runs over the whole cache::

    MatMul(q, Transpose(key_cache)) -> Mul(scale) -> Where(future, -inf, .) -> Softmax -> MatMul(., value_cache)

followed by ``Transpose`` and ``Reshape`` back to ``[batch, new, heads * head_dim]``: about 35 nodes a
layer, and the core reads every cached position, written or not. :func:`fuse_group_query_attention`
replaces all of it with one ``com.microsoft.GroupQueryAttention`` node per layer, fed the
projections as they are (``[batch, new, heads * head_dim]``), the caches (its past and present, which
the caller binds to one buffer so that it writes only the new positions: ONNX Runtime's
``past_present_share_buffer``), ``seqlens_k`` (``cache_position + new - 1`` per sequence),
``total_sequence_length`` (``cache_position + new``) and the rotary tables, which it applies itself
(``do_rotary``, ``rotary_interleaved=0``). It reads only the written positions.

The rotary tables are the graph's own: the part of the graph that computes ``cos`` and ``sin``
from the positions is run once, on ONNX Runtime, for every position up to ``max_positions``.

What the fused op computes differs from the graph in one case only: a block of several new tokens
after a past (a chunk) with more than one sequence, which ONNX Runtime's CPU kernel refuses; the
caller runs such a chunk one token at a time (:class:`~portable_moe.run.preallocated_cache.InPlaceCacheSession`).
Anything that is not exactly this pattern leaves the graph as it is (the function returns None),
and the caller checks the fused graph against the decoder graph before using it.

Needs no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from portable_moe.run.preallocated_cache import CACHE_POSITION

FUSED_DOMAIN = "com.microsoft"
FUSED_OP = "GroupQueryAttention"
_PREFIX = "fused_attention"
# ONNX Runtime's CPU kernel takes a head size that is a multiple of 16 when it applies the rotary.
_HEAD_SIZE_MULTIPLE = 16
# From this opset on, Softmax normalises one axis (-1 by default); before it, it flattened the trailing axes.
_SOFTMAX_LAST_AXIS = 13


@dataclass(frozen=True)
class _Core:
    """One layer's attention, as the fused op takes it."""

    query: str  # [batch, new, heads * head_dim], before rotation
    key: str
    value: str
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    output: str  # [batch, new, heads * head_dim], the attention before its output projection
    scale: float
    cos: str  # the rotary tables [new, head_dim] the graph computes
    sin: str


class _Graph:
    """Producers, consumers and constants of a graph, for matching."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {output: node for node in graph.node for output in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in graph.output}
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}

    def node(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The standard-domain node of ``op_type`` that produces ``name``, else None."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        return node

    def only_use(self, name: str) -> onnx.NodeProto | None:
        """The one node that reads ``name`` when nothing else does (nor the graph's outputs)."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is an initializer or a ``Constant`` node, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.node(name, "Constant")
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None


def _attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _split_heads(graph: _Graph, name: str) -> str | None:
    """``x`` when ``name`` is ``Transpose(Reshape(x), perm=[0, 2, 1, 3])`` ([batch, new, H] to heads)."""
    transpose = graph.node(name, "Transpose")
    if transpose is None or list(_attribute(transpose, "perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = graph.node(transpose.input[0], "Reshape")
    return reshape.input[0] if reshape is not None else None


def _rotate_half_of(graph: _Graph, name: str) -> str | None:
    """``x`` when ``name`` is ``Concat(Neg(second half of x), first half of x)`` on the last axis."""
    concat = graph.node(name, "Concat")
    if concat is None or len(concat.input) != 2 or _attribute(concat, "axis") not in (-1, 3):
        return None
    negate = graph.node(concat.input[0], "Neg")
    split = graph.node(negate.input[0], "Split") if negate is not None else None
    if split is None or len(split.output) != 2 or _attribute(split, "axis") not in (-1, 3):
        return None
    if len(split.input) > 1 and split.input[1]:  # explicit sizes: they must be two equal halves
        sizes = graph.constant(split.input[1])
        if sizes is None or sizes.size != 2 or sizes[0] != sizes[1]:
            return None
    if (negate.input[0], concat.input[1]) != (split.output[1], split.output[0]):
        return None
    return split.input[0]


def _unrotated(graph: _Graph, name: str) -> tuple[str, str, str] | None:
    """``(x, cos, sin)`` when ``name`` is ``x * cos + rotate_half(x) * sin`` (in any operand order)."""
    add = graph.node(name, "Add")
    if add is None:
        return None
    for cos_side, sin_side in (add.input, reversed(add.input)):
        by_cos, by_sin = graph.node(cos_side, "Mul"), graph.node(sin_side, "Mul")
        if by_cos is None or by_sin is None:
            continue
        for rotated, sin in (by_sin.input, reversed(by_sin.input)):
            x = _rotate_half_of(graph, rotated)
            if x is not None and x in by_cos.input:
                cos = by_cos.input[1] if by_cos.input[0] == x else by_cos.input[0]
                return x, cos, sin
    return None


def _written(graph: _Graph, present: str, pasts: set[str]) -> tuple[str, str] | None:
    """``(past, new)`` when ``present`` is the in-place write ``ScatterElements(past, positions, new, axis=2)``."""
    scatter = graph.node(present, "ScatterElements")
    if scatter is None or scatter.input[0] not in pasts or _attribute(scatter, "axis") not in (2, -2):
        return None
    if _attribute(scatter, "reduction", b"none") not in (b"none", "none"):
        return None
    return scatter.input[0], scatter.input[2]


def _core(graph: _Graph, present_key: str, pasts: set[str]) -> _Core | None:
    """The attention that reads the cache ``present_key``, when it is exactly the pattern fused."""
    users = graph.consumers.get(present_key, [])
    if len(users) != 1 or users[0].op_type != "Transpose" or list(_attribute(users[0], "perm", [])) != [0, 1, 3, 2]:
        return None
    transpose = users[0]
    scores = graph.only_use(transpose.output[0])
    if scores is None or scores.op_type != "MatMul" or scores.input[1] != transpose.output[0]:
        return None
    scaled = graph.only_use(scores.output[0])
    if scaled is None or scaled.op_type != "Mul":
        return None
    scale = graph.constant(next((name for name in scaled.input if name != scores.output[0]), ""))
    if scale is None or scale.size != 1:
        return None
    masked = graph.only_use(scaled.output[0])
    if masked is None or masked.op_type != "Where" or masked.input[2] != scaled.output[0]:
        return None
    fill, future = graph.constant(masked.input[1]), graph.node(masked.input[0], "Greater")
    if fill is None or fill.size != 1 or not np.isneginf(fill).all() or future is None:
        return None
    softmax = graph.only_use(masked.output[0])
    if softmax is None or softmax.op_type != "Softmax" or _attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    attended = graph.only_use(softmax.output[0])
    if attended is None or attended.op_type != "MatMul" or attended.input[0] != softmax.output[0]:
        return None
    present_value = attended.input[1]
    value_users = graph.consumers.get(present_value, [])
    if len(value_users) != 1 or present_value not in graph.outputs:
        return None
    merged = graph.only_use(attended.output[0])
    if merged is None or merged.op_type != "Transpose" or list(_attribute(merged, "perm", [])) != [0, 2, 1, 3]:
        return None
    output = graph.only_use(merged.output[0])
    if output is None or output.op_type != "Reshape" or present_key not in graph.outputs:
        return None
    key_write, value_write = _written(graph, present_key, pasts), _written(graph, present_value, pasts)
    query_rotation = _unrotated(graph, scores.input[0])
    key_rotation = _unrotated(graph, key_write[1]) if key_write else None
    if value_write is None or query_rotation is None or key_rotation is None:
        return None
    if query_rotation[1:] != key_rotation[1:]:
        return None  # the queries and keys must be rotated by the same tables
    query, key, value = (_split_heads(graph, name) for name in (query_rotation[0], key_rotation[0], value_write[1]))
    if query is None or key is None or value is None:
        return None
    return _Core(
        query,
        key,
        value,
        key_write[0],
        value_write[0],
        present_key,
        present_value,
        output.output[0],
        float(scale.reshape(())),
        *query_rotation[1:],
    )


def _rotary_tables(
    graph: _Graph, proto: onnx.ModelProto, cos: str, sin: str, max_positions: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(cos_cache, sin_cache) [max_positions, head_dim / 2]``: the graph's own tables, computed by
    running the part of it that makes ``cos`` and ``sin`` for positions ``0 .. max_positions - 1``.

    None when that part reads more than the new tokens' count and ``cache_position``, or its tables
    are not rotate-half tables (the same angles in both halves)."""
    import onnxruntime

    graph_inputs = {value.name for value in graph.graph.input}
    needed, nodes, stack = set(), [], [cos, sin]
    while stack:
        name = stack.pop()
        if not name or name in needed or name in graph.initializers or name in graph_inputs:
            continue
        node = graph.producer.get(name)
        if node is None:
            return None
        needed.add(name)
        nodes.append(node)
        for read in node.input:
            if read in graph_inputs and read != CACHE_POSITION and (read, node.op_type) != ("input_ids", "Shape"):
                return None  # the tables would depend on the tokens or the cache, not on positions only
            stack.append(read)
    inputs = {name for node in nodes for name in node.input}
    order = {id(node): index for index, node in enumerate(graph.graph.node)}
    subgraph = helper.make_graph(
        sorted({id(node): node for node in nodes}.values(), key=lambda node: order[id(node)]),
        "rotary_tables",
        [value for value in graph.graph.input if value.name in inputs],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in (cos, sin)],
        [tensor for tensor in graph.graph.initializer if tensor.name in inputs],
    )
    model = helper.make_model(subgraph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    feeds = {"input_ids": np.zeros((1, max_positions), dtype=np.int64), CACHE_POSITION: np.zeros(1, dtype=np.int64)}
    feeds = {name: value for name, value in feeds.items() if name in inputs}
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        tables = [np.asarray(table, dtype=np.float32) for table in session.run([cos, sin], feeds)]
    except Exception:  # a part that does not run on its own is not the pattern fused
        return None
    halves = []
    for table in tables:
        table = table.reshape(table.shape[-2:]) if table.ndim > 2 and table.size == np.prod(table.shape[-2:]) else table
        if table.ndim != 2 or table.shape[0] != max_positions or table.shape[1] % 2:
            return None
        first, second = np.split(table, 2, axis=1)
        if not np.array_equal(first, second):
            return None
        halves.append(np.ascontiguousarray(first))
    return halves[0], halves[1]


def _cache_heads(proto: onnx.ModelProto, past: str) -> tuple[int, int] | None:
    """``(heads, head_dim)`` of a cache input, when both are static."""
    value = next(value for value in proto.graph.input if value.name == past)
    dims = value.type.tensor_type.shape.dim
    heads, head_dim = dims[1].dim_value, dims[3].dim_value
    return (heads, head_dim) if heads and head_dim else None


def fuse_group_query_attention(
    proto: onnx.ModelProto, pasts: Sequence[str], max_positions: int
) -> onnx.ModelProto | None:
    """The preallocated-cache decoder graph with each attention as one ``GroupQueryAttention`` node.

    Args:
        proto: a graph from :func:`~portable_moe.run.preallocated_cache.static_cache_graph` (not changed).
        pasts: its cache inputs.
        max_positions: the longest sequence it will run (the rotary tables' length).

    Returns:
        a new model, or None when some cache is not read by exactly the attention pattern this fuses
        (see the module docstring): then nothing is fused.
    """
    graph = _Graph(proto.graph)
    past_names = set(pasts)
    presents = [
        node.output[0] for node in proto.graph.node if node.op_type == "ScatterElements" and node.input[0] in past_names
    ]
    key_presents = [
        present for present in presents if [node.op_type for node in graph.consumers.get(present, [])] == ["Transpose"]
    ]
    found = [_core(graph, present, past_names) for present in key_presents]
    cores = [core for core in found if core is not None]
    written = {name for core in cores for name in (core.present_key, core.present_value)}
    if not cores or len(cores) != len(found) or len(written) != len(past_names) or _opset(proto) < _SOFTMAX_LAST_AXIS:
        return None
    shapes = {_cache_heads(proto, core.past_key) for core in cores}
    shape = shapes.pop() if len(shapes) == 1 else None
    if shape is None or shape[1] % _HEAD_SIZE_MULTIPLE or len({(core.cos, core.sin) for core in cores}) != 1:
        return None
    tables = _rotary_tables(graph, proto, cores[0].cos, cores[0].sin, max_positions)
    return _fused(proto, cores, shape[0], tables) if tables is not None else None


def _opset(proto: onnx.ModelProto) -> int:
    return next((opset.version for opset in proto.opset_import if opset.domain in ("", "ai.onnx")), 0)


def _fused(
    proto: onnx.ModelProto, cores: list[_Core], heads: int, tables: tuple[np.ndarray, np.ndarray]
) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    cos_cache, sin_cache = f"{_PREFIX}_cos_cache", f"{_PREFIX}_sin_cache"
    graph.initializer.extend(
        [numpy_helper.from_array(tables[0], cos_cache), numpy_helper.from_array(tables[1], sin_cache)]
    )
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int32), f"{_PREFIX}_one"))
    lengths = [
        helper.make_node("Shape", ["input_ids"], [f"{_PREFIX}_batch"], start=0, end=1),
        helper.make_node("Shape", ["input_ids"], [f"{_PREFIX}_new"], start=1, end=2),
        helper.make_node("Add", [CACHE_POSITION, f"{_PREFIX}_new"], [f"{_PREFIX}_total64"]),
        helper.make_node("Cast", [f"{_PREFIX}_total64"], [f"{_PREFIX}_total"], to=onnx.TensorProto.INT32),
        helper.make_node("Squeeze", [f"{_PREFIX}_total"], [f"{_PREFIX}_total_scalar"]),
        helper.make_node("Sub", [f"{_PREFIX}_total", f"{_PREFIX}_one"], [f"{_PREFIX}_last"]),
        helper.make_node("Expand", [f"{_PREFIX}_last", f"{_PREFIX}_batch"], [f"{_PREFIX}_seqlens_k"]),
    ]
    for index, node in enumerate(lengths):
        node.name = f"{_PREFIX}_{node.op_type}_{index}"
    by_output = {core.output: core for core in cores}
    replaced = {name for core in cores for name in (core.output, core.present_key, core.present_value)}
    nodes = list(lengths)
    for node in graph.node:
        core = by_output.get(node.output[0])
        if core is not None:
            nodes.append(
                helper.make_node(
                    FUSED_OP,
                    [
                        core.query,
                        core.key,
                        core.value,
                        core.past_key,
                        core.past_value,
                        f"{_PREFIX}_seqlens_k",
                        f"{_PREFIX}_total_scalar",
                        cos_cache,
                        sin_cache,
                    ],
                    [core.output, core.present_key, core.present_value],
                    name=f"{_PREFIX}_{core.present_key}",
                    domain=FUSED_DOMAIN,
                    num_heads=heads,
                    kv_num_heads=heads,
                    scale=core.scale,
                    do_rotary=1,
                    rotary_interleaved=0,
                )
            )
        elif not replaced.intersection(node.output):
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(_live(nodes, {value.name for value in graph.output}))
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(opset.domain == FUSED_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    return model


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` (in topological order) without those whose outputs nothing reads."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]
