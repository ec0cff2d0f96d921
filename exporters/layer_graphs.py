"""Layer-wise export: each kind of decoder layer is exported once and stamped out per layer.

Exporting a whole decoder with ``torch.onnx.export`` costs seconds per layer (``torch.export``
traces every op of every layer, then torch.onnx's decompositions trace it again, unless
:func:`exporters.torch_onnx_shortcuts.translation_as_traced` can skip them). The layers of a decoder come in a few kinds
(a dense layer, an MoE layer) that differ only in their weights, so this module traces, each in a
``torch.onnx.export`` call of its own,

* the prologue (embedding, and the tensors every layer shares such as the rotary tables),
* one layer of each kind, fed its own ``hidden`` input rather than the previous layer's output, and
* the head (final norm and output projection), fed its own ``hidden`` input,

with every weight a graph input, and merges the exported parts into one graph. The parts share
nothing, so they can be traced side by side (:mod:`exporters.parallel_tracing`: in processes forked
from this one, where there are cores for it). The merged graph then splits by what each node depends on:
nodes that depend on a kind's ``hidden`` or weights belong to that kind, the head's to the head,
and the rest (the prologue, shape arithmetic on ``input_ids``) to all. The full graph is those
shared nodes once, then per layer a copy of its kind's nodes (values renamed, bound to the
previous layer's output and to that layer's own weights as initializers), then the head.

Weights are graph inputs while exporting so that the exporter's optimizer cannot fold them into
new, differently named constants (e.g. a transposed copy). The optimizer then runs once over the
full graph, where the weights are initializers, and folds what the monolithic export would have
folded; the lowering's ``after_export`` rewrite runs last.

Because the weights are inputs, the traced graph depends only on the model's structure: it is kept
in a cache (:mod:`exporters.trace_cache`: in this process, and on disk when
``PORTABLE_MOE_TRACE_CACHE`` names a directory), and another export of the same structure (other
weights, seed or weight format) composes from it without tracing again.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import torch

from exporters import trace_cache
from exporters.layered import LayeredModel
from exporters.lowerings import Lowering
from exporters.torch_onnx_shortcuts import quiet_exporter, shortened_export
from portable_moe.errors import ExportError

Progress = Callable[[str], None]
# Names of the symbolic axes in the exported graph (the manifest's input and output specs show them).
BATCH, SEQ = "batch", "seq"
_LAYER_OUTPUT_ROLES = ("hidden", "expert_ids", "dropped")
_PROLOGUE, _HEAD = "prologue", "head"
# The suffix of a part's own batch and sequence symbols (see _export_pieces); symbolic dims may be
# expressions of them, such as "batch__kind1*seq__kind1".
_PART_SUFFIX = re.compile(r"__(?:kind\d+|head)\b")
# A symbol in a symbolic dimension (function names such as Max( excluded).
_SYMBOL = re.compile(r"\b[A-Za-z_]\w*\b(?!\s*\()")


def _as_tuple(outputs: Any) -> tuple[Any, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``module`` by name (a tied tensor once)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@dataclass
class _Kind:
    """One kind of layer: the layer exported for it, its example input, and what it returns."""

    first: int
    module: torch.nn.Module
    example_hidden: torch.Tensor
    weight_names: tuple[str, ...]
    output_roles: tuple[str, ...] = ()


class _Pieces(torch.nn.Module):
    """Parts of the model side by side (the prologue, some layer kinds, the head), each fed inputs of its own.

    ``forward([input_ids,] *layer_inputs[, head_hidden])``, where ``layer_inputs`` holds ``(hidden,
    *shared)`` for each kind in turn, returns the prologue's outputs, then every kind's non-None
    outputs in order, then the logits (the prologue and the head only when included). No part reads
    another's inputs, so the exported graph splits cleanly into parts.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kinds: Sequence[torch.nn.Module],
        layer_arity: int,
        with_prologue: bool = True,
        with_head: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.kinds = tuple(kinds)
        # Layers that are not inside the model are registered here, so that their weights are found
        # by name too; layers inside it are not registered twice: functional_call restores a tensor
        # reachable by two names wrongly after tracing (the second name keeps the traced stand-in).
        inside = {id(module) for module in model.modules()}
        self.outside = torch.nn.ModuleList(layer for layer in kinds if id(layer) not in inside)
        self.layer_arity = layer_arity
        self.with_prologue = with_prologue
        self.with_head = with_head

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs: list[torch.Tensor] = []
        if self.with_prologue:
            outputs.extend(_as_tuple(self.model.prologue(inputs[0])))
            inputs = inputs[1:]
        for index, layer in enumerate(self.kinds):
            layer_inputs = inputs[index * self.layer_arity : (index + 1) * self.layer_arity]
            outputs.extend(output for output in _as_tuple(layer(*layer_inputs)) if output is not None)
        if self.with_head:
            outputs.append(self.model.head(inputs[-1]))
        return tuple(outputs)


