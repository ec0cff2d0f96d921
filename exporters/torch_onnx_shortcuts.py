"""What export changes about ``torch.onnx.export``: shortcuts through it (context managers), and its trace records dropped.

``torch.onnx.export(..., dynamo=True)`` traces a module with ``torch.export``, then runs torch.onnx's
own passes over the traced graph and translates it with onnxscript's torchlib. For the graphs this
project exports, several of those steps cost seconds and change nothing; within these blocks they
are skipped, each only where it would have changed nothing:

- :func:`fast_tracing`: torch's fake-tensor dispatch cache and Python's cycle collector off while tracing;
- :func:`reused_op_registry`: torch.onnx's op registry built once per process, not once per call;
- :func:`translation_as_traced`: no second trace of the graph (the decompositions) where torchlib can
  translate every op as traced, and no type promotion pass where no op mixes dtypes;
- :func:`quiet_exporter`: torch.onnx's progress prints and warnings silenced;

all four at once in :func:`shortened_export`, as each traced part and the decoder are exported;

and one change to what it returns: :func:`drop_trace_records` removes what it recorded about the trace.

The shortcuts reach into torch.onnx's private layout (the dev extra pins the torch they were
written against); where that layout differs, torch.onnx's own path is taken. Every export is
checked against its golden outputs either way. Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import types
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def fast_tracing() -> Iterator[None]:
    """Trace with torch's fake-tensor dispatch cache and Python's cycle collector off.

    The traces inside ``torch.onnx.export`` (``torch.export``, and the decompositions where they run) run every op
    on fake tensors with symbolic batch and sequence sizes. The cache then rarely hits, and making and
    checking an entry for symbolic shapes costs more than the dispatch it would save: off, the
    ``torch.export`` step of a 4-layer tiny export takes about half the CPU time (see the export-speed
    section of docs/benchmarks.md). The cache only memoizes fake results: the graph computes the same,
    though the counters in some generated value names (``sym_size_int_34``) can differ.

    A trace also makes millions of short-lived objects, and the first one of a process builds
    torch.onnx's op registry (hundreds of thousands that live on); with the collector on, each of
    its passes walks every object that survived the ones before, again and again. Off, the first
    trace takes one to two seconds less CPU and the later ones a little less, and the peak memory of an
    export is the same (reference cycles made while tracing are few and small; they are collected
    once the collector is back on).
    """
    import torch

    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
            yield
    finally:
        if collecting:
            gc.enable()


# torch.onnx's op registry per opset, built from onnxscript's torchlib once per process (see reused_op_registry).
_OP_REGISTRIES: dict[int, Any] = {}


@contextlib.contextmanager
def reused_op_registry() -> Iterator[None]:
    """Let ``torch.onnx.export`` start from a copy of an op registry built once, not build its own.

    Every ``torch.onnx.export`` call builds its registry from onnxscript's torchlib, importing its
    ~550 functions and parsing the source of each (about 1 s in all), before registering the
    call's custom translations into it. Here the first call of the process builds it and every
    call gets a copy: the registry's only state is its opset and a table of lists, which the
    custom translations extend, so a copy of the table's lists keeps each call's translations its
    own. A tracing process forked after the first build inherits the registry and builds nothing.

    The first build also skips the parsing (:func:`_torchlib_functions`): it only works out each
    function's domain, which the registry never reads.
    """
    try:  # torch.onnx's private layout: where it differs (another torch), every call builds its own
        from torch.onnx._internal.exporter import _registration

        registry_class = _registration.ONNXRegistry
        build = registry_class.__dict__["from_torchlib"]
        default_opset = _registration._constants.TORCHLIB_OPSET
        apis = _registration.onnxscript_apis
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls: Any, opset_version: int = default_opset) -> Any:
        if opset_version not in _OP_REGISTRIES:
            _registration.onnxscript_apis = types.SimpleNamespace(get_torchlib_ops=_torchlib_functions)
            try:
                _OP_REGISTRIES[opset_version] = build.__get__(None, cls)(opset_version)
            finally:
                _registration.onnxscript_apis = apis
        built = _OP_REGISTRIES[opset_version]
        copy = cls()
        copy._opset_version = built._opset_version
        copy.functions = {target: list(decompositions) for target, decompositions in built.functions.items()}
        return copy

    registry_class.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_class.from_torchlib = build


def _torchlib_functions() -> list[types.SimpleNamespace]:
    """What ``ONNXRegistry.from_torchlib`` reads of onnxscript's ``get_torchlib_ops()``, in its order.

    Each aten overload's torchlib functions, then its complex-valued ones, as ``qualified_name``,
    ``function`` and ``is_complex``; onnxscript's own version also works out each function's
    domain, from the parsed source of every traced function (about 0.6 s), and the registry does
    not read it.
    """
    from onnxscript.function_libs.torch_lib import ops, registration  # importing ops registers them

    del ops
    functions = []
    for name, overloads in registration.default_registry.items():
        if name.startswith("internal::"):  # torchlib's helpers, not aten ops
            continue
        functions += [
            types.SimpleNamespace(qualified_name=name, function=function, is_complex=is_complex)
            for is_complex, group in ((False, overloads.overloads), (True, overloads.complex))
            for function in group
        ]
    return functions


def _as_decomposed(target: Any) -> Any:
    """The op torch's decompositions make of ``target`` where torchlib has a function for that one
    and none for ``target`` (None for any other op): ``aten.to`` (a dtype conversion) becomes
    ``aten._to_copy``, which torchlib translates to a Cast; ``aten.item`` becomes ``aten._local_scalar_dense``."""
    import torch

    aten = torch.ops.aten
    if not isinstance(target, torch._ops.OpOverload):
        return None
    if target.overloadpacket is aten.to:
        return aten._to_copy.default
    if target == aten.item.default:
        return aten._local_scalar_dense.default
    return None


def _translatable_as_traced(program: Any, registry: Any) -> bool:
    """Whether torch.onnx can translate every op of ``program`` as ``torch.export`` wrote it.

    True when nothing mutates (no in-place op, no mutated input or buffer), nothing calls a
    subgraph (``cond``, ``map`` and the like come as ``get_attr`` and higher-order ops), and every
    op is an assertion (removed later), one :func:`_as_decomposed` rewrites, or one the registry
    holds an ONNX function for.
    """
    import operator

    import torch

    aten = torch.ops.aten
    # Assertions torch.export writes into a graph; torch.onnx removes them after its decompositions.
    assertions = {
        aten._assert_tensor_metadata.default,
        aten._assert_scalar.default,
        aten._assert_async.default,
        aten._assert_async.msg,
        aten.sym_constrain_range_for_size.default,
    }
    signature = program.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        return False
    for node in program.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            return False
        target = node.target
        if target is operator.getitem or target in assertions or _as_decomposed(target) is not None:
            continue
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            return False
        if not registry.is_registered(target):
            return False
    return True


def _slice_writes(base: Any) -> tuple[list[tuple[int, int, Any, Any]], list[Any], int] | None:
    """How ``base`` is used: the ``(start, end, slice, copy_)`` of each slice that a ``copy_`` writes
    once (its result unused), its other readers, and the one axis the slices cut; None when the
    slices' bounds or axes are not plain integers of one axis with a step of 1."""
    import sys

    import torch

    aten = torch.ops.aten
    writes, readers, axes = [], [], set()
    for user in base.users:
        copies = list(user.users)
        if not (
            user.target == aten.slice.Tensor
            and not user.kwargs
            and len(copies) == 1
            and copies[0].target == aten.copy_.default
            and copies[0].args[0] is user
            and not copies[0].users
        ):
            readers.append(user)
            continue
        dim, start, end, step = (*user.args[1:], *(0, 0, sys.maxsize, 1)[len(user.args) - 1 :])
        if not all(isinstance(field, int) for field in (dim, start, end, step)) or step != 1:
            return None
        axes.add(dim % base.meta["val"].dim())
        writes.append((start, end, user, copies[0]))
    if not writes or len(axes) != 1:
        return None
    return sorted(writes, key=lambda write: write[0]), readers, axes.pop()


