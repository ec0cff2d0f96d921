"""Precision modes: which device nodes compute in float16, and the graph rewrite that makes them.

The modes carry Ascend's names (ATC/ACL ``precision_mode``):

- ``force_fp16`` (Ascend's default): every device node that has a float16 kernel computes in float16.
- ``allow_fp32_to_fp16``: matrix ("cube") nodes compute in float16; vector nodes keep float32.
- ``must_keep_origin_dtype``: nothing changes dtype.
- ``allow_mix_precision``: per-op lists, as CANN's precision_reduce flags: "allow" nodes run in
  float16, "deny" nodes keep float32, "gray" nodes follow their inputs (float16 if any float
  input was computed in float16).

With ``router_fp32`` (on by default) the MoE router stays float32 in every mode: each TopK's
score input and the device nodes computing it, back to and including the gate's matrix multiply.

The rewrite really computes in float16: a float16 node gets float16 inputs (weights converted
once, activations through Cast nodes) and produces float16 outputs, and Cast nodes bring values
back to float32 wherever a float32 node, the host or a graph output reads them. Where ONNX
Runtime's CPU provider has no float16 kernel for an operator (MatMul, Softmax...), it would cast
around a float32 kernel and then drop those casts, losing the rounding; such nodes are written in
float32 with explicit float16 rounding of every input and output instead (see
``_rounds_through_float32``). Either way every float16 node reads and writes float16-rounded
values and accumulates in float32 inside the op, as a device's matrix unit does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from backends.npu_sim.gears import referenced_names
from backends.npu_sim.optable import OpTable
from backends.npu_sim.partition import NodePlacement, ValueTypes, ai_onnx_opset
from portable_moe.compare import PrecisionMode, Tolerance, ToleranceOverride

PRECISION_MODES = ("force_fp16", "allow_fp32_to_fp16", "must_keep_origin_dtype", "allow_mix_precision")
FLOAT16_SUFFIX = "__fp16"
# W8A8: int8 activations into int8-weight matrix products (option activations=int8).
ACTIVATION_CHOICES = ("float", "int8")
W8A8_SUFFIX = "+w8a8"
# Names of the nodes quantize_activations adds contain this; they compute in float32 under every mode (the
# int32 accumulator overflows float16), as Ascend's quantize and dequantize steps do inside their kernels.
W8A8_NODE_MARK = ".w8a8_"
# Ascend's dynamic per-token quantization is symmetric: codes in [-127, 127], zero point 0.
_INT8_LIMIT = 127.0

# A routing flip at an oracle margin at most this is a near-tie. The float32 mode perturbs router scores
# (~1: sigmoid outputs plus a bias) by ~1e-7..1e-6 through reordered sums; the float16 modes by up to 2.4e-3
# (measured on the tiny bundle, see the rows below).
_FLOAT32_NEAR_TIE = 1e-5
_FLOAT32_NEAR_TIE_REASON = "float32 throughout perturbs router scores by ~1e-7..1e-6; 1e-5 keeps ~10x headroom"
_FLOAT16_NEAR_TIE = 1e-2
_FLOAT16_NEAR_TIE_REASON = "float16 compute moved router scores by up to 2.4e-3 (measured); 1e-2 covers it"

# What each mode's outputs are checked against, measured on the tiny bundle's golden inputs (x86-64, ORT 1.32),
# identical at every gear the input was padded to and with the capacity lowering; see docs/writing-a-backend.md.
# The backend declares them (Capabilities.precision_modes): conformance reads them from there.
TOLERANCES: dict[str, PrecisionMode] = {
    "force_fp16": PrecisionMode(
        tolerances={
            "float32": Tolerance(
                atol=5e-2,
                rtol=1e-2,
                min_routing_agreement=1.0,
                reason=(
                    "npu-sim force_fp16 rounds every device op's inputs and outputs to float16 (router kept float32): "
                    "measured max abs error 1.14e-2 (rms 2.7e-3) on the tiny bundle's logits (|logits| <= 3.9), needing "
                    "atol 7.8e-3 at rtol 1e-2; the float16 modes share atol 5e-2, ~6x headroom here. Routing must agree "
                    "exactly on the golden inputs: their smallest top-k score margin (3.3e-3) exceeds the largest float16 "
                    "perturbation of a router score (1.7e-3). On random inputs float16 flips 0.4-3% of tokens at "
                    "near-ties, and a flipped token's logits move by up to ~4.5: no value tolerance should hide that."
                ),
            ),
        },
        near_tie_margin=_FLOAT16_NEAR_TIE,
        near_tie_reason=_FLOAT16_NEAR_TIE_REASON,
    ),
    "allow_mix_precision": PrecisionMode(
        tolerances={
            "float32": Tolerance(
                atol=5e-2,
                rtol=1e-2,
                min_routing_agreement=1.0,
                reason=(
                    "npu-sim allow_mix_precision runs trustlisted (matrix) ops and the graylisted ops downstream of them in "
                    "float16, blocklisted ops (reductions, exp, pow, softmax, TopK) in float32: measured max abs error "
                    "1.40e-2 (rms 2.6e-3) on the tiny bundle's logits, needing atol 1.32e-2 at rtol 1e-2; atol 5e-2 leaves "
                    "~3.8x headroom. Routing must agree exactly: the golden inputs' smallest router margin (3.3e-3) "
                    "exceeds the measured float16 perturbation of router scores (2.4e-3), the thinnest margin of the modes."
                ),
            ),
        },
        near_tie_margin=_FLOAT16_NEAR_TIE,
        near_tie_reason=_FLOAT16_NEAR_TIE_REASON,
    ),
    "allow_fp32_to_fp16": PrecisionMode(
        tolerances={
            "float32": Tolerance(
                atol=5e-2,
                rtol=1e-2,
                min_routing_agreement=1.0,
                reason=(
                    "npu-sim allow_fp32_to_fp16 rounds only matrix ops (MatMul, Gemm) to float16: measured max abs error "
                    "1.40e-2 (rms 2.1e-3) on the tiny bundle's logits, needing atol 1.06e-2 at rtol 1e-2; atol 5e-2 leaves "
                    "~4.7x headroom. Routing must agree exactly: the golden inputs' smallest router margin (3.3e-3) "
                    "exceeds the measured float16 perturbation of router scores (1.5e-3)."
                ),
            ),
        },
        near_tie_margin=_FLOAT16_NEAR_TIE,
        near_tie_reason=_FLOAT16_NEAR_TIE_REASON,
    ),
    "must_keep_origin_dtype": PrecisionMode(
        tolerances={
            "float32": Tolerance(
                atol=1e-4,
                rtol=1e-3,
                min_routing_agreement=1.0,
                reason=(
                    "npu-sim must_keep_origin_dtype computes in float32 throughout, like 'exact' (constants folded at "
                    "compile time by onnx's reference evaluator differ from ORT's kernels by an ulp): measured max abs "
                    "error 5.5e-6 on the tiny bundle's logits, ~18x inside atol 1e-4. Routing must agree exactly."
                ),
            ),
        },
        near_tie_margin=_FLOAT32_NEAR_TIE,
        near_tie_reason=_FLOAT32_NEAR_TIE_REASON,
    ),
}

# W8A8 (option activations=int8; a compiled model reports "<mode>+w8a8"): int8 activations add to the mode's own
# error. Conformance adds the int8/channel weight row (portable_moe.compare.WEIGHT_TOLERANCES) on top: atol sums,
# the lower routing thresholds apply. Measured with scripts/measure_w8a8.py (npu-sim, dense lowering, int8
# per-channel bundles vs the float32 golden; tiny: golden + 24 random sets, small: golden + 6; docs/benchmarks.md):
_W8A8_ACTIVATIONS_ATOL = 0.25
_W8A8_REASON = (
    "int8 activations per token (W8A8) on int8/channel weights: over the four modes logits needed atol <= 0.41 "
    "(tiny) and <= 0.23 (small), against 0.24 and 0.14 with float16 activations (W8A16, force_fp16): int8 "
    "activations added <= 0.18, so the mode's atol plus 0.25. Routing per set: agreement >= 0.875 (tiny) and "
    ">= 0.75 (small), expert overlap >= 0.922 and >= 0.943; thresholds 0.7 and 0.85 sit below those (as the "
    "int8/channel weight row's, which conformance combines with this one)"
)
for _mode, _declared in list(TOLERANCES.items()):
    _row = _declared.tolerances["float32"]
    TOLERANCES[_mode + W8A8_SUFFIX] = PrecisionMode(
        tolerances={
            "float32": Tolerance(
                atol=_row.atol + _W8A8_ACTIVATIONS_ATOL,
                rtol=_row.rtol,
                min_routing_agreement=0.7,
                min_expert_overlap=0.85,
                reason=f"{_W8A8_REASON}; the mode's own row: {_row.reason}",
            ),
        },
        near_tie_margin=_declared.near_tie_margin,
        near_tie_reason=f"{_declared.near_tie_reason}; int8/channel weights' wider margin applies on top",
    )

# onnx's node test cases (the op suite) in float16 compute; declared in Capabilities.op_tolerance_overrides.
OP_TOLERANCE_OVERRIDES: tuple[ToleranceOverride, ...] = (
    ToleranceOverride(
        precision="force_fp16",
        case_pattern="",
        rtol=1e-3,
        atol=5e-3,
        reason=(
            "float16 compute (npu-sim's default precision mode; one float16 ulp is 9.8e-4 at 1.0). Single ops stay "
            "inside the cases' rtol 1e-3; onnx's _expanded function bodies chain 5-10 float16 ops, and the "
            "cancellation in normalisation leaves absolute errors at the scale of the intermediates (~1). Measured "
            "on npu-sim: up to 3.5e-3 (LayerNormalization expanded), 7.7e-4 (window functions), 3.4e-4 (DFT, run "
            "in float32 on the host). atol 5e-3 (~5 ulps at 1.0) leaves 1.4x headroom; a wrong kernel still fails."
        ),
    ),
)


def _float_type_variable(node: onnx.NodeProto, opset: int) -> tuple[list[bool], list[bool]] | None:
    """Which inputs and outputs share the operator's main type variable (the one a dtype change moves).

    Returns ``(inputs, outputs)`` flags, or None when the operator has no such variable (its output
    dtype is fixed, e.g. Shape, or set by an attribute, e.g. Cast).
    """
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None
    if not schema.outputs:
        return None
    variable = schema.outputs[0].type_str
    allowed = next((c.allowed_type_strs for c in schema.type_constraints if c.type_param_str == variable), [])
    if "tensor(float16)" not in allowed:
        return None  # a fixed output dtype (Shape), one set by an attribute (Cast), or no float16 (Celu)

    def flags(names: Sequence[str], formals: Sequence[onnx.defs.OpSchema.FormalParameter]) -> list[bool]:
        return [formals[min(index, len(formals) - 1)].type_str == variable for index in range(len(names))]

    return flags(node.input, schema.inputs), flags(node.output, schema.outputs)


@functools.lru_cache(maxsize=1)
def _ort_float16_cpu_kernels() -> frozenset[str] | None:
    """ai.onnx operators ONNX Runtime's CPU provider has a float16 kernel for (None if it cannot say)."""
    try:
        from onnxruntime.capi import _pybind_state

        kernels = _pybind_state.get_all_opkernel_def()
    except Exception:  # a private API: without it, assume no float16 kernels
        return None
    return frozenset(
        kernel.op_name
        for kernel in kernels
        if kernel.provider == "CPUExecutionProvider"
        and kernel.domain in ("", "ai.onnx")
        and any("tensor(float16)" in types for types in kernel.type_constraints.values())
    )