class _WeightsAsInputs(torch.nn.Module):
    """Runs ``module`` with its weights taken from the arguments: ``forward(*activations, *weights)``.

    ``module`` is held in a tuple, not as a submodule, so the exporter finds no parameters here:
    every weight reaches the graph as an input.
    """

    def __init__(self, module: torch.nn.Module, weight_names: Sequence[str], activation_count: int) -> None:
        super().__init__()
        self._module = (module,)
        self._weight_names = tuple(weight_names)
        self._activation_count = activation_count

    def forward(self, *tensors: torch.Tensor) -> Any:
        activations, weights = tensors[: self._activation_count], tensors[self._activation_count :]
        return torch.func.functional_call(self._module[0], dict(zip(self._weight_names, weights)), activations)


def _dynamic_axes(model: LayeredModel, example_ids: torch.Tensor) -> list[dict[int, str]]:
    """Which axes of each prologue output are the batch and which the sequence axis.

    Found by running the prologue on the example, on one more sequence position and on one more
    batch row: an axis that grows by one with the sequence is a sequence axis, one that grows by
    one with the batch a batch axis, and the others are fixed. The hidden state (the first
    output) gives the axes of the head's input too.

    Raises:
        ExportError: if an axis grows otherwise (e.g. batch and sequence flattened into one),
            which a graph exported once per layer kind cannot express.
    """
    longer = torch.cat([example_ids, example_ids[:, :1]], dim=1)
    wider = torch.cat([example_ids, example_ids[:1]], dim=0)
    with torch.no_grad():
        runs = [_as_tuple(model.prologue(ids)) for ids in (example_ids, longer, wider)]
    found: list[dict[int, str]] = []
    for index, (base, seq_grown, batch_grown) in enumerate(zip(*runs)):
        axes: dict[int, str] = {}
        for axis, (size, seq_size, batch_size) in enumerate(zip(base.shape, seq_grown.shape, batch_grown.shape)):
            growth = (seq_size - size, batch_size - size)
            if growth == (1, 0):
                axes[axis] = SEQ
            elif growth == (0, 1):
                axes[axis] = BATCH
            elif growth != (0, 0):
                raise ExportError(
                    f"prologue output {index} (shape {list(base.shape)}) has an axis ({axis}) that grows by "
                    f"{growth[0]} per token and {growth[1]} per batch row; layer-wise export needs each axis to be "
                    "the batch, the sequence or fixed: keep batch and sequence on separate axes"
                )
        found.append(axes)
    return found


