"""The weight-format pass over an exported ONNX model, and its application to bundles.

See :mod:`exporters.weight_formats` for the formats. The pass finds the weights of matrix products
that are initializers (the ``B`` input of ``MatMul`` and ``Gemm``, the expert weights of
``com.microsoft::MoE``), keeps each router float32 (the weight of the first matrix product upstream
of a routing ``TopK``) and rewrites every other weight into the chosen format; weights that are
computed from initializers (the sparse lowering's Concat/Split of expert stacks) are folded first.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.fp8_sources import FP8Sources
from exporters.weight_formats import (
    BLOCKED_OPSET,
    MATMULNBITS_ACCURACY_LEVEL,
    WeightPlan,
    format_key,
    get_weight_format,
    plan_weights,
    quantize,
)
from portable_moe.bundle import MODEL_NAME, Bundle, bundle_writer, load_bundle, write_manifest
from portable_moe.compare import with_weights
from portable_moe.conformance.routing import router_score_values
from portable_moe.errors import BundleError, ExportError
from portable_moe.tensors import specs_from_onnx

# Matrix-product consumers: op type -> input indices that hold a weight.
_WEIGHT_INPUTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "MatMul"): (1,),
    ("", "Gemm"): (1,),
    ("com.microsoft", "MoE"): (2, 4, 6),
}
# Nodes between a router's matrix product and the routing TopK (the scores' elementwise work).
_ROUTER_WALK_LIMIT = 64


@dataclass
class _Weight:
    """One weight initializer and how its consumers use it (its values are read where it is converted)."""

    name: str
    tensor: TensorProto
    axis: int  # the reduction axis
    consumers: list[tuple[onnx.NodeProto, int]]


def _router_weights(proto: onnx.ModelProto, routing_outputs: Sequence[str]) -> set[str]:
    """Initializers of the first matrix product upstream of each routing TopK's scores (the routers)."""
    producers = {output: node for node in proto.graph.node for output in node.output}
    initializers = {tensor.name for tensor in proto.graph.initializer}
    found: set[str] = set()
    for scores, _ in router_score_values(proto, routing_outputs).values():
        pending, seen = [scores], set()
        while pending and len(seen) < _ROUTER_WALK_LIMIT:
            value = pending.pop()
            node = producers.get(value)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("Shape", "Size"):
                continue  # sizes, not values: the walk would climb the residual stream into other layers
            if node.op_type in ("MatMul", "Gemm"):
                found.update(name for name in node.input if name in initializers)
                continue  # the router's product: its activation input is the hidden state, not the router's
            pending.extend(name for name in node.input if name and name not in initializers)
    return found


def fold_weight_preparation(proto: onnx.ModelProto) -> None:
    """Evaluate nodes whose inputs are all initializers (e.g. the sparse lowering's Concat/Split of
    expert weights), so that every matrix product reads its weight straight from an initializer.

    ONNX Runtime folds these when it loads the model anyway; here it lets the pass see per-expert
    weights. ``DequantizeLinear`` stays: ONNX Runtime does not fold it either (it keeps it for its
    quantized kernels), and folded it would turn stored codes back into float32 weights.
    Runs onnx's reference evaluator one node at a time.
    """
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    values = {tensor.name: tensor for tensor in graph.initializer}
    outputs = {value.name for value in graph.output}
    opsets = {opset.domain: opset.version for opset in proto.opset_import}
    kept, folded_any = [], False
    for node in graph.node:
        constant = (
            node.domain in ("", "ai.onnx")
            and node.op_type != "DequantizeLinear"
            and node.input
            and all(name in values for name in node.input if name)
            and not outputs.intersection(node.output)
        )
        if not constant:
            kept.append(node)
            continue
        single = helper.make_model(
            helper.make_graph(
                [node],
                "fold",
                [],
                [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in node.output],
                [values[name] for name in node.input if name],
            ),
            opset_imports=[helper.make_opsetid("", opsets.get("", opsets.get("ai.onnx", 20)))],
        )
        results = ReferenceEvaluator(single).run(None, {})
        for name, value in zip(node.output, results):
            values[name] = numpy_helper.from_array(np.asarray(value), name)
        folded_any = True
    if not folded_any:
        return
    used = {name for node in kept for name in node.input} | outputs
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(tensor for name, tensor in values.items() if name in used)