def _rounds_through_float32(node: onnx.NodeProto) -> bool:
    """Whether a float16 ``node`` must be written as float32 compute between explicit float16 roundings.

    ONNX Runtime runs a float16 node it has no float16 CPU kernel for by casting around a float32
    kernel, and its graph transformers then drop the float32 -> float16 -> float32 cast pairs this
    creates: the float16 rounding of inputs and outputs silently disappears (measured on ORT 1.32:
    a float16 MatMul of [1.0001, 1.0002, 1.0003, 1.0004] by ones gives 4.001, not float16's 4.0).
    For those operators (MatMul and Softmax among them) the rewrite keeps the node in float32 and
    rounds explicitly: Cast to float16 and back on each input, Cast to float16 on each output. The
    numbers are then those of a kernel that reads and writes float16 and accumulates in float32.
    """
    kernels = _ort_float16_cpu_kernels()
    return kernels is None or node.op_type not in kernels


def router_nodes(model: onnx.ModelProto, placements: Sequence[NodePlacement], table: OpTable) -> set[int]:
    """Indices of the device nodes that compute MoE routing scores (kept float32 by ``router_fp32``).

    From each device TopK, walk back through the device nodes that produce its score input, and
    stop at (but include) the first matrix node on each path: the gate projection.
    """
    producers = {name: index for index, node in enumerate(model.graph.node) for name in node.output if name}
    nodes = model.graph.node
    router: set[int] = set()
    for index, node in enumerate(nodes):
        if node.op_type != "TopK" or not placements[index].on_device:
            continue
        router.add(index)
        stack = [producers[node.input[0]]] if node.input[0] in producers else []
        while stack:
            current = stack.pop()
            if current in router or not placements[current].on_device:
                continue
            router.add(current)
            entry = table.entry(nodes[current].op_type)
            if entry is not None and entry.category == "cube":
                continue
            stack.extend(producers[name] for name in nodes[current].input if name in producers)
    return router