def _find_kinds(model: LayeredModel, example_ids: torch.Tensor) -> tuple[dict[Hashable, _Kind], torch.Tensor]:
    """The first layer of each kind with its example input (eager), and the final hidden state.

    Raises:
        ExportError: if two layers of one kind have different parameter names, or the layers that
            return expert ids are not the config's ``moe_layer_indices``.
    """
    kinds: dict[Hashable, _Kind] = {}
    routing: list[int] = []
    with torch.no_grad():
        hidden, *shared = _as_tuple(model.prologue(example_ids))
        for index, layer in enumerate(model.layer_modules()):
            kind = model.layer_kind(index)
            names = tuple(_tensors(layer))
            if kind not in kinds:
                kinds[kind] = _Kind(index, layer, hidden, names)
            elif set(names) != set(kinds[kind].weight_names):
                differ = sorted(set(names) ^ set(kinds[kind].weight_names))
                raise ExportError(
                    f"layers {kinds[kind].first} and {index} have the same kind {kind!r} but different parameters "
                    f"({', '.join(differ[:4])}); layer_kind must tell such layers apart"
                )
            hidden, expert_ids, _ = layer(hidden, *shared)
            if expert_ids is not None:
                routing.append(index)
    if routing != list(model.config.moe_layer_indices):
        raise ExportError(
            f"layers {routing} return expert ids but the config's moe_layer_indices are "
            f"{list(model.config.moe_layer_indices)}; they must list the same layers (they name the routing outputs)"
        )
    return kinds, hidden


@dataclass
class _Split:
    """The exported graph divided into the part every layer shares and one part per kind (and the head)."""

    shared_nodes: list[ir.Node] = field(default_factory=list)
    nodes: dict[Hashable, list[ir.Node]] = field(default_factory=dict)
    # Per part: the values its nodes read that are produced elsewhere (placeholders, shared values).
    reads: dict[Hashable, list[ir.Value]] = field(default_factory=dict)


def _values_read(node: ir.Node) -> Iterator[ir.Value]:
    """The node's inputs and every value its subgraphs (If/Loop bodies) read."""
    yield from (value for value in node.inputs if value is not None)
    for attribute in node.attributes.values():
        if attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            subgraphs = [attribute.as_graph()] if attribute.type == ir.AttributeType.GRAPH else attribute.as_graphs()
            for subgraph in subgraphs:
                for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                    yield from (value for value in inner.inputs if value is not None)


def _split(graph: ir.Graph, roots: Mapping[ir.Value, Hashable]) -> _Split:
    """Assign each node to the part whose root inputs it depends on (none: shared by all).

    Raises:
        ExportError: if a node depends on the inputs of two parts (the exporter mixed them).
    """
    owner: dict[ir.Value, Hashable] = dict(roots)
    split = _Split()
    produced_here: set[ir.Value] = set()
    main_values = {*graph.inputs, *graph.initializers.values(), *(out for node in graph for out in node.outputs)}
    for node in graph:
        reads = [value for value in _values_read(node) if value in main_values]
        parts = {owner[value] for value in reads if value in owner}
        if len(parts) > 1:
            raise ExportError(
                f"cannot split the exported graph: node {node.name} ({node.op_type}) depends on the inputs of "
                f"{sorted(map(repr, parts))}; export the model whole instead"
            )
        if not parts:
            split.shared_nodes.append(node)
            continue
        part = parts.pop()
        split.nodes.setdefault(part, []).append(node)
        split.reads.setdefault(part, [])
        split.reads[part].extend(value for value in reads if value not in produced_here)
        for output in node.outputs:
            owner[output] = part
            produced_here.add(output)
    split.reads = {part: list(dict.fromkeys(values)) for part, values in split.reads.items()}
    return split