def _reduction_axis(node: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The axis a matrix product sums over in its weight input, or None when it is not a weight."""
    if node.op_type == "MatMul":
        return rank - 2 if rank >= 2 else None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    if node.op_type == "MoE":
        return rank - 1  # torch Linear layout [experts, out, in]
    return None


def _find_weights(proto: onnx.ModelProto, router: set[str]) -> tuple[list[_Weight], dict[str, str]]:
    """Float32 weight initializers every consumer of which multiplies by them, and why others are kept."""
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in proto.graph.node:
        for index, name in enumerate(node.input):
            if name in initializers:
                uses[name].append((node, index))
    weights, kept = [], {}
    for name, tensor in initializers.items():
        if tensor.data_type != TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        if name in router:
            kept[name] = "router (kept float32)"
            continue
        axes = set()
        for node, index in uses[name]:
            is_weight = index in _WEIGHT_INPUTS.get((node.domain, node.op_type), ())
            axes.add(_reduction_axis(node, index, len(tensor.dims)) if is_weight else None)
        if not uses[name] or None in axes or len(axes) != 1:
            kept[name] = "not a matrix-product weight (kept float32)"
            continue
        weights.append(_Weight(name, tensor, axes.pop(), uses[name]))
    return weights, kept


class _GraphEdit:
    """New initializers and nodes, with names that cannot collide with the graph's own."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.taken = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output}
        self.taken |= {v.name for v in proto.graph.input}
        self.initializers: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def name(self, base: str) -> str:
        candidate, number = base, 1
        while candidate in self.taken:
            candidate, number = f"{base}_{number}", number + 1
        self.taken.add(candidate)
        return candidate

    def constant(self, base: str, array: np.ndarray, data_type: int | None = None, raw: bool = False) -> str:
        """An initializer: numpy's dtype, or ``data_type`` from values (``raw``: from their bytes)."""
        name = self.name(base)
        if data_type is None:
            tensor = numpy_helper.from_array(array, name)
        elif raw:
            tensor = helper.make_tensor(
                name, data_type, list(array.shape), np.ascontiguousarray(array).tobytes(), raw=True
            )
        else:
            tensor = helper.make_tensor(name, data_type, list(array.shape), array.reshape(-1).tolist())
        self.initializers.append(tensor)
        return name

    def node(self, op_type: str, inputs: list[str], base: str, domain: str = "", **attributes: Any) -> str:
        output = self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, domain=domain, **attributes))
        return output


def _store_codes(edit: _GraphEdit, base: str, codes: np.ndarray, bits: int) -> str:
    if bits == 8:
        return edit.constant(base, codes)
    return edit.constant(base, codes, TensorProto.INT4)  # make_tensor packs two int4 codes per byte


def _dequantize_standard(
    edit: _GraphEdit, weight: _Weight, codes: np.ndarray, scales: np.ndarray, bits: int, block_size: int
) -> str:
    """DequantizeLinear (blocked, or per-axis on a [reduction, channels] matrix) back to the weight's shape."""
    if block_size:
        codes_name = _store_codes(edit, f"{weight.name}.q{bits}", codes, bits)
        scale_name = edit.constant(f"{weight.name}.scale", scales)
        return edit.node(
            "DequantizeLinear", [codes_name, scale_name], f"{weight.name}.dequantized", axis=weight.axis,
            block_size=block_size,
        )  # fmt: skip
    # Per channel: the reduction axis first, every other axis flattened into channels, one scale each.
    moved_shape = np.moveaxis(codes, weight.axis, 0).shape
    matrix = np.moveaxis(codes, weight.axis, 0).reshape(moved_shape[0], -1)
    codes_name = _store_codes(edit, f"{weight.name}.q{bits}", matrix, bits)
    scale_name = edit.constant(f"{weight.name}.scale", np.moveaxis(scales, weight.axis, 0).reshape(-1))
    value = edit.node("DequantizeLinear", [codes_name, scale_name], f"{weight.name}.dequantized", axis=1)
    if len(moved_shape) != 2:
        shape = edit.constant(f"{weight.name}.shape", np.array(moved_shape, dtype=np.int64))
        value = edit.node("Reshape", [value, shape], f"{weight.name}.reshaped")
    if weight.axis != 0:
        order = list(range(1, len(moved_shape)))
        order.insert(weight.axis, 0)
        value = edit.node("Transpose", [value], f"{weight.name}.transposed", perm=order)
    return value