def float16_nodes(
    model: onnx.ModelProto,
    placements: Sequence[NodePlacement],
    types: ValueTypes,
    table: OpTable,
    mode: str,
    router_fp32: bool = True,
) -> list[bool]:
    """Decide, node by node, whether it computes in float16 under ``mode``."""
    opset = ai_onnx_opset(model)
    nodes = model.graph.node
    keep = router_nodes(model, placements, table) if router_fp32 else set()
    producers = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    decided = [False] * len(nodes)
    for index, node in enumerate(nodes):
        entry = table.entry(node.op_type)
        if mode == "must_keep_origin_dtype" or not placements[index].on_device or entry is None or not entry.fp16:
            continue
        if index in keep or W8A8_NODE_MARK in node.name:
            continue
        flags = _float_type_variable(node, opset)
        if flags is None:
            continue
        moved = [name for name, flag in zip([*node.input, *node.output], [*flags[0], *flags[1]]) if flag and name]
        dtypes = [types.get(name, (None, None))[0] for name in moved]
        if "float32" not in dtypes or any(dtype is None for dtype in dtypes):
            continue  # nothing to reduce, or a value whose type is unknown (cannot be cast safely)
        if mode == "force_fp16":
            decided[index] = True
        elif mode == "allow_fp32_to_fp16":
            decided[index] = entry.category == "cube"
        elif mode == "allow_mix_precision":
            if entry.mix == "allow":
                decided[index] = True
            elif entry.mix == "gray":
                decided[index] = any(decided[producers[name]] for name in node.input if name in producers)
        else:
            raise ValueError(f"unknown precision mode {mode!r}")
    return decided