class _Composer:
    """Builds the full graph from copies of parts of the exported graph, weights bound as initializers."""

    def __init__(self, exported: ir.Model) -> None:
        self.exported = exported
        self.graph = ir.Graph([], [], nodes=[], name="main_graph", opset_imports=dict(exported.opset_imports))
        self._initializers: dict[int, ir.Value] = {}  # by id(tensor): a tied weight stays one initializer

    def weight(self, name: str, tensor: torch.Tensor) -> ir.Value:
        """The initializer holding ``tensor`` (made on first use, named ``name``)."""
        if id(tensor) not in self._initializers:
            data = ir.tensor_adapters.TorchTensor(tensor.detach(), name=name)
            value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(data.dtype), const_value=data)
            self.graph.register_initializer(value)
            self._initializers[id(tensor)] = value
        return self._initializers[id(tensor)]

    def stamp(
        self,
        nodes: Sequence[ir.Node],
        binding: Mapping[ir.Value, ir.Value],
        outputs: Sequence[ir.Value],
        prefix: str,
    ) -> list[ir.Value]:
        """Append a copy of ``nodes`` of the exported graph to the full graph.

        Args:
            nodes: the nodes to copy, in order.
            binding: for every value they read that they do not produce, the full graph's value.
            outputs: values of the exported graph whose copies to return.
            prefix: put before the copied node and value names to keep them unique (e.g. ``"layers.3."``).

        Returns:
            The copies of ``outputs`` (bound values for those the nodes do not produce).
        """
        view = ir.GraphView(list(binding), [value for value in outputs if value not in binding], nodes=nodes)
        copy = view.clone()
        ir.convenience.replace_all_uses_with(list(copy.inputs), list(binding.values()))
        produced = dict(zip(view.outputs, copy.outputs))
        copied = [binding[value] if value in binding else produced[value] for value in outputs]
        copy.outputs.clear()
        new_nodes = list(copy)
        copy.remove(new_nodes)
        for node in new_nodes:
            node.name = prefix + (node.name or node.op_type)
            for output in node.outputs:
                output.name = prefix + (output.name or "")
                if output.shape is not None:
                    output.shape = ir.Shape([_copy_dim(dim, prefix) for dim in output.shape])
        self.graph.extend(new_nodes)
        return copied

    def finish(self, outputs: Mapping[str, ir.Value]) -> ir.Model:
        """The full model with ``outputs`` (name -> value) as its outputs."""
        for name, value in outputs.items():
            value.name = name
            self.graph.outputs.append(value)
        return ir.Model(
            self.graph,
            ir_version=self.exported.ir_version,
            producer_name=self.exported.producer_name,
            producer_version=self.exported.producer_version,
            functions=list(self.exported.functions.values()),
        )


def _dims(suffix: str = "") -> dict[str, Any]:
    """The batch and sequence dimensions for ``torch.export``; ``suffix`` makes a part's own symbols."""
    return {
        BATCH: torch.export.Dim(BATCH + suffix, min=1, max=4096),
        SEQ: torch.export.Dim(SEQ + suffix, min=1, max=65536),
    }


@dataclass
class _Tracing:
    """What tracing any part needs, gathered once in the exporting process (a forked tracer inherits it)."""

    model: torch.nn.Module
    kinds: Mapping[Hashable, _Kind]
    examples: tuple[torch.Tensor, torch.Tensor]
    prologue_outputs: tuple[torch.Tensor, ...]
    axes: Sequence[Mapping[int, str]]
    frame: Mapping[str, torch.Tensor]
    lowering: Lowering
    opset: int


def _part_label(part: Hashable, kinds: Mapping[Hashable, _Kind]) -> str:
    """The part in words, for messages: ``the prologue``, ``layer kind 1 (first at layer 1)``, ``the head``."""
    if part == _PROLOGUE:
        return "the prologue"
    if part == _HEAD:
        return "the head"
    return f"layer kind {part} (first at layer {list(kinds.values())[part].first})"