def _fills_as_concatenations(program: Any) -> int:
    """Rewrite each new tensor that is filled slice by slice (``copy_``) as a ``cat`` of what fills it.

    DeepSeek-V3's attention in transformers builds its keys so: ``new_empty``, then ``copy_`` into
    ``[..., :n]`` and ``[..., n:]``. In-place writes need torch.onnx's decompositions (a second trace
    of the whole graph); the ``cat`` computes the same without them. Rewritten only where nothing is
    in doubt: slices with a step of 1 along one axis of static size that tile it exactly, each written
    once by a ``copy_`` of the slice's own shape and dtype whose result is unused, and every other
    reader of the tensor after the last write.

    Returns:
        How many tensors were rewritten.
    """
    import torch
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    aten = torch.ops.aten
    graph = program.graph
    order = {node: position for position, node in enumerate(graph.nodes)}
    rewritten = 0
    for base in list(graph.nodes):
        if base.op != "call_function" or base.target not in (aten.new_empty.default, aten.empty.memory_format):
            continue
        value = base.meta.get("val")
        used = _slice_writes(base) if value is not None else None
        if used is None:
            continue
        writes, readers, axis = used
        size = value.shape[axis]
        tiled = (
            isinstance(size, int)
            and writes[0][0] == 0
            and all(write[1] == following[0] for write, following in zip(writes, writes[1:]))
            and min(writes[-1][1], size) == size
        )
        sources = [copy.args[1] for *_, copy in writes]
        same = all(
            "val" in source.meta
            and source.meta["val"].dtype == value.dtype
            and len(source.meta["val"].shape) == len(write.meta["val"].shape)
            and all(statically_known_true(a == b) for a, b in zip(source.meta["val"].shape, write.meta["val"].shape))
            for source, (_, _, write, _) in zip(sources, writes)
        )
        last = max((copy for *_, copy in writes), key=order.__getitem__)
        if not (tiled and same and all(order[reader] > order[last] for reader in readers)):
            continue
        with graph.inserting_after(last):
            concatenated = graph.call_function(aten.cat.default, (sources, axis))
        concatenated.meta["val"] = value
        base.replace_all_uses_with(concatenated, delete_user_cb=set(readers).__contains__)
        for _, _, write, copy in writes:
            graph.erase_node(copy)
            graph.erase_node(write)
        graph.erase_node(base)
        rewritten += 1
    if rewritten:
        program.graph_module.recompile()
    return rewritten


