"""The "fused" lowering of the routed experts: one ONNX Runtime ``com.microsoft::MoE`` node.

ONNX Runtime ships a contrib operator that runs a whole mixture-of-experts FFN in one kernel. It
does its own routing (softmax over ``router_probs``, then top-k), while this project's router has
already chosen the experts and their weights. To make the kernel pick exactly those experts with
exactly those weights, the lowering builds ``router_probs`` as

* ``log(max(weight, 1e-30))`` at each selected expert (softmax is shift-invariant, so after the
  softmax the selected experts hold ``weight / sum(weights)``), and
* a large negative sentinel everywhere else, whose softmax share is exactly zero in float32 but
  which is finite, so nothing produces inf or NaN,

asks the kernel to renormalise the top-k (``normalize_routing_weights=1``; the selected shares
already sum to one, so this only evens out rounding), and multiplies the kernel's output by
``sum(weights)`` per token, which restores the normalisation and the routed scaling factor that
the softmax took out. Weights must therefore be non-negative and the experts of one token
distinct, which is what a top-k router produces.

The kernel wants gate and up projections fused into one ``fc1`` tensor [E, 2I, H], interleaved row
by row (row 2i is gate row i, row 2i+1 is up row i; the CPU kernel accepts only this layout,
``swiglu_fusion=1``), and computes ``silu(gate) * up`` when ``activation_alpha=1``,
``activation_beta=0`` and ``swiglu_limit=inf`` (other values give the clamped gpt-oss variant).

Eagerly, :func:`routed_experts_fused` runs a custom torch op (``portable_moe::fused_moe``) whose
implementation is plain torch, so the model keeps working without ONNX Runtime. Exporting with
``custom_translation_table=FUSED_TRANSLATION_TABLE`` turns that op into the router construction,
the MoE node and the scaling. The interleaved ``fc1`` is first expressed as Unsqueeze/Concat/Reshape
of the w1 and w3 initializers (correct whatever the weights are); :func:`fold_fused_weights` then
replaces that with one precomputed constant, which the exporter's own optimizer does not do for
tensors of realistic size.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import onnxscript
import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import FLOAT, INT64
from torch.nn import functional

# ONNX Runtime's contrib domain. The standard ops come from onnxscript's opset 18: each of them is
# unchanged from opset 15 (Shape with start/end) up to the opsets the exporter targets.
_MICROSOFT = onnxscript.values.Opset("com.microsoft", 1)


def _moe_schema() -> onnx.defs.OpSchema:
    """A local description of com.microsoft::MoE (version 1) for the exporter's graph builder.

    onnx's schema registry does not know ONNX Runtime's contrib ops, and the exporter's builder
    needs a schema to bind inputs and attributes; it is only used here, never registered globally.
    """
    formal = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    attr_type = onnx.defs.OpSchema.AttrType
    inputs = [
        formal("input", "T"),
        formal("router_probs", "T"),
        formal("fc1_experts_weights", "T"),
        formal("fc1_experts_bias", "T", param_option=optional),
        formal("fc2_experts_weights", "T"),
        formal("fc2_experts_bias", "T", param_option=optional),
        formal("fc3_experts_weights", "T", param_option=optional),
        formal("fc3_experts_bias", "T", param_option=optional),
    ]
    attributes = [
        onnx.defs.OpSchema.Attribute("k", attr_type.INT, required=False),
        onnx.defs.OpSchema.Attribute("activation_type", attr_type.STRING, required=False),
        onnx.defs.OpSchema.Attribute("normalize_routing_weights", attr_type.INT, required=False),
        onnx.defs.OpSchema.Attribute("use_sparse_mixer", attr_type.INT, required=False),
        onnx.defs.OpSchema.Attribute("swiglu_fusion", attr_type.INT, required=False),
        onnx.defs.OpSchema.Attribute("swiglu_limit", attr_type.FLOAT, required=False),
        onnx.defs.OpSchema.Attribute("activation_alpha", attr_type.FLOAT, required=False),
        onnx.defs.OpSchema.Attribute("activation_beta", attr_type.FLOAT, required=False),
    ]
    return onnx.defs.OpSchema(
        "MoE",
        "com.microsoft",
        1,
        inputs=inputs,
        outputs=[formal("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=attributes,
    )


_MOE = onnxscript.values.Op(_MICROSOFT, "MoE", _moe_schema())

# Router value for experts that were not selected. Softmax subtracts the row maximum, which is at
# least log(1e-30) ~ -69, so every unselected expert sits below -9900 and float32 exp gives exactly
# 0; it stays finite, unlike -inf, so no inf - inf NaN can appear.
ROUTER_SENTINEL = -1.0e4
# Smallest weight fed to the log, so that zero weights map to a finite router value.
MIN_ROUTING_WEIGHT = 1.0e-30

# Attributes of the com.microsoft::MoE node that make it compute plain SwiGLU experts:
# silu(gate) * up with gate and up interleaved in fc1, no clamping and no +1 on the up branch.
MOE_ATTRIBUTES: dict[str, object] = {
    "activation_type": "swiglu",
    "swiglu_fusion": 1,
    "activation_alpha": 1.0,
    "activation_beta": 0.0,
    "swiglu_limit": math.inf,
    "normalize_routing_weights": 1,
}


@torch.library.custom_op("portable_moe::fused_moe", mutates_args=())
def fused_moe(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts as one opaque op (eager implementation in plain torch).

    Args:
        hidden: [T, H] token states.
        expert_ids: [T, k] int64 experts chosen per token.
        expert_weights: [T, k] weights of those experts.
        w1: [E, I, H] gate projections.
        w3: [E, I, H] up projections.
        w2: [E, H, I] down projections.

    Returns:
        [T, H] weighted sum of the selected experts' outputs.
    """
    routed = torch.zeros_like(hidden)
    # Visit only the experts that received tokens, each once, on all of its tokens at the same time.
    for expert in torch.unique(expert_ids).tolist():
        token_index, slot_index = torch.nonzero(expert_ids == expert, as_tuple=True)
        tokens = hidden[token_index]
        activated = functional.silu(tokens @ w1[expert].t()) * (tokens @ w3[expert].t())
        out = (activated @ w2[expert].t()) * expert_weights[token_index, slot_index].unsqueeze(1)
        routed.index_add_(0, token_index, out.to(routed.dtype))
    return routed