def _export_part(tracing: _Tracing, part: Hashable) -> bytes:
    """One ``torch.onnx.export`` of one part (:class:`_Pieces` holding only it), every weight a graph input.

    Returns:
        The exported model, serialized. Its inputs are those of the part among ``input_ids``,
        ``kind<k>.<i>`` (the hidden state, then the shared tensors), ``head.hidden``, then its
        weights: ``model.<name>`` for the prologue's and head's, ``kinds.<k>.<name>`` for a kind's;
        its outputs are the part's, named after their roles (``prologue.<i>``, ``<k>.<role>``,
        ``head.logits``).
    """
    model, kinds = tracing.model, list(tracing.kinds.values())
    example_ids, final_hidden = tracing.examples
    activations: list[torch.Tensor] = []
    dynamic: list[Any] = []
    input_names: list[str] = []
    weights: dict[str, torch.Tensor] = {}
    if part == _PROLOGUE:
        activations.append(example_ids)
        dynamic.append({0: _dims()[BATCH], 1: _dims()[SEQ]})
        input_names.append("input_ids")
    if part in (_PROLOGUE, _HEAD):
        weights.update({f"model.{name}": tensor for name, tensor in tracing.frame.items()})
    if part == _HEAD:
        head_dims = _dims("__head")
        activations.append(final_hidden.clone())
        dynamic.append({axis: head_dims[name] for axis, name in tracing.axes[0].items()})
        input_names.append("head.hidden")
    layers = []
    if isinstance(part, int):
        kind = kinds[part]
        layers.append(kind.module)
        dims = _dims(f"__kind{part}")
        # Copies: torch.export gives one tensor passed twice one set of symbols.
        activations += [tensor.clone() for tensor in (kind.example_hidden, *tracing.prologue_outputs[1:])]
        dynamic += [{axis: dims[name] for axis, name in tensor_axes.items()} for tensor_axes in tracing.axes]
        input_names += [f"kind{part}.{position}" for position in range(len(tracing.prologue_outputs))]
        tensors = _tensors(kind.module)
        weights.update({f"kinds.{part}.{name}": tensors[name] for name in kind.weight_names})
    roles = _roles(tracing, [part])
    pieces = _Pieces(model, layers, len(tracing.prologue_outputs), part == _PROLOGUE, part == _HEAD)
    canonical = {id(tensor): name for name, tensor in _tensors(pieces).items()}
    with shortened_export():
        program = torch.onnx.export(
            _WeightsAsInputs(pieces, [canonical[id(tensor)] for tensor in weights.values()], len(activations)),
            (*activations, *weights.values()),
            dynamo=True,
            input_names=[*input_names, *weights],
            output_names=[role.replace(":", ".") for role in roles],
            dynamic_shapes=((*dynamic, *([None] * len(weights))),),
            opset_version=tracing.opset,
            custom_translation_table=getattr(tracing.lowering.load(), "CUSTOM_TRANSLATION_TABLE", None),
            optimize=True,
            verbose=False,
        )
    return ir.to_proto(program.model).SerializeToString()


def _roles(tracing: _Tracing, parts: Sequence[Hashable]) -> list[str]:
    """The role of each output of ``parts``: ``prologue:<i>``, ``<kind index>:<role>`` per kind output, ``head:logits``."""
    roles: list[str] = []
    for part in parts:
        if part == _PROLOGUE:
            roles += [f"prologue:{index}" for index in range(len(tracing.prologue_outputs))]
        elif part == _HEAD:
            roles.append("head:logits")
        else:
            roles += [f"{part}:{role}" for role in list(tracing.kinds.values())[part].output_roles]
    return roles


def _merge_parts(parts: Sequence[Hashable], exported: Sequence[bytes]) -> ir.Model:
    """One model holding every part's exported graph: inputs of one name become one input.

    Value and node names made by the exporter get the part's name in front (``kind1.val_3``), so
    that no two parts claim one name; inputs and outputs keep theirs.
    """
    import onnx

    models = [ir.from_proto(onnx.ModelProto.FromString(data)) for data in exported]
    first = models[0]
    graph = ir.Graph([], [], nodes=[], name=first.graph.name, opset_imports=dict(first.opset_imports))
    inputs: dict[str, ir.Value] = {}
    activations: list[ir.Value] = []
    weights: list[ir.Value] = []
    functions: dict[Any, ir.Function] = {}
    for part, model in zip(parts, models):
        prefix = f"kind{part}." if isinstance(part, int) else f"{part}."
        part_graph = model.graph
        graph.opset_imports.update(model.opset_imports)
        functions.update(model.functions)
        own_inputs = set(part_graph.inputs)
        for value in list(part_graph.inputs):
            if value.name in inputs:
                ir.convenience.replace_all_uses_with(value, inputs[value.name])
                continue
            inputs[value.name] = value
            (weights if value.name.startswith(("model.", "kinds.")) else activations).append(value)
        part_graph.inputs.clear()
        outputs = list(part_graph.outputs)
        part_graph.outputs.clear()
        constants = [value for value in part_graph.initializers.values() if value not in own_inputs]
        part_graph.initializers.clear()
        for value in constants:
            value.name = prefix + value.name
            graph.register_initializer(value)
        nodes = list(part_graph)
        part_graph.remove(nodes)
        for node in nodes:
            node.name = prefix + (node.name or node.op_type)
            for output in node.outputs:
                if output not in outputs:
                    output.name = prefix + (output.name or "")
        graph.extend(nodes)
        graph.outputs.extend(outputs)
    graph.inputs.extend([*activations, *weights])
    for value in weights:
        if value.const_value is not None:
            graph.register_initializer(value)
    return ir.Model(
        graph,
        ir_version=first.ir_version,
        producer_name=first.producer_name,
        producer_version=first.producer_version,
        functions=list(functions.values()),
    )