def _rewrite_as_decomposed(program: Any) -> None:
    """Replace each op :func:`_as_decomposed` names with the op it gives, arguments carried over."""
    import torch

    for node in program.graph.nodes:
        replacement = _as_decomposed(node.target) if node.op == "call_function" else None
        if replacement is None:
            continue
        if replacement == torch.ops.aten._to_copy.default:
            arguments = node.target._schema.arguments
            given = {argument.name: value for argument, value in zip(arguments, node.args)} | dict(node.kwargs)
            dtype = given.get("dtype")
            if node.target == torch.ops.aten.to.other:
                dtype = node.args[1].meta["val"].dtype
            node.kwargs = {"dtype": dtype} if dtype is not None else {}
        else:
            node.kwargs = {}
        node.target = replacement
        node.args = (node.args[0],)
    program.graph_module.recompile()


def _would_promote(argument: Any, dtype: Any) -> bool:
    """Whether torch.onnx's type promotion pass would cast ``argument`` (an fx node, a number, or a
    list of them) to ``dtype``, judged from the value ``torch.export`` recorded for it; True where
    that value is missing or of a kind the pass does not expect (let the pass decide)."""
    import torch
    from torch.onnx._internal.fx import type_utils

    if dtype is None:
        return False
    if isinstance(argument, (tuple, list)):
        return any(_would_promote(element, dtype) for element in argument)
    if isinstance(argument, torch.fx.Node):
        if "val" not in argument.meta:
            return True
        value = argument.meta["val"]
        if isinstance(value, torch.Tensor):
            return value.dtype != dtype
        if not type_utils.is_torch_symbolic_type(value):
            return True  # the pass refuses such an argument: let it say so
        argument = value
    scalar_dtype = type_utils.from_scalar_type_to_torch_dtype(type(argument))
    return scalar_dtype is None or scalar_dtype != dtype


