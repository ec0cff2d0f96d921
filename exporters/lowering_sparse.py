"""Sparse lowering of DeepSeek-style routed experts for ONNX export.

`routed_experts_sparse` computes the routed-expert part of a DeepSeek MoE block
in plain torch ops chosen so that ``torch.onnx.export(..., dynamo=True)`` with a
dynamic token dimension yields a graph of standard ONNX ops in which ONNX Runtime
(CPU) does ``tokens x top_k`` expert work instead of ``tokens x num_experts``.

How it works ("sort and split"):

1. The ``T * k`` (token, slot) pairs are sorted by expert id (one ``TopK``), so
   the rows routed to each expert become one contiguous block.
2. The hidden rows are gathered once in that order and cut into ``E`` blocks by
   a single ``Split`` whose sizes are the per-expert counts (data dependent,
   which is fine for ``Split``; blocks of size 0 are allowed).
3. A static Python loop over the ``E`` experts multiplies each block by that
   expert's fused gate/up weight (one ``Gemm`` per expert); the SwiGLU
   activation then runs once over all rows; a second ``Split`` and loop apply
   each expert's down projection (one more ``Gemm`` per expert). Blocks of
   experts that received no tokens have zero rows, so their ``Gemm`` does no
   work and never touches that expert's weights.
4. The results, concatenated in sorted order, are put back in (token, slot)
   order by a ``Gather`` with the inverse permutation, scaled by the routing
   weights and summed over the k slots (``ReduceSum``).

Why this design (measured with ONNX Runtime 1.32 on a shared 2-core CPU, H=1024,
I=512, k=6, ``intra_op_num_threads`` 2 unless noted; see ``scratch/bench_sparse.py``):

* Cost per decoded token is nearly flat in ``E``: every node in the per-expert
  loops runs for every expert on every call, empty or not, so only the two
  ``Gemm`` nodes are per expert. With :func:`after_export` applied, decoding
  one token at ``E=128`` took 1.1-1.2x the ``E=8`` time (about 1.5 ms to
  1.7 ms at best); without it about 1.5x, because the exporter emits about four
  scalar nodes per expert for the data-dependent split sizes, which
  :func:`after_export` (run by the project exporter) removes.
* Prefill (``T=512``) matches the dense lowering at ``E=8`` and is about 3x
  and 10x faster at ``E=32`` and ``E=128``.
* Per-slot weight gather (``w1[expert_ids]`` then batched matmul) is also flat
  in ``E`` but copies ``T * k`` expert matrices on every call: one decoded
  token cost about 2-3x this lowering (1 thread), eight tokens 3-12x, and prefill
  would materialise about 18 GB (``T=512``).
* A per-expert ``nonzero`` / ``index_select`` / ``index_add`` loop exports too,
  but runs about 15 nodes per expert on every call, so decode grows with ``E``
  (at ``E=128`` 1.4-1.7x this lowering's decode time, 1 thread).
* A data-dependent loop over only the experts that were hit does not pass
  ``torch.export`` (``GuardOnDataDependentSymNode``), and an ONNX ``Loop`` over
  experts would need a runtime ``Gather`` (a copy) of each expert's weights.

Requirements for the sparsity to pay off at runtime:

* ``w1``, ``w3`` and ``w2`` must be constants of the exported module (parameters
  or buffers), so they become ONNX initializers. ONNX Runtime then constant
  folds each expert's slice into its own initializer and pre-packs it for
  ``Gemm``. If the weights were graph inputs instead, every call would copy all
  ``E`` expert matrices.
* Keep ONNX Runtime graph optimisations at ``ORT_ENABLE_BASIC`` or higher (the
  default is ``ORT_ENABLE_ALL``) so that folding happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["after_export", "feed_split_sizes", "routed_experts", "routed_experts_sparse"]


def routed_experts_sparse(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Computes the weighted sum of the selected SwiGLU experts for every token.

    For every token ``t`` the result is
    ``sum_j expert_weights[t, j] * w2[e] @ (silu(w1[e] @ x_t) * (w3[e] @ x_t))``
    with ``e = expert_ids[t, j]``. Only selected experts are evaluated, so the
    cost is proportional to ``T * k`` expert MLPs. The function is written to
    export with ``torch.onnx.export(..., dynamo=True)`` with a dynamic ``T``.

    Args:
        hidden: Token activations, shape ``[T, H]``.
        expert_ids: Selected routed experts per token, shape ``[T, k]``, integer
            values in ``[0, E)``. Slots are summed, so a repeated id simply
            contributes twice.
        expert_weights: Routing weights per (token, slot), shape ``[T, k]``,
            already normalised and scaled.
        w1: Gate projections, shape ``[E, I, H]`` (``nn.Linear`` layout: out, in).
        w3: Up projections, shape ``[E, I, H]``.
        w2: Down projections, shape ``[E, H, I]``.

    Returns:
        The routed-expert output, shape ``[T, H]``, dtype of ``hidden``.

    Raises:
        ValueError: If the static parts of the shapes are inconsistent.
    """
    _check_static_shapes(hidden, expert_ids, expert_weights, w1, w3, w2)
    num_tokens = hidden.shape[0]  # symbolic when T is a dynamic export dim
    top_k = expert_ids.shape[1]
    num_experts = w1.shape[0]

    # Cast only when needed, so the usual int64 ids / same-dtype weights add no
    # Cast node to the graph (index_select wants int64 indices).
    if expert_ids.dtype != torch.int64:
        expert_ids = expert_ids.to(torch.int64)
    if expert_weights.dtype != hidden.dtype:
        expert_weights = expert_weights.to(hidden.dtype)

    # Group the T*k (token, slot) pairs by expert. Stability is not needed: the
    # order inside one expert's block does not change the result, and
    # aten.sort.stable has no ONNX lowering in torch 2.13 while the plain sort
    # lowers to a single TopK. A sort, not argsort: torchlib has no function for
    # argsort, which only torch.onnx's decompositions would turn into this sort.
    flat_ids = expert_ids.reshape(-1)
    order = torch.sort(flat_ids).indices

    # Token index of every slot. Built from arange rather than `order // top_k`
    # because integer floor division lowers to a float Div/Sign/Abs/Floor chain.
    slot_token = torch.arange(num_tokens, device=hidden.device).unsqueeze(1).expand(num_tokens, top_k).reshape(-1)
    sorted_token = slot_token.index_select(0, order)
    sorted_hidden = hidden.index_select(0, sorted_token)

    # Rows per expert, counted with a one-hot compare rather than scatter_add:
    # O(T*k*E) tiny integer ops, but free of scatter reductions, which runtimes
    # may parallelise without atomics (ONNX Runtime's ScatterND does). The matches are cast to int64
    # before the sum: a sum of booleans would need torch.onnx's type promotion pass to add that cast.
    expert_range = torch.arange(num_experts, device=hidden.device)
    counts = (flat_ids.unsqueeze(1) == expert_range).to(torch.int64).sum(dim=0)
    # The Python list of (unbacked, data-dependent) sizes makes torch.split
    # export as one ONNX Split with a runtime `split` input.
    sizes = counts.tolist()
    # State that the blocks tile the sorted rows. torch 2.13 exports the same
    # graph without it; it is kept for the symbolic shape engine (split needs
    # the sizes to sum to the dimension) and adds no node to the graph.
    torch._check(sum(sizes) == sorted_hidden.shape[0])
    blocks = torch.split(sorted_hidden, sizes)

    # Gate and up projections side by side, [E, 2I, H]: one Gemm per expert
    # instead of two. With constant weights, ONNX Runtime folds this Concat
    # once at session start.
    inter = w1.shape[1]
    w13 = torch.cat([w1, w3], dim=1)
    # Per-expert weights via one split per tensor rather than w[e]: both become
    # constants after ONNX Runtime's constant folding, but folding E separate
    # Gather(w, e) nodes materialises the whole [E, ...] initializer once per
    # node (quadratic in E: 141 s of session start-up at E=128 versus about
    # 4 s with the split), while one Split per tensor is folded once.
    w13_parts, w2_parts = (torch.split(w, 1, dim=0) for w in (w13, w2))

    # Static loops: E is a Python int, so they unroll into one Gemm per expert
    # each, against constant weights. Every node in these loops runs for every
    # expert on every call, even with an empty block (then it does no work but
    # still costs dispatch), so only the Gemms are per expert; the activation
    # runs once over all rows between them.
    gate_up = torch.cat([_linear(blocks[e], w13_parts[e][0]) for e in range(num_experts)])
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    act_blocks = torch.split(act, sizes)
    sorted_out = torch.cat([_linear(act_blocks[e], w2_parts[e][0]) for e in range(num_experts)])

    # Undo the sort with a Gather by the inverse permutation, then weight and
    # sum the k slots of each token. Not index_add: that lowers to
    # ScatterND(reduction="add") with every token repeated k times, and ONNX
    # Runtime's CPU kernel (1.32) applies such updates from several threads
    # without atomics, losing some of them. Gather + ReduceSum is race free and
    # also deterministic (fixed summation order).
    inverse = torch.sort(order).indices
    slot_out = sorted_out.index_select(0, inverse).reshape(num_tokens, top_k, sorted_out.shape[-1])
    return (slot_out * expert_weights.unsqueeze(-1)).sum(dim=1)


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Multiplies a block of rows by one expert's weight (``nn.Linear`` layout).

    ``F.linear`` on purpose: it lowers to ``Gemm(transB=1)`` against a constant
    weight, which ONNX Runtime pre-packs and which has a fast single-row path
    (decode); a matmul against an explicitly transposed or gathered weight
    measured several times slower for one row.

    Args:
        x: Rows routed to this expert, shape ``[n, in]`` (``n`` may be 0).
        weight: The expert's weight, shape ``[out, in]``.

    Returns:
        Shape ``[n, out]``.
    """
    return F.linear(x, weight)


def _check_static_shapes(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> None:
    """Validates ranks and the static dimensions of the inputs.

    The token dimension is deliberately not compared: during export it is
    symbolic, and comparing it would add guards (or specialise it).

    Raises:
        ValueError: If a rank or a static dimension does not match.
    """
    if hidden.dim() != 2 or expert_ids.dim() != 2 or expert_weights.dim() != 2:
        raise ValueError(
            "hidden, expert_ids and expert_weights must be 2-D, got "
            f"{tuple(hidden.shape)}, {tuple(expert_ids.shape)}, {tuple(expert_weights.shape)}"
        )
    if w1.dim() != 3 or w3.shape != w1.shape or w2.dim() != 3:
        raise ValueError(
            f"expected w1, w3 [E, I, H] and w2 [E, H, I], got {tuple(w1.shape)}, {tuple(w3.shape)}, {tuple(w2.shape)}"
        )
    num_experts, inter, hid = w1.shape
    if tuple(w2.shape) != (num_experts, hid, inter) or hidden.shape[1] != hid:
        raise ValueError(
            f"inconsistent sizes: hidden {tuple(hidden.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}"
        )
    if expert_weights.shape[1] != expert_ids.shape[1]:
        raise ValueError(
            f"expert_ids {tuple(expert_ids.shape)} and expert_weights "
            f"{tuple(expert_weights.shape)} must have the same number of slots"
        )


# Ops that can appear between the per-expert count vector and each exported
# split size: select (Slice + Squeeze, or Gather), item() (Reshape + Gather +
# Cast) and the size-to-tensor step (Reshape or Unsqueeze).
_ELEMENT_OPS = frozenset({"Cast", "Gather", "Identity", "Reshape", "Slice", "Squeeze", "Unsqueeze"})


def feed_split_sizes(model: Any) -> int:
    """Feeds each data-dependent ``Split`` its size vector directly.

    ``torch.split`` with data-dependent sizes exports every size as its own
    scalar chain (select, ``item()``, reshape: about four nodes after ONNX Runtime's
    optimisations) and concatenates them into the ``split`` input. Those chains
    run for every expert on every call, which is a measurable share of decode
    time at large ``E``. This rewrite finds ``Split`` nodes whose sizes are a
    ``Concat`` of such chains that all read one static 1-D int64 tensor, checks
    by evaluating the chains on a probe vector that chain ``i`` yields element
    ``i``, and then feeds that tensor to the ``Split`` (the chains become dead
    and are removed). Anything that does not match exactly is left alone.

    Args:
        model: The exported model (``torch.onnx.ONNXProgram`` or ``onnx_ir.Model``),
            changed in place.

    Returns:
        The number of ``Split`` nodes rewired (0 when there was nothing to do).
    """
    import onnx_ir
    import onnx_ir.passes.common

    ir_model = model.model if isinstance(model, torch.onnx.ONNXProgram) else model
    rewired = 0
    for node in list(ir_model.graph):
        if node.op_type != "Split" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        sizes = node.inputs[1]
        concat = sizes.producer() if sizes is not None else None
        if concat is None or concat.op_type != "Concat" or concat.attributes.get_int("axis", 0) != 0:
            continue
        source = _common_element_source(concat.inputs)
        if source is not None:
            node.replace_input_with(1, source)
            rewired += 1
    if rewired:
        onnx_ir.passes.common.RemoveUnusedNodesPass()(ir_model)
    return rewired


def _common_element_source(parts: Sequence[Any]) -> Any | None:
    """Returns the 1-D int64 tensor whose element ``i`` each ``parts[i]`` is, or None.

    Args:
        parts: ``onnx_ir.Value`` inputs of a ``Concat``.
    """
    import onnx_ir

    traced = [_trace_element_chain(part) for part in parts if part is not None]
    if not traced or len(traced) != len(parts):
        return None
    source = traced[0][0]
    if any(root is not source for root, _ in traced) or source.dtype != onnx_ir.DataType.INT64:
        return None
    shape = source.shape
    if shape is None or len(shape) != 1 or shape[0] != len(parts):
        return None
    # Distinct values that cannot be confused with small constant indices.
    probe = np.arange(len(parts), dtype=np.int64) + 1_000_003
    for index, (_, chain) in enumerate(traced):
        try:
            value = probe
            for node in chain:
                value = _evaluate_element_op(node, value)
        except (ValueError, IndexError, TypeError):
            return None
        if value is None or value.shape != (1,) or int(value[0]) != probe[index]:
            return None
    return source


def _trace_element_chain(value: Any) -> tuple[Any, list[Any]]:
    """Walks back from ``value`` through element ops with constant parameters.

    Returns:
        The first value not produced by such an op, and the ops from it to ``value``.
    """
    chain = []
    while True:
        node = value.producer()
        if node is None or node.op_type not in _ELEMENT_OPS or node.domain not in ("", "ai.onnx"):
            break
        if not node.inputs or any(param is None or param.const_value is None for param in node.inputs[1:]):
            break
        chain.append(node)
        value = node.inputs[0]
    return value, chain[::-1]


def _evaluate_element_op(node: Any, value: np.ndarray) -> np.ndarray | None:
    """Applies one element op to a numpy value; None for anything not modelled."""
    params = [param.const_value.numpy() for param in node.inputs[1:]]
    op_type = node.op_type
    if op_type == "Identity":
        return value
    if op_type == "Cast":
        return value if node.attributes.get_int("to", 0) == 7 else None  # 7: INT64
    if op_type == "Reshape":
        target = [int(d) for d in params[0]]
        if node.attributes.get_int("allowzero", 0) == 0:
            target = [value.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return value.reshape(target)
    if op_type == "Squeeze":
        axes = tuple(int(a) for a in params[0]) if params else None
        return np.squeeze(value, axis=axes)
    if op_type == "Unsqueeze":
        rank = value.ndim + len(params[0])
        for axis in sorted(int(a) % rank for a in params[0]):
            value = np.expand_dims(value, axis)
        return value
    if op_type == "Gather":
        return np.take(value, params[0], axis=node.attributes.get_int("axis", 0))
    if op_type == "Slice":
        starts, ends = params[0], params[1]
        axes = params[2] if len(params) > 2 else range(len(starts))
        steps = params[3] if len(params) > 3 else [1] * len(starts)
        index = [slice(None)] * value.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[int(axis)] = slice(int(start), int(end), int(step))
        return value[tuple(index)]
    return None


# What the project's exporter reads (see exporters/lowerings.py): the lowering
# itself and the graph rewrite it runs on the exported program before saving.
routed_experts = routed_experts_sparse
after_export = feed_split_sizes