def _export_pieces(tracing: _Tracing, progress: Progress) -> tuple[ir.Model, list[str]]:
    """Export every part (the prologue, one layer per kind, the head) and merge them into one model.

    Each part is its own ``torch.onnx.export``, with batch and sequence symbols of its own
    (``batch__kind0``, ...): the parts share nothing, so they can be traced side by side (see
    :mod:`exporters.parallel_tracing`), and the merged model is the same however many processes
    traced them.

    Returns:
        The merged model and the role of each output: ``prologue:<i>``, ``<kind index>:<role>``
        per kind output, ``head:logits``. Its inputs are ``input_ids``, ``kind<k>.<i>`` (the
        hidden state, then the shared tensors) per kind, ``head.hidden``, then the weights:
        ``model.<name>`` for the prologue's and head's, ``kinds.<k>.<name>`` for each kind's.
    """
    from exporters import parallel_tracing

    parts: list[Hashable] = [_PROLOGUE, *range(len(tracing.kinds)), _HEAD]
    labels = [_part_label(part, tracing.kinds) for part in parts]
    # The head first (short: it warms up the exporter for the others, see run_traces), then the layer
    # kinds, more weights (more operations to trace) first, then the prologue.
    kinds = list(tracing.kinds.values())
    weight_count = [len(kinds[part].weight_names) if isinstance(part, int) else 0 for part in parts]
    order = sorted(range(len(parts)), key=lambda position: (parts[position] != _HEAD, -weight_count[position]))
    exported = parallel_tracing.run_traces(
        [functools.partial(_export_part, tracing, parts[position]) for position in order],
        [labels[position] for position in order],
        progress,
    )
    by_part = dict(zip(order, exported))
    return _merge_parts(parts, [by_part[position] for position in range(len(parts))]), _roles(tracing, parts)


def _structure_key(
    model: torch.nn.Module,
    kinds: Mapping[Hashable, _Kind],
    examples: tuple[torch.Tensor, torch.Tensor],
    axes: Sequence[Mapping[int, str]],
    lowering: Lowering,
    opset: int,
) -> str | None:
    """What the traced pieces depend on (see :mod:`exporters.trace_cache`); None: do not cache.

    The lowering counts through the routed experts it put in the model and its translation table;
    its ``after_export`` rewrite runs on every composed graph, after the cache.
    """
    table = getattr(lowering.load(), "CUSTOM_TRANSLATION_TABLE", None) or {}
    # A translation is an onnxscript function: its Python function is what it translates with.
    translations = sorted((str(op), getattr(function, "function", function)) for op, function in table.items())
    return trace_cache.structure_key(
        model,
        [
            (key, kind.first, kind.module, kind.weight_names, tuple(kind.example_hidden.shape))
            for key, kind in kinds.items()
        ],
        [(str(tensor.dtype), tuple(tensor.shape)) for tensor in examples],
        [sorted(tensor_axes.items()) for tensor_axes in axes],
        translations,
        opset,
    )