def _promotes_types(graph_module: Any) -> bool:
    """Whether torch.onnx's type promotion pass would change ``graph_module`` (or a graph inside it).

    The pass runs every op once more on fake tensors, to insert a cast wherever an op mixes dtypes
    (an ``add`` of an int64 tensor and a float32 one, say) and to record the values of what it
    changed. Which casts it inserts follows from the dtypes of each op's arguments, and those are in
    the values ``torch.export`` recorded (``meta["val"]``): where no argument of any op would be
    cast, the pass changes nothing. A value that is missing, or a type rule that cannot judge from
    the recorded values, counts as a change.
    """
    import torch
    from torch.onnx._internal.fx.passes import type_promotion

    table = type_promotion.TypePromotionTable()
    missing = object()
    for module in graph_module.modules():
        for node in module.graph.nodes if isinstance(module, torch.fx.GraphModule) else ():
            rule = type_promotion.get_type_promotion_rule(node, table) if node.op == "call_function" else None
            if rule is None:
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda value: value.meta.get("val", missing))
            if missing in torch.utils._pytree.tree_leaves((args, kwargs)):
                return True
            try:
                promotion = rule.preview_type_promotion(args, kwargs)
            except Exception:
                return True
            if any(
                _would_promote(argument, promotion.args_dtypes.get(position))
                for position, argument in enumerate(node.args)
            ) or any(
                _would_promote(argument, promotion.kwargs_dtypes.get(name)) for name, argument in node.kwargs.items()
            ):
                return True
    return False


@contextlib.contextmanager
def translation_as_traced() -> Iterator[None]:
    """Let ``torch.onnx.export`` translate the graph ``torch.export`` traced, without tracing it again.

    ``torch.onnx.export`` traces a module twice: ``torch.export``, then its decompositions, which run
    every op once more on fake tensors with symbolic sizes to rewrite the ops torchlib has no ONNX
    function for. For a decoder layer the second trace is about half of the export's time, and it
    rewrites next to nothing: torchlib has functions for the ops ``torch.export`` writes (``linear``,
    ``softmax``, ``matmul``...), but for ``aten.to`` (each dtype conversion) and ``aten.item``. Within
    this block a graph that only needs those rewritten gets them as the decompositions would write
    them (:func:`_as_decomposed`) and is translated as traced (see :func:`_translatable_as_traced`),
    once any tensor filled slice by slice has become a concatenation (:func:`_fills_as_concatenations`);
    any other graph, or any graph under another torch whose exporter is laid out differently, goes
    through the decompositions as before. torch.onnx's type promotion pass, a further run of every op
    on fake tensors, runs only where :func:`_promotes_types` finds a cast for it to insert. Every export
    is checked against its golden outputs either way.
    """
    try:  # torch.onnx's private layout: where it differs (another torch), every graph is decomposed
        from torch.onnx._internal.exporter import _fx_passes
        from torch.onnx._internal.fx.passes import type_promotion

        decompose = _fx_passes.decompose_with_registry
        promote = _fx_passes.insert_type_promotion_nodes
        del type_promotion  # imported for _promotes_types: a torch without it takes torch.onnx's own path
    except (ImportError, AttributeError):
        yield
        return

    def translate_or_decompose(program: Any, registry: Any) -> Any:
        _fills_as_concatenations(program)
        if not _translatable_as_traced(program, registry):
            return decompose(program, registry)
        _rewrite_as_decomposed(program)
        return program

    def promote_where_needed(graph_module: Any) -> None:
        if _promotes_types(graph_module):
            promote(graph_module)

    _fx_passes.decompose_with_registry = translate_or_decompose
    _fx_passes.insert_type_promotion_nodes = promote_where_needed
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = decompose
        _fx_passes.insert_type_promotion_nodes = promote


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence torch.onnx's progress prints and warnings about optional packages (e.g. torchvision)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def shortened_export() -> Iterator[None]:
    """Every shortcut at once: :func:`quiet_exporter`, :func:`fast_tracing`, :func:`reused_op_registry`
    and :func:`translation_as_traced`."""
    with quiet_exporter(), fast_tracing(), reused_op_registry(), translation_as_traced():
        yield


def drop_trace_records(model: Any) -> None:
    """Remove what ``torch.onnx.export`` records on each node of an ``onnx_ir`` model about its trace.

    Those records (the Python stack that made the node, with the absolute paths of the exporting
    machine's files, the fx node, the module path, a function's memory address) are about half of
    a small model's ``model.onnx``; without them a bundle holds nothing of the machine that wrote
    it, and the same export writes the same bytes in any checkout. The nodes keep their names
    (``layers.3.kind1.node_MatMul_12``).
    """
    import onnx_ir

    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in onnx_ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.clear()