def apply_precision(model: onnx.ModelProto, decided: Sequence[bool], types: ValueTypes) -> onnx.ModelProto:
    """Rewrite ``model`` so that the nodes flagged in ``decided`` compute in float16.

    A tensor's float32 version keeps its name; its float16 version is named ``<name>__fp16``.
    Whichever a producer makes, the other is made by one Cast (or, for a weight, one converted
    initializer) the first time a reader needs it. A node rounded through float32 reads
    ``<name>__fp16__as_fp32`` (its float16 version cast back) and writes ``<name>__unrounded``,
    which one Cast turns into ``<name>__fp16``.
    """
    if not any(decided):
        return model
    opset = ai_onnx_opset(model)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {init.name: init for init in graph.initializer}
    is_float32 = {name for name, (dtype, _) in types.items() if dtype == "float32"}
    available: dict[tuple[str, bool], str] = {}  # (tensor, float16?) -> name holding that version
    for name in [*(value.name for value in graph.input), *initializers]:
        available[(name, False)] = name
    new_nodes: list[onnx.NodeProto] = []
    new_initializers: list[onnx.TensorProto] = []

    def version(name: str, float16: bool) -> str:
        if name not in is_float32:
            return name
        if (name, float16) in available:
            return available[(name, float16)]
        target = name + FLOAT16_SUFFIX if float16 else name
        if float16 and name in initializers:
            array = numpy_helper.to_array(initializers[name]).astype(np.float16)
            new_initializers.append(numpy_helper.from_array(array, target))
        else:
            source = available[(name, not float16)]
            to = onnx.TensorProto.FLOAT16 if float16 else onnx.TensorProto.FLOAT
            new_nodes.append(onnx.helper.make_node("Cast", [source], [target], name=f"{target}__cast", to=to))
        available[(name, float16)] = target
        return target

    rounded: dict[str, str] = {}  # tensor -> a float32 tensor holding its float16-rounded value

    def rounded_version(name: str) -> str:
        if name not in is_float32:
            return name
        if name not in rounded:
            rounded[name] = name + FLOAT16_SUFFIX + "__as_fp32"
            new_nodes.append(
                onnx.helper.make_node(
                    "Cast",
                    [version(name, True)],
                    [rounded[name]],
                    name=f"{rounded[name]}__cast",
                    to=onnx.TensorProto.FLOAT,
                )
            )
        return rounded[name]

    for node, float16 in zip(model.graph.node, decided):
        rewritten = onnx.NodeProto()
        rewritten.CopyFrom(node)
        through_float32 = float16 and _rounds_through_float32(node)
        if float16:
            input_flags, output_flags = _float_type_variable(node, opset)  # type: ignore[misc]
        else:
            input_flags, output_flags = [False] * len(node.input), [False] * len(node.output)
            for name in referenced_names(node) - set(node.input):
                version(name, False)  # a subgraph reads it from outside: it must exist as float32
        for index, name in enumerate(node.input):
            if name:
                flag = input_flags[index]
                rewritten.input[index] = rounded_version(name) if flag and through_float32 else version(name, flag)
        roundings = []
        for index, name in enumerate(node.output):
            if not name:
                continue
            if output_flags[index] and name in is_float32:
                rewritten.output[index] = name + ("__unrounded" if through_float32 else FLOAT16_SUFFIX)
                available[(name, True)] = name + FLOAT16_SUFFIX
                if through_float32:
                    roundings.append(
                        onnx.helper.make_node(
                            "Cast",
                            [name + "__unrounded"],
                            [name + FLOAT16_SUFFIX],
                            name=f"{name}{FLOAT16_SUFFIX}__round",
                            to=onnx.TensorProto.FLOAT16,
                        )
                    )
            else:
                available[(name, False)] = name
        new_nodes.append(rewritten)
        new_nodes.extend(roundings)
    for value in graph.output:
        version(value.name, False)

    used = set().union(*(referenced_names(node) for node in new_nodes)) | {value.name for value in graph.output}
    graph_inputs = {value.name for value in graph.input}
    kept = [init for init in graph.initializer if init.name in used or init.name in graph_inputs]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    del graph.value_info[:]  # dtypes changed; ONNX Runtime infers them again
    return result