def _unsigned_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes as ONNX Runtime's MatMulNBits and QMoE store them along the last (reduction) axis: unsigned, with
    their default zero point 2^(bits-1), two int4 codes per byte (the first in the low nibble)."""
    unsigned = (codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        unsigned = (unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)).astype(np.uint8)
    return unsigned


# com.microsoft::MoE weight input -> the QMoE inputs of its codes and scales; MoE bias input -> QMoE's.
_QMOE_WEIGHT_INPUTS = {2: (2, 3), 4: (5, 6), 6: (8, 9)}
_QMOE_BIAS_INPUTS = {3: 4, 5: 7, 7: 10}


def _qmoe_nodes(weights: Sequence[_Weight]) -> dict[int, onnx.NodeProto]:
    """The com.microsoft::MoE nodes (by id) every expert weight of which is converted and used by that node alone."""
    uses: dict[int, set[int]] = defaultdict(set)
    nodes: dict[int, onnx.NodeProto] = {}
    for weight in weights:
        for node, index in weight.consumers:
            if (node.domain, node.op_type) == ("com.microsoft", "MoE") and len(weight.consumers) == 1:
                uses[id(node)].add(index)
                nodes[id(node)] = node
    return {
        key: node
        for key, node in nodes.items()
        if uses[key] == {index for index in _QMOE_WEIGHT_INPUTS if index < len(node.input) and node.input[index]}
    }


def _qmoe_node(
    edit: _GraphEdit, node: onnx.NodeProto, parts: Mapping[int, tuple[str, str]], bits: int, block_size: int
) -> onnx.NodeProto:
    """A com.microsoft::QMoE replacing the MoE ``node``: same routing and attributes, block-quantized experts.

    ``parts`` maps each MoE weight input index to the names of its stored codes and scales.
    """
    inputs = [""] * 11
    inputs[0], inputs[1] = node.input[0], node.input[1]
    for index, (codes_name, scales_name) in parts.items():
        inputs[_QMOE_WEIGHT_INPUTS[index][0]], inputs[_QMOE_WEIGHT_INPUTS[index][1]] = codes_name, scales_name
    for index, target in _QMOE_BIAS_INPUTS.items():
        if index < len(node.input):
            inputs[target] = node.input[index]
    while not inputs[-1]:
        inputs.pop()
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return helper.make_node(
        "QMoE", inputs, list(node.output), name=edit.name(f"{node.name or 'moe'}.quantized"), domain="com.microsoft",
        **attributes, expert_weight_bits=bits, block_size=block_size, weights_prepacked=0,
        accuracy_level=MATMULNBITS_ACCURACY_LEVEL,
    )  # fmt: skip


def _matmulnbits_node(
    edit: _GraphEdit, node: onnx.NodeProto, weight: _Weight, codes: np.ndarray, scales: np.ndarray, bits: int,
    block_size: int,
) -> onnx.NodeProto | None:  # fmt: skip
    """A com.microsoft::MatMulNBits replacing ``node`` (a 2-D MatMul, or a Gemm with alpha 1 and no transA)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(weight.tensor.dims) != 2 or not block_size:
        return None
    if node.op_type == "Gemm" and (attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0):
        return None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and attributes.get("beta", 1.0) != 1.0:
        return None
    # MatMulNBits wants B as [N, K] in K-blocks of unsigned codes.
    per_row = np.moveaxis(codes, weight.axis, -1)
    columns, rows = per_row.shape  # N, K
    packed = _unsigned_codes(per_row, bits).reshape(columns, rows // block_size, -1)
    scale_rows = np.moveaxis(scales, weight.axis, -1).reshape(-1).astype(np.float32)
    inputs = [
        node.input[0],
        edit.constant(f"{weight.name}.nbits", packed),
        edit.constant(f"{weight.name}.scale", scale_rows),
    ]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        inputs += ["", "", node.input[2]]  # zero_points, g_idx, bias
    return helper.make_node(
        "MatMulNBits", inputs, list(node.output), name=edit.name(f"{node.name or weight.name}.nbits"),
        domain="com.microsoft", K=rows, N=columns, bits=bits, block_size=block_size,
        accuracy_level=MATMULNBITS_ACCURACY_LEVEL,
    )  # fmt: skip


def _set_opset(proto: onnx.ModelProto, domain: str, version: int) -> None:
    for opset in proto.opset_import:
        if opset.domain == domain or (domain == "" and opset.domain == "ai.onnx"):
            opset.version = max(opset.version, version)
            return
    proto.opset_import.append(helper.make_opsetid(domain, version))


def convert_weights(
    proto: onnx.ModelProto,
    weights: str,
    block_size: int | None = None,
    kernel: str = "dequantize",
    routing_outputs: Sequence[str] = (),
    fp8_sources: FP8Sources | None = None,
    *,
    in_place: bool = False,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Rewrite a float32 model's matrix-product weights into ``weights`` (the graph pass).

    Args:
        proto: the exported float32 model (not modified, unless ``in_place``).
        weights: a name of :data:`WEIGHT_FORMATS`.
        block_size: for int8/int4, inputs per scale (0: per output channel); None: the format's default.
        kernel: "dequantize" (standard ONNX) or "matmulnbits" (ONNX Runtime's fused node where it fits).
        routing_outputs: the routing output names, whose routers stay float32.
        fp8_sources: the FP8 checkpoint the model was exported from: int8/int4 weights that came
            from its blocks take their codes and scales from them (see :class:`FP8Sources`).
        in_place: rewrite ``proto`` itself, not a copy (for a caller that has no further use for
            it: a large model's weights are then held once, not twice).

    Returns:
        ``(new model, manifest record)``; the record holds the format, block size, kernel, the
        opset, and ``tensors``: every float initializer of the result by its original name ->
        ``{"format", "block_size", "shape", "bytes"}`` (kept tensors say why they were kept; those
        whose scales came from FP8 blocks say ``"scales": "fp8"``); with ``fp8_sources``,
        ``fp8_scales`` says how many kept them, or why none could (``fallback``).

    Raises:
        ExportError: unknown format or kernel, a bad block size, a model that is not float32, or
            a block size that does not divide a weight's reduction axis.
    """
    weight_format = get_weight_format(weights)
    block_size = plan_weights(weights, block_size, kernel).block_size
    if in_place:
        model = proto
    else:
        model = onnx.ModelProto()
        model.CopyFrom(proto)
    if weight_format.name == "float32":
        weights_list: list[_Weight] = []
        kept = {t.name: "float32" for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    else:
        router = _router_weights(model, routing_outputs)
        fold_weight_preparation(model)
        weights_list, kept = _find_weights(model, router)
    edit = _GraphEdit(model)
    tensors: dict[str, dict[str, Any]] = {}
    replaced: dict[str, str] = {}  # original weight name -> value carrying the float32 weight
    substitutes: dict[int, onnx.NodeProto] = {}  # id of a replaced node -> its fused replacement
    # MoE nodes that become QMoE (matmulnbits kernel with blocks), and their stored codes and scales by input.
    qmoe_nodes = _qmoe_nodes(weights_list) if kernel == "matmulnbits" and block_size else {}
    qmoe_parts: dict[int, dict[int, tuple[str, str]]] = defaultdict(dict)
    fp8_fallback = fp8_sources.fallback_reason(weights, block_size) if fp8_sources else None
    for weight in weights_list:
        # One weight's values at a time: the last one's are let go of when this name is bound again.
        array = numpy_helper.to_array(weight.tensor)
        record = {
            "format": weights,
            "shape": list(array.shape),
            "consumers": sorted({n.op_type for n, _ in weight.consumers}),
        }
        if not weight_format.quantized:
            data_type = TensorProto.FLOAT16 if weights == "float16" else TensorProto.BFLOAT16
            if weights == "float16":
                stored = edit.constant(f"{weight.name}.{weights}", array.astype(np.float16))
            else:
                stored = edit.constant(f"{weight.name}.{weights}", _to_bfloat16_bits(array), data_type, raw=True)
            replaced[weight.name] = edit.node("Cast", [stored], f"{weight.name}.float32", to=TensorProto.FLOAT)
            tensors[weight.name] = {**record, "bytes": array.size * 2}
            continue
        from_fp8 = None
        if fp8_sources and not fp8_fallback:
            from_fp8 = fp8_sources.quantize(array, weight.axis, weights, block_size)
            record.update({"scales": "fp8"} if from_fp8 else {})
        codes, scales = from_fp8 or quantize(array, weight_format.bits, block_size, weight.axis)
        record.update(
            block_size=block_size,
            axis=weight.axis,
            bytes=math.ceil(codes.size * weight_format.bits / 8) + scales.size * 4,
        )
        (moe, index), *_ = weight.consumers
        if kernel == "matmulnbits" and id(moe) in qmoe_nodes:
            # QMoE wants [E, N, K] per expert: the MoE layout, with the reduction axis last already.
            codes_name = edit.constant(f"{weight.name}.nbits", _unsigned_codes(codes, weight_format.bits))
            qmoe_parts[id(moe)][index] = (codes_name, edit.constant(f"{weight.name}.scale", scales))
            tensors[weight.name] = {**record, "kernel": "qmoe"}
            continue
        fused = []
        if kernel == "matmulnbits":
            fused = [
                (node, _matmulnbits_node(edit, node, weight, codes, scales, weight_format.bits, block_size))
                for node, _ in weight.consumers
            ]
        if fused and all(new is not None for _, new in fused):
            for node, new in fused:
                substitutes[id(node)] = new
                edit.nodes.append(new)
            _set_opset(model, "com.microsoft", 1)
            tensors[weight.name] = {**record, "kernel": "matmulnbits"}
            continue
        replaced[weight.name] = _dequantize_standard(edit, weight, codes, scales, weight_format.bits, block_size)
        tensors[weight.name] = {**record, "kernel": "dequantize"}
        if block_size or weight_format.bits == 4:
            _set_opset(model, "", BLOCKED_OPSET)
        else:
            _set_opset(model, "", 13)
    for key, parts in qmoe_parts.items():
        substitutes[key] = _qmoe_node(edit, qmoe_nodes[key], parts, weight_format.bits, block_size)
        edit.nodes.append(substitutes[key])
        _set_opset(model, "com.microsoft", 1)
    _rebuild_graph(model, edit, replaced, substitutes)
    for name, reason in kept.items():
        tensor = next((t for t in model.graph.initializer if t.name == name), None)
        if tensor is not None:
            tensors[name] = {
                "format": "float32",
                "shape": list(tensor.dims),
                "bytes": 4 * math.prod(tensor.dims),
                "note": reason,
            }
    record = {
        "format": weights,
        "key": format_key(weights, block_size),
        "block_size": block_size,
        "kernel": kernel if weight_format.quantized else None,
        "accuracy_level": MATMULNBITS_ACCURACY_LEVEL if kernel == "matmulnbits" else None,
        "router": "float32",
        "converted": len(weights_list),
        "tensors": dict(sorted(tensors.items())),
    }
    if fp8_sources:
        kept_fp8 = sum(entry.get("scales") == "fp8" for entry in tensors.values())
        record["fp8_scales"] = {"kept": kept_fp8, "fallback": fp8_fallback}
    return model, record


def _to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 with round-to-nearest-even, as the uint16 bit patterns make_tensor stores."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def _rebuild_graph(
    model: onnx.ModelProto, edit: _GraphEdit, replaced: Mapping[str, str], substitutes: Mapping[int, onnx.NodeProto]
) -> None:
    """Dequantizing nodes first (they read only initializers), fused nodes where the nodes they
    replace were, weight inputs renamed, unused initializers dropped."""
    graph = model.graph
    nodes = [substitutes.get(id(node), node) for node in graph.node]
    for node in nodes:
        for index, name in enumerate(node.input):
            if name in replaced:
                node.input[index] = replaced[name]
    fused = {id(node) for node in substitutes.values()}
    preparation = [node for node in edit.nodes if id(node) not in fused]
    del graph.node[:]
    graph.node.extend([*preparation, *nodes])
    initializers = [*graph.initializer, *edit.initializers]
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    del graph.initializer[:]
    graph.initializer.extend(tensor for tensor in initializers if tensor.name in used)


def apply_weight_plan(
    model_path: Path,
    plan: WeightPlan,
    routing_outputs: Sequence[str],
    say: Callable[[str], None] | None = None,
    fp8_sources: FP8Sources | None = None,
) -> dict[str, Any]:
    """Rewrite the model file at ``model_path`` in place to ``plan``'s format; return the manifest record.

    A float32 plan leaves the file as it is and only records every tensor's format, from the graph
    alone: its weights (external data beside a large model) are not read. ``fp8_sources``: see
    :func:`convert_weights`.
    """
    proto = onnx.load(str(model_path), load_external_data=plan.weights != "float32")
    if plan.weights != "float32" and say:
        say(f"storing weights as {plan.key} ({plan.kernel} kernel); the router stays float32")
    converted, record = convert_weights(
        proto, plan.weights, plan.block_size, plan.kernel, routing_outputs, fp8_sources=fp8_sources, in_place=True
    )
    fp8 = record.get("fp8_scales")
    if fp8 and say:
        say(
            f"FP8 source: {fp8['kept']} weights keep their FP8 block scales"
            if not fp8["fallback"]
            else f"FP8 source: block scales not kept: {fp8['fallback']}"
        )
    if plan.weights != "float32":
        onnx.save(converted, str(model_path))
    return record


def convert_bundle(
    source: Bundle | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    weights: str,
    block_size: int | None = None,
    kernel: str = "dequantize",
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Write a copy of a float32 bundle with its weights in another format (the pass, on a written bundle).

    The golden data are copied unchanged (the float32 torch outputs), and the new graph is
    validated against them under the format's tolerance row, as :func:`export_bundle` does.

    Raises:
        ExportError: a bad format request, a source whose weights are not float32, or a converted
            graph that fails validation.
        BundleError: a missing or damaged source, or an existing ``output_dir`` without ``overwrite``.
    """
    from exporters.validation import validate_graph

    plan = plan_weights(weights, block_size, kernel)
    bundle = source if isinstance(source, Bundle) else load_bundle(source)
    if bundle.weight_format != "float32":
        raise ExportError(f"{bundle.path} already holds {bundle.weight_format} weights; convert from a float32 bundle")
    if Path(output_dir).exists() and not overwrite:
        raise BundleError(f"{output_dir} already exists; choose another directory or pass overwrite (--force)")
    proto = bundle.load_onnx()
    golden = bundle.golden_sets()
    with bundle_writer(output_dir, overwrite=overwrite) as staging:
        model_path = staging / MODEL_NAME
        converted, record = convert_weights(
            proto, plan.weights, plan.block_size, plan.kernel, list(bundle.routing_outputs), in_place=True
        )
        onnx.save(converted, str(model_path))
        validate_graph(model_path, golden, bundle.routing_outputs, with_weights("exact", record["key"]), progress)
        inputs, outputs = specs_from_onnx(converted)
        kept = {key: value for key, value in bundle.manifest.items() if key not in _MANIFEST_OWN_KEYS}
        opsets = {opset.domain or "ai.onnx": opset.version for opset in converted.opset_import}
        extra = {**kept, "opset": opsets.get("ai.onnx"), "ir_version": converted.ir_version, "weights": record}
        write_manifest(staging, inputs=inputs, outputs=outputs, golden=golden, config=bundle.config, extra=extra)
    return load_bundle(output_dir)


# Manifest keys write_manifest writes itself (everything else carries over from the source bundle).
_MANIFEST_OWN_KEYS = {"format", "format_version", "model_file", "config", "inputs", "outputs", "golden", "files"}