def _copy_dim(dim: Any, prefix: str) -> Any:
    """A dimension of a value in the copy named ``prefix``: the part's own batch and sequence
    symbols get their plain names back (``batch__kind1`` -> ``batch``), and a dimension that depends
    on anything else (the data-dependent sizes of the sparse lowering, ``u0``) gets the prefix, so
    that no two copies claim one name for sizes that differ (ONNX Runtime plans memory by name)."""
    if not isinstance(dim, ir.SymbolicDim) or not dim.value:
        return dim
    name = _PART_SUFFIX.sub("", dim.value)
    if set(_SYMBOL.findall(name)) - {BATCH, SEQ}:
        name = prefix + name
    return ir.SymbolicDim(name)


def export_layered(
    model: LayeredModel,
    example_ids: torch.Tensor,
    *,
    lowering: Lowering,
    opset: int,
    progress: Progress | None = None,
) -> ir.Model:
    """Export ``model`` layer-wise and compose the full graph (optimized, lowering rewrite applied).

    Args:
        model: a :class:`~exporters.layered.LayeredModel` that is a ``torch.nn.Module``, with the
            routed experts of ``lowering`` already in place.
        example_ids: example ``input_ids [batch, seq]`` to trace with (batch and seq >= 2).
        lowering: supplies the translation table and the ``after_export`` rewrite.
        opset: the ai.onnx opset.
        progress: called with a short message at each step.

    Returns:
        The model: input ``input_ids``, outputs ``logits``, then ``expert_ids_layer{N}`` per layer
        that routes, then ``dropped_slots_layer{N}`` per layer that reports drops.

    Raises:
        ExportError: if the model is not a torch module, its prologue's outputs have an axis
            mixing batch and sequence, two layers of one kind have different parameters, or the
            exported graph cannot be split by layer kind.
    """
    say = progress or (lambda message: None)
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"layer-wise export needs a torch.nn.Module, got {type(model).__name__}")
    axes = _dynamic_axes(model, example_ids)
    layers = model.layer_modules()
    kinds, final_hidden = _find_kinds(model, example_ids)
    in_layers = {id(tensor) for layer in layers for tensor in _tensors(layer).values()}
    frame = {name: tensor for name, tensor in _tensors(model).items() if id(tensor) not in in_layers}
    key = _structure_key(model, kinds, (example_ids, final_hidden), axes, lowering, opset)
    pieces = trace_cache.lookup(key)
    if pieces is None:
        say(f"tracing the prologue, {len(kinds)} kind(s) of layer for {len(layers)} layer(s), and the head")
        with torch.no_grad():
            prologue = _as_tuple(model.prologue(example_ids))
            for kind in kinds.values():
                outputs = _as_tuple(kind.module(kind.example_hidden, *prologue[1:]))
                kind.output_roles = tuple(
                    role for role, value in zip(_LAYER_OUTPUT_ROLES, outputs) if value is not None
                )
        tracing = _Tracing(model, kinds, (example_ids, final_hidden), prologue, axes, frame, lowering, opset)
        traced, roles = _export_pieces(tracing, say)
        pieces = trace_cache.store(
            key, trace_cache.TracedPieces(traced, roles, [kind.output_roles for kind in kinds.values()])
        )
    else:
        say("reusing the traced layers of an earlier export of this structure (the weights are bound anew)")
        for kind, kind_roles in zip(kinds.values(), pieces.output_roles):
            kind.output_roles = kind_roles
    exported, roles = pieces.model, pieces.roles  # a private copy: the cached bytes stay as they are

    graph = exported.graph
    inputs = {value.name: value for value in graph.inputs}
    outputs = dict(zip(roles, graph.outputs))
    prologue_count = sum(role.startswith("prologue:") for role in roles)
    part_inputs: dict[Hashable, list[ir.Value]] = {
        index: [inputs[f"kind{index}.{position}"] for position in range(prologue_count)] for index in range(len(kinds))
    }
    part_inputs[_HEAD] = [inputs["head.hidden"]]
    roots = {value: part for part, values in part_inputs.items() for value in values}
    for index, kind in enumerate(kinds.values()):
        roots.update({inputs[f"kinds.{index}.{name}"]: index for name in kind.weight_names})
    split = _split(graph, roots)

    say("composing the full graph: shared nodes once, then a copy of its kind per layer, then the head")
    composer = _Composer(exported)
    input_ids = ir.Value(name="input_ids", shape=inputs["input_ids"].shape, type=inputs["input_ids"].type)
    composer.graph.inputs.append(input_ids)
    binding = {inputs["input_ids"]: input_ids}
    binding.update({inputs[f"model.{name}"]: composer.weight(name, tensor) for name, tensor in frame.items()})
    for constant in graph.initializers.values():
        if not constant.is_graph_input():
            copied = ir.Value(
                name=constant.name, shape=constant.shape, type=constant.type, const_value=constant.const_value
            )
            composer.graph.register_initializer(copied)
            binding[constant] = copied
    prologue_values = [outputs[f"prologue:{position}"] for position in range(prologue_count)]
    needed = [value for reads in split.reads.values() for value in reads if value not in roots] + prologue_values
    shared_outputs = [value for value in dict.fromkeys(needed) if value not in binding]
    binding.update(zip(shared_outputs, composer.stamp(split.shared_nodes, binding, shared_outputs, "")))
    hidden, *shared = (binding[value] for value in prologue_values)

    module_names = {id(module): name for name, module in model.named_modules()}
    kind_index = {key: index for index, key in enumerate(kinds)}
    routing: dict[str, ir.Value] = {}
    dropped: dict[str, ir.Value] = {}
    for position, layer in enumerate(layers):
        kind = kinds[model.layer_kind(position)]
        index = kind_index[model.layer_kind(position)]
        prefix = module_names.get(id(layer), f"layers.{position}") + "."
        tensors = _tensors(layer)
        local = dict(zip(part_inputs[index], [hidden, *shared]))
        local.update(
            {
                inputs[f"kinds.{index}.{name}"]: composer.weight(prefix + name, tensors[name])
                for name in kind.weight_names
            }
        )
        reads = {value: local.get(value, binding.get(value)) for value in split.reads.get(index, [])}
        wanted = [outputs[f"{index}:{role}"] for role in kind.output_roles]
        produced = dict(zip(kind.output_roles, composer.stamp(split.nodes.get(index, []), reads, wanted, prefix)))
        hidden = produced["hidden"]
        if "expert_ids" in produced:
            routing[f"expert_ids_layer{position}"] = produced["expert_ids"]
        if "dropped" in produced:
            dropped[f"dropped_slots_layer{position}"] = produced["dropped"]
    head_binding = {inputs["head.hidden"]: hidden}
    reads = {value: head_binding.get(value, binding.get(value)) for value in split.reads.get(_HEAD, [])}
    [logits] = composer.stamp(split.nodes.get(_HEAD, []), reads, [outputs["head:logits"]], "head.")
    full = composer.finish({"logits": logits, **routing, **dropped})

    say("optimizing the full graph")
    with quiet_exporter():  # the optimizer logs what it leaves unfolded (a Split's outputs, say)
        _optimize(full)
    rewrite = getattr(lowering.load(), "after_export", None)
    if rewrite is not None:
        rewrite(full)
    return full


def _optimize(model: ir.Model) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs, now over the whole graph with weights as constants.

    One round of folding and rewriting, not the default two: the parts were optimized (two rounds)
    inside ``torch.onnx.export`` already, and binding the weights as constants leaves one round's
    work (on the tiny preset's graphs of every lowering a second round changed nothing, and took half
    the optimizer's time).
    """
    import onnxscript.optimizer
    from onnxscript.rewriter import onnx_fusions

    onnxscript.optimizer.optimize_ir(model, num_iterations=1)
    onnx_fusions.fuse(model)