def float16_tensors(model: onnx.ModelProto, decided: Sequence[bool], types: ValueTypes) -> set[str]:
    """Names of the float32 tensors that live on the device as float16 (for the memory estimate)."""
    opset = ai_onnx_opset(model)
    names: set[str] = set()
    for node, float16 in zip(model.graph.node, decided):
        if not float16:
            continue
        input_flags, output_flags = _float_type_variable(node, opset)  # type: ignore[misc]
        for name, flag in zip([*node.input, *node.output], [*input_flags, *output_flags]):
            if flag and name and types.get(name, (None, None))[0] == "float32":
                names.add(name)
    return names


def reported_precision(mode: str, activations: str) -> str:
    """The precision a compiled model reports: the mode, with ``+w8a8`` when activations are int8."""
    return mode + W8A8_SUFFIX if activations == "int8" else mode


def _int8_weight(
    value: str, producers: dict[str, onnx.NodeProto], initializers: dict[str, onnx.TensorProto]
) -> tuple[np.ndarray, np.ndarray, list[onnx.NodeProto]] | None:
    """The int8 codes and per-output-channel scales behind a matrix product's weight input, in its shape.

    Follows ``value`` back through Transpose and Reshape nodes (with constant shapes) to a per-axis
    DequantizeLinear of int8 codes with no zero point, and applies the same Reshape and Transpose to
    the codes and to the scales spread over the codes' shape. Returns ``(codes, scales, chain)``
    with ``scales`` of shape ``codes.shape`` (one value per output channel, repeated along the
    reduction axis), or None when ``value`` is not such a weight.
    """
    chain: list[onnx.NodeProto] = []
    while value in producers and producers[value].op_type in ("Transpose", "Reshape"):
        node = producers[value]
        if node.op_type == "Reshape" and (len(node.input) < 2 or node.input[1] not in initializers):
            return None
        chain.append(node)
        value = node.input[0]
    dequantize = producers.get(value)
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(dequantize.input) > 2:
        return None
    codes_name, scale_name = dequantize.input[0], dequantize.input[1]
    if codes_name not in initializers or scale_name not in initializers:
        return None
    if initializers[codes_name].data_type != onnx.TensorProto.INT8:
        return None
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in dequantize.attribute}
    if attributes.get("block_size", 0):
        return None
    codes = numpy_helper.to_array(initializers[codes_name])
    scale = numpy_helper.to_array(initializers[scale_name]).astype(np.float32)
    axis = int(attributes.get("axis", 1)) % codes.ndim
    if scale.ndim == 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    scales = np.broadcast_to(scale, codes.shape)
    for node in reversed(chain):
        if node.op_type == "Reshape":
            target = numpy_helper.to_array(initializers[node.input[1]])
            codes, scales = codes.reshape(target), scales.reshape(target)
        else:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            codes, scales = np.transpose(codes, perm), np.transpose(scales, perm)
    return codes, scales, [dequantize, *reversed(chain)]