@fused_moe.register_fake
def _fused_moe_fake(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    # Shape only: the output has the input's shape, which keeps T symbolic while exporting.
    return torch.empty_like(hidden)


def routed_experts_fused(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts that export to ONNX Runtime's fused MoE operator.

    Export the caller with ``torch.onnx.export(..., custom_translation_table=FUSED_TRANSLATION_TABLE)``
    and then call :func:`fold_fused_weights` on the result.

    Args:
        hidden: [T, H] float32 token states.
        expert_ids: [T, k] int64 experts chosen per token (distinct within a token).
        expert_weights: [T, k] float32 non-negative weights (normalised and scaled).
        w1: [E, I, H] gate projections (nn.Linear layout).
        w3: [E, I, H] up projections.
        w2: [E, H, I] down projections.

    Returns:
        [T, H] ``sum_j expert_weights[t, j] * w2[e] @ (silu(w1[e] @ x_t) * (w3[e] @ x_t))``.
    """
    return fused_moe(hidden, expert_ids, expert_weights, w1, w3, w2)


def _static_dims(value: ir.Value, what: str) -> tuple[int, ...]:
    """The dimensions of ``value``, all of which must be known integers."""
    if value.shape is None or not all(isinstance(dim, int) for dim in value.shape):
        raise ValueError(f"fused MoE lowering needs a static shape for {what}, got {value.shape}")
    return tuple(value.shape)


# The exporter derives the dispatch signature of a translation from its annotations, so these use
# onnxscript's tensor types; the values passed in are the graph's ir.Value objects.
def _fused_moe_to_onnx(
    hidden: FLOAT,
    expert_ids: INT64,
    expert_weights: FLOAT,
    w1: FLOAT,
    w3: FLOAT,
    w2: FLOAT,
) -> FLOAT:
    """Translate ``portable_moe::fused_moe``: router construction, com.microsoft::MoE, scaling.

    Called by ``torch.onnx.export`` with the graph values of the op's operands, inside the
    exporter's graph builder, so the ``op.*`` calls below append nodes to the exported graph.

    Args:
        hidden: [T, H] token states.
        expert_ids: [T, k] int64 selected experts; k must be static.
        expert_weights: [T, k] their weights.
        w1: [E, I, H] gate projections; all three dimensions must be static.
        w3: [E, I, H] up projections.
        w2: [E, H, I] down projections.

    Returns:
        The [T, H] routed result.

    Raises:
        ValueError: when k or the weight shapes are not static.
    """
    num_experts, inter, width = _static_dims(w1, "w1 [E, I, H]")
    top_k = expert_ids.shape[1] if expert_ids.shape is not None else None
    if not isinstance(top_k, int):
        raise ValueError(f"fused MoE lowering needs a static k, got expert_ids shape {expert_ids.shape}")

    # fc1 [E, 2I, H] with gate and up rows alternating: stacking on a new axis after I and merging
    # it into I puts w1 row i at 2i and w3 row i at 2i + 1.
    stacked = op.Concat(op.Unsqueeze(w1, [2]), op.Unsqueeze(w3, [2]), axis=2)  # [E, I, 2, H]
    fc1 = op.Reshape(stacked, [num_experts, 2 * inter, width])

    # router_probs [T, E]: log-weights at the selected experts, the sentinel elsewhere.
    log_weights = op.Log(op.Max(expert_weights, op.Constant(value_float=MIN_ROUTING_WEIGHT)))
    # Python lists cannot go into a variadic input (the exporter cannot infer their dtype), so the
    # expert count is an explicit int64 constant.
    router_shape = op.Concat(op.Shape(hidden, start=0, end=1), op.Constant(value_ints=[num_experts]), axis=0)
    background = op.Expand(op.Constant(value_float=ROUTER_SENTINEL), router_shape)
    router_probs = op.ScatterElements(background, expert_ids, log_weights, axis=1)

    mixed = _MOE(hidden, router_probs, fc1, None, w2, k=top_k, **MOE_ATTRIBUTES)
    # The softmax turned the weights into fractions of their sum; scale back per token.
    return op.Mul(mixed, op.ReduceSum(expert_weights, [1], keepdims=1))


FUSED_TRANSLATION_TABLE = {torch.ops.portable_moe.fused_moe.default: _fused_moe_to_onnx}

# The name exporters/lowerings.py looks up in every lowering module.
routed_experts = routed_experts_fused


def _attribute_int(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.as_int()


def _fold_layout_ops(value: ir.Value | None, leaves: list[str]) -> np.ndarray | None:
    """Evaluate ``value`` if it is a constant reached only through Unsqueeze, Concat and Reshape.

    Those three ops are all the interleave of fc1 uses, so this small evaluator is enough to fold it
    whatever form the exporter's optimizer leaves the axes and shape operands in (constants,
    initializers). Anything else returns None and the graph is left alone.

    Args:
        value: the value to evaluate.
        leaves: receives the names of the floating-point initializers the result was computed from.

    Returns:
        The value as an array, or None when it is not such a constant.
    """
    if value is None:
        return None
    if value.is_initializer() and not value.is_graph_input() and value.const_value is not None:
        array = value.const_value.numpy()
        if np.issubdtype(array.dtype, np.floating):
            # Only weights name the result; integer leaves are axes and shapes.
            leaves.append(value.name or "")
        return array
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        attribute = node.attributes.get("value")
        return None if attribute is None else attribute.as_tensor().numpy()
    operands = [_fold_layout_ops(operand, leaves) for operand in node.inputs]
    if any(operand is None for operand in operands):
        return None
    if node.op_type == "Unsqueeze" and len(operands) == 2:
        data, axes = operands
        rank = data.ndim + axes.size
        return np.expand_dims(data, tuple(sorted(int(axis) % rank for axis in axes.reshape(-1))))
    if node.op_type == "Concat":
        return np.concatenate(operands, axis=_attribute_int(node, "axis", 0))
    if node.op_type == "Reshape" and len(operands) == 2 and _attribute_int(node, "allowzero", 0) == 0:
        data, shape = operands
        # With allowzero=0 a 0 in the target shape copies the input's dimension.
        target = [int(data.shape[i]) if dim == 0 else int(dim) for i, dim in enumerate(shape.reshape(-1))]
        return data.reshape(target)
    return None


def fold_fused_weights(model: ir.Model | torch.onnx.ONNXProgram) -> int:
    """Replace the in-graph interleave of every MoE node's fc1 by one precomputed initializer.

    The translation expresses fc1 as Unsqueeze/Concat/Reshape of w1 and w3 so that it is right for
    any source of the weights. When both are initializers, this computes the interleaved [E, 2I, H]
    tensor once, feeds it to the MoE node as an initializer named after w1 and w3 and drops what
    became unused (normally w1 and w3 themselves), so the saved model holds fc1 ready to use and no
    runtime has to build it. ``torch.onnx.export``'s optimizer folds this only for tiny tensors
    (8192 elements); ONNX Runtime would fold it again at every session creation.

    Args:
        model: the exported model, changed in place; an ``ONNXProgram`` is folded in its ``model``.

    Returns:
        The number of MoE nodes whose fc1 was folded (0 when there was nothing to do).
    """
    ir_model = model.model if isinstance(model, torch.onnx.ONNXProgram) else model
    graph = ir_model.graph
    folded = 0
    for node in list(graph):
        if node.domain != "com.microsoft" or node.op_type != "MoE" or len(node.inputs) < 3:
            continue
        fc1 = node.inputs[2]
        if fc1 is None or fc1.is_initializer():
            continue
        leaves: list[str] = []
        array = _fold_layout_ops(fc1, leaves)
        if array is None:
            continue
        name = "+".join(dict.fromkeys(leaves)) + ".interleaved"
        while name in graph.initializers:
            name += "_"
        constant = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(np.ascontiguousarray(array), name=name),
        )
        graph.register_initializer(constant)
        node.replace_input_with(2, constant)
        folded += 1
    if folded:
        onnx_ir.passes.common.RemoveUnusedNodesPass()(ir_model)
    return folded


# What the exporter reads (see exporters.lowerings).
CUSTOM_TRANSLATION_TABLE = FUSED_TRANSLATION_TABLE
after_export = fold_fused_weights