def _add_node(
    nodes: list[onnx.NodeProto], base: str, op_type: str, inputs: list[str], suffix: str, **attrs: object
) -> str:
    """Append a node named, and writing one value named, ``<base>.<suffix>``; return that name."""
    nodes.append(onnx.helper.make_node(op_type, inputs, [f"{base}.{suffix}"], f"{base}.{suffix}", **attrs))
    return f"{base}.{suffix}"


def quantize_activations(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite ``model`` so that its int8-weight matrix products compute as Ascend's W8A8 does.

    Each MatMul (or Gemm taking ``A @ B.T``) whose weight is a per-channel int8 DequantizeLinear
    becomes: per row of the activation (each token), ``scale = max|x| / 127`` (1 where the row is
    all zeros), codes ``clip(round_half_even(x / scale), -127, 127)`` as int8; an int8 x int8
    MatMulInteger accumulating in int32; the int32 result converted to float32 and multiplied by
    the activation's scale, then by the weight's per-channel scale. These nodes compute in float32
    under every precision mode (see ``W8A8_NODE_MARK``). Intermediate names end in
    ``.w8a8_codes`` (the activation's int8 codes) and ``.w8a8_int32`` (the accumulator).

    Returns:
        ``(rewritten model, number of matrix products rewritten)``.
    """
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output if name}
    opset = ai_onnx_opset(model)
    new_nodes: list[onnx.NodeProto] = []
    new_initializers: list[onnx.TensorProto] = []
    constants: dict[str, str] = {}
    replaced: list[onnx.NodeProto] = []
    rewritten = 0

    def constant(name: str, array: np.ndarray) -> str:
        if name not in constants:
            constants[name] = f"w8a8.{name}"
            new_initializers.append(numpy_helper.from_array(array, constants[name]))
        return constants[name]

    for node in graph.node:
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        found = None
        if node.op_type == "MatMul" or (
            node.op_type == "Gemm"
            and attributes.get("alpha", 1.0) == 1.0
            and not attributes.get("transA", 0)
            and (len(node.input) < 3 or not node.input[2])
        ):
            found = _int8_weight(node.input[1], producers, initializers)
        if found is None:
            new_nodes.append(node)
            continue
        codes, scales, chain = found
        if node.op_type == "Gemm" and attributes.get("transB", 0):
            codes, scales = np.swapaxes(codes, -1, -2), np.swapaxes(scales, -1, -2)
        channel_scales = scales[..., :1, :]
        if codes.ndim < 2 or not np.array_equal(np.broadcast_to(channel_scales, scales.shape), scales):
            new_nodes.append(node)  # scales vary along the reduction axis: not per output channel
            continue
        replaced.extend(chain)
        rewritten += 1
        base, x, output = node.output[0], node.input[0], node.output[0]
        weight_codes = f"{base}.w8a8_weight"
        new_initializers.append(numpy_helper.from_array(np.ascontiguousarray(codes), weight_codes))
        weight_scales = f"{base}.w8a8_weight_scale"
        new_initializers.append(numpy_helper.from_array(np.ascontiguousarray(channel_scales), weight_scales))
        limit, one = constant("limit", np.array(_INT8_LIMIT, np.float32)), constant("one", np.array(1.0, np.float32))
        zero, low = constant("zero", np.array(0.0, np.float32)), constant("low", np.array(-_INT8_LIMIT, np.float32))

        make = functools.partial(_add_node, new_nodes, base)

        magnitude = make("Abs", [x], "w8a8_abs")
        if opset >= 18:
            peak = make(
                "ReduceMax", [magnitude, constant("last_axis", np.array([-1], np.int64))], "w8a8_max", keepdims=1
            )
        else:
            peak = make("ReduceMax", [magnitude], "w8a8_max", axes=[-1], keepdims=1)
        raw_scale = make("Div", [peak, limit], "w8a8_raw_scale")
        scale = make("Where", [make("Equal", [raw_scale, zero], "w8a8_all_zero"), one, raw_scale], "w8a8_scale")
        rounded = make("Round", [make("Div", [x, scale], "w8a8_scaled")], "w8a8_rounded")
        clipped = make("Clip", [rounded, low, limit], "w8a8_clipped")
        quantized = make("Cast", [clipped], "w8a8_codes", to=onnx.TensorProto.INT8)
        accumulated = make("MatMulInteger", [quantized, weight_codes], "w8a8_int32")
        as_float = make("Cast", [accumulated], "w8a8_float", to=onnx.TensorProto.FLOAT)
        per_token = make("Mul", [as_float, scale], "w8a8_dequantized")
        new_nodes.append(onnx.helper.make_node("Mul", [per_token, weight_scales], [output], f"{base}.w8a8_output"))

    if not replaced:
        return model, 0
    kept = new_nodes
    while True:  # drop the weights' DequantizeLinear chains that nothing reads any more
        read = {name for node in kept for name in node.input} | {value.name for value in graph.output}
        remaining = [node for node in kept if not (node in replaced and not read.intersection(node.output))]
        if len(remaining) == len(kept):
            break
        kept = remaining
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(kept)
    used = set().union(*(referenced_names(node) for node in kept)) | {value.name for value in graph.input}
    kept_initializers = [tensor for tensor in graph.initializer if tensor.name in used]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept_initializers + new_initializers)
    return result, rewritten
