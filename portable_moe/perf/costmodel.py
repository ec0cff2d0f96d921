"""A roofline cost model: how long a graph would take on a chip, estimated from its shapes.

For each node, the work is counted from the shapes ONNX shape inference gives at a concrete input
size: floating-point operations (a multiply-add is 2) and bytes moved (every input read and every
output written once; views such as Reshape are free). A node takes
``max(flops / peak FLOP/s, bytes / memory bandwidth)`` and the graph the sum over its nodes.

This is an estimate, not a measurement: it assumes peak throughput on every node, no overlap
between nodes, no caches, no launch overhead and no communication. It is good for comparing
chips, shapes and MoE lowerings with each other, not for predicting a wall-clock time.

Chips come from ``portable_moe/perf/data/chips.json`` (dense FP16 figures, each with its sources); the
machine's own CPU is measured once per process (a float32 matmul and an array copy).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import onnx

from portable_moe.config import ModelConfig
from portable_moe.errors import ConfigError

CPU_CHIP_KEY = "cpu"
# Ops that only relabel a tensor's shape (or compute shapes): no arithmetic, no data movement.
_FREE_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Constant", "Dropout"}
# Ops that read only the elements they output from their first input.
_GATHER_OPS = {"Gather", "GatherElements", "GatherND"}
# Rough floating-point operations per output element for ops that are more than one operation.
_FLOPS_PER_ELEMENT = {"Softmax": 5, "LogSoftmax": 5, "Erf": 8, "Gelu": 8, "LayerNormalization": 8}


@dataclass(frozen=True)
class Chip:
    """One chip's peak figures.

    Attributes:
        key: short name ("ascend-910b", "cpu").
        name: display name.
        vendor: who makes it.
        peak_tflops: dense peak in ``compute_dtype``, in TFLOP/s.
        memory_gb: memory size in GB (informational).
        bandwidth_tbs: memory bandwidth in TB/s.
        compute_dtype: the dtype the peak is for; float tensors are counted at its size.
        sources: where the figures come from.
        notes: anything a reader should know (ranges, which value was chosen).
    """

    key: str
    name: str
    vendor: str
    peak_tflops: float
    memory_gb: float
    bandwidth_tbs: float
    compute_dtype: str = "float16"
    sources: tuple[str, ...] = ()
    notes: str = ""

    @property
    def float_bytes(self) -> int:
        return np.dtype(self.compute_dtype).itemsize


@dataclass(frozen=True)
class NodeCost:
    """One node's work and its roofline time on a chip."""

    name: str
    op_type: str
    flops: float
    bytes: float
    seconds: float
    bound: str  # "compute", "memory" or "free"


@dataclass
class Estimate:
    """A graph's roofline estimate on one chip (labelled as an estimate wherever it is shown)."""

    chip: Chip
    seconds: float
    flops: float
    bytes: float
    nodes: list[NodeCost] = field(default_factory=list)
    unsized_nodes: int = 0  # nodes whose shapes inference could not give (counted as free)
    label: str = "roofline estimate (not a measurement)"

    def top(self, count: int = 5) -> list[NodeCost]:
        """The ``count`` slowest nodes."""
        return sorted(self.nodes, key=lambda node: node.seconds, reverse=True)[:count]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "chip": self.chip.key,
            "chip_name": self.chip.name,
            "seconds": self.seconds,
            "flops": self.flops,
            "bytes": self.bytes,
            "unsized_nodes": self.unsized_nodes,
            "compute_bound_nodes": sum(node.bound == "compute" for node in self.nodes),
            "memory_bound_nodes": sum(node.bound == "memory" for node in self.nodes),
        }


@functools.lru_cache(maxsize=1)
def _chip_table() -> dict[str, Chip]:
    data = json.loads(resources.files("portable_moe.perf").joinpath("data", "chips.json").read_text())
    return {
        entry["key"]: Chip(
            key=entry["key"],
            name=entry["name"],
            vendor=entry["vendor"],
            peak_tflops=float(entry["fp16_tflops"]),
            memory_gb=float(entry["memory_gb"]),
            bandwidth_tbs=float(entry["bandwidth_tbs"]),
            compute_dtype="float16",
            sources=tuple(entry["sources"]),
            notes=entry.get("notes", ""),
        )
        for entry in data["chips"]
    }


def _best_seconds(work: Any, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


@functools.lru_cache(maxsize=1)
def measure_host_cpu() -> Chip:
    """Measure this machine's CPU once per process: float32 matmul FLOP/s and copy bandwidth.

    Takes a fraction of a second. The figures are best-of-5 and float32 (numpy's float16 matmul
    is not a hardware path on most CPUs), so the CPU's estimate counts float tensors at 4 bytes.
    """
    size = 512
    rng = np.random.default_rng(0)
    left = rng.standard_normal((size, size), dtype=np.float32)
    right = rng.standard_normal((size, size), dtype=np.float32)
    left @ right  # warm up threads and caches
    flops = 2 * size**3 / _best_seconds(lambda: left @ right, 5)
    source = np.ones(8 << 20, dtype=np.float32)  # 32 MiB: larger than the caches
    target = np.empty_like(source)
    np.copyto(target, source)
    bandwidth = 2 * source.nbytes / _best_seconds(lambda: np.copyto(target, source), 5)  # read + write
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (AttributeError, ValueError, OSError):
        memory_gb = 0.0
    processor = platform.processor() or platform.machine()
    return Chip(
        key=CPU_CHIP_KEY,
        name=f"this machine's CPU ({processor}, {os.cpu_count()} logical cores)",
        vendor="measured",
        peak_tflops=flops / 1e12,
        memory_gb=memory_gb,
        bandwidth_tbs=bandwidth / 1e12,
        compute_dtype="float32",
        sources=(
            "measured at run time: numpy float32 512x512 matmul (best of 5) for FLOP/s, "
            "a 32 MiB array copy (best of 5, read + write) for bandwidth",
        ),
        notes="a busy machine measures lower; measured once per process",
    )


def chip_keys() -> list[str]:
    """Every chip key: those in chips.json and "cpu" (this machine, measured)."""
    return [*_chip_table(), CPU_CHIP_KEY]


def get_chip(key: str) -> Chip:
    """The chip called ``key`` ("cpu" measures this machine).

    Raises:
        ConfigError: if there is no such chip (the message lists the keys).
    """
    if key == CPU_CHIP_KEY:
        return measure_host_cpu()
    table = _chip_table()
    if key not in table:
        raise ConfigError(f"unknown chip {key!r}; chips: {', '.join(chip_keys())}")
    return table[key]


def _static_inferred(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> onnx.ModelProto:
    """Shape-infer ``model`` with its inputs fixed to ``input_shapes`` (symbolic dims elsewhere cleared)."""
    if input_shapes:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        known = {value.name for value in fixed.graph.input}
        unknown = sorted(set(input_shapes) - known)
        if unknown:
            raise ConfigError(f"no model input(s) {', '.join(unknown)}; inputs: {', '.join(sorted(known))}")
        for value in fixed.graph.input:
            if value.name in input_shapes:
                dims = value.type.tensor_type.shape.dim
                shape = list(input_shapes[value.name])
                if len(shape) != len(dims):
                    raise ConfigError(f"input {value.name!r} has rank {len(dims)}, got shape {shape}")
                for dim, size in zip(dims, shape):
                    dim.Clear()
                    dim.dim_value = int(size)
        for value in [*fixed.graph.value_info, *fixed.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_param"):
                    dim.Clear()
        model = fixed
    return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    known: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for init in model.graph.initializer:
        known[init.name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)), tuple(init.dims))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor_type.elem_type or not tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if None in dims:
            continue
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            continue
        known.setdefault(value.name, (dtype, tuple(dims)))  # type: ignore[arg-type]
    return known


def _einsum_flops(equation: str, shapes: Sequence[tuple[int, ...]], output_elements: int) -> float:
    operands = equation.replace(" ", "").split("->")[0].split(",")
    if "..." in equation or len(operands) != len(shapes):
        return 2.0 * max([output_elements, *(math.prod(shape) for shape in shapes)])
    sizes: dict[str, int] = {}
    for letters, shape in zip(operands, shapes):
        sizes.update(zip(letters, shape))
    if len(operands) == 1:
        return float(math.prod(shapes[0]))
    # Every combination of all indices is one multiply-add.
    return 2.0 * math.prod(sizes.values())


def _node_flops(
    node: onnx.NodeProto, inputs: Sequence[tuple[int, ...] | None], outputs: Sequence[tuple[int, ...]]
) -> float:
    out_elements = math.prod(outputs[0]) if outputs else 0
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and inputs[0] is not None:
        return 2.0 * out_elements * inputs[0][-1]
    if node.op_type == "MatMulNBits":
        return 2.0 * out_elements * int(attributes["K"])
    if node.op_type == "Gemm" and inputs[0] is not None:
        inner = inputs[0][0] if attributes.get("transA", 0) else inputs[0][-1]
        return 2.0 * out_elements * inner + (out_elements if len(node.input) > 2 and node.input[2] else 0)
    if node.op_type == "Einsum" and all(shape is not None for shape in inputs):
        equation = attributes["equation"]
        equation = equation.decode() if isinstance(equation, bytes) else equation
        return _einsum_flops(equation, inputs, out_elements)  # type: ignore[arg-type]
    if node.op_type == "Conv" and inputs[1] is not None:
        return 2.0 * out_elements * math.prod(inputs[1][1:])
    if node.op_type.startswith("Reduce") or node.op_type in ("ArgMax", "ArgMin", "TopK", "CumSum"):
        return float(math.prod(inputs[0])) if inputs[0] is not None else float(out_elements)
    return float(_FLOPS_PER_ELEMENT.get(node.op_type, 1) * out_elements)


@dataclass(frozen=True)
class NodeWork:
    """One node's work, independent of any chip.

    Attributes:
        flops: floating-point operations (a multiply-add is 2).
        float_elements: floating-point elements read and written (priced at a chip's float size).
        other_bytes: bytes of the other (integer, bool) tensors read and written.
    """

    name: str
    op_type: str
    flops: float
    float_elements: float
    other_bytes: float

    def bytes(self, float_bytes: int) -> float:
        return self.float_elements * float_bytes + self.other_bytes


def node_work(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[list[NodeWork], int]:
    """Count each node's floating-point operations and the elements it moves.

    Args:
        model: an ONNX model.
        input_shapes: a concrete shape for each dynamic input (omit for a model with static shapes).

    Returns:
        ``(one NodeWork per node, number of nodes whose shapes inference could not give)``. Those
        unknown nodes are counted as free.

    Raises:
        ConfigError: for an unknown input name or a shape of the wrong rank.
    """
    inferred = _static_inferred(model, input_shapes)
    shapes = _shapes(inferred)
    stored = _stored_weight_bytes(inferred)
    work = []
    unsized = 0
    for index, node in enumerate(inferred.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        outputs = [output for output in node.output if output]
        if outputs and all(output in stored for output in outputs):
            work.append(NodeWork(name, node.op_type, 0.0, 0.0, 0.0))  # weight preparation: once, at load
            continue
        if node.op_type in _FREE_OPS or not all(output in shapes for output in outputs):
            unsized += node.op_type not in _FREE_OPS
            work.append(NodeWork(name, node.op_type, 0.0, 0.0, 0.0))
            continue
        touched = [(output, math.prod(shapes[output][1])) for output in outputs]
        other_bytes = 0.0
        for position, input_name in enumerate(node.input):
            if input_name in stored:  # a stored weight, read in its stored format by a weight-only kernel
                other_bytes += stored[input_name]
            elif input_name in shapes:
                gathered = position == 0 and node.op_type in _GATHER_OPS  # reads only the gathered rows
                touched.append((input_name, math.prod(shapes[outputs[0]][1] if gathered else shapes[input_name][1])))
        float_elements = 0.0
        for tensor, elements in touched:
            dtype = shapes[tensor][0]
            if np.issubdtype(dtype, np.floating):
                float_elements += elements
            else:
                other_bytes += elements * dtype.itemsize
        inputs = [shapes[input_name][1] if input_name in shapes else None for input_name in node.input]
        flops = _node_flops(node, inputs, [shapes[output][1] for output in outputs])
        work.append(NodeWork(name, node.op_type, flops, float_elements, other_bytes))
    return work, unsized


# Nodes that only turn stored weights into the float weights an op multiplies by.
_WEIGHT_PREPARATION_OPS = {"DequantizeLinear", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}


def _stored_weight_bytes(model: onnx.ModelProto) -> dict[str, float]:
    """Values computed from initializers by weight preparation alone (dequantize, cast, relayout),
    with the bytes of the stored tensors behind them (int4 at half a byte per element).

    Weight-only kernels (and runtimes that fuse ``DequantizeLinear`` into the matrix product) read
    the stored codes and scales, not a float copy: that is what a weight format saves on a
    memory-bound decode, and what the estimate counts.
    """
    sizes: dict[str, float] = {}
    for tensor in model.graph.initializer:
        elements = math.prod(tensor.dims)
        bits = 4 if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else None
        if bits is None:
            bits = 8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        sizes[tensor.name] = elements * bits / 8
    stored: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_PREPARATION_OPS or not node.input:
            continue
        sources = [name for name in node.input if name]
        if not all(name in sizes or name in stored for name in sources) or node.input[0] not in {**sizes, **stored}:
            continue
        if node.input[0] in sizes and node.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze"):
            continue  # relayout of a plain initializer: not a stored format, leave it to the normal count
        total = sum(stored.get(name, sizes.get(name, 0.0)) for name in sources)
        for output in node.output:
            stored[output] = total
    return stored


def estimate_from_work(work: Sequence[NodeWork], chip: Chip, unsized: int = 0) -> Estimate:
    """Price counted work on ``chip``: per node ``max(flops / peak, bytes / bandwidth)``, summed."""
    peak = chip.peak_tflops * 1e12
    bandwidth = chip.bandwidth_tbs * 1e12
    nodes = []
    for item in work:
        moved = item.bytes(chip.float_bytes)
        compute, memory = item.flops / peak, moved / bandwidth
        bound = "free" if not (item.flops or moved) else "compute" if compute >= memory else "memory"
        nodes.append(NodeCost(item.name, item.op_type, item.flops, moved, max(compute, memory), bound))
    return Estimate(
        chip=chip,
        seconds=sum(node.seconds for node in nodes),
        flops=sum(node.flops for node in nodes),
        bytes=sum(node.bytes for node in nodes),
        nodes=nodes,
        unsized_nodes=unsized,
    )


def estimate_model(
    model: onnx.ModelProto, chip: Chip | str, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> Estimate:
    """The roofline estimate of ``model`` on ``chip`` at ``input_shapes``.

    Float tensors are counted at the size of the chip's compute dtype (float16 for the
    accelerators, float32 for the measured CPU).

    Raises:
        ConfigError: for an unknown chip or input name.
    """
    chip = get_chip(chip) if isinstance(chip, str) else chip
    work, unsized = node_work(model, input_shapes)
    return estimate_from_work(work, chip, unsized)


def estimate_bundle(
    model: Any, batch: int, seq: int, chips: Iterable[str] | None = None, input_name: str = "input_ids"
) -> list[Estimate]:
    """Estimate a bundle (or ONNX model) at input shape ``[batch, seq]`` on several chips.

    Args:
        model: a Bundle, a bundle directory, an .onnx path or a ModelProto.
        batch / seq: the input size.
        chips: chip keys; default every chip in chips.json plus this machine's CPU (measured).
        input_name: the token input's name.

    Returns:
        One :class:`Estimate` per chip, in the order given.

    Raises:
        ConfigError: for an unknown chip, a model without ``input_name``, or a size below 1.
    """
    from portable_moe.backend import as_model_input

    if batch < 1 or seq < 1:
        raise ConfigError(f"batch and seq must be at least 1, got batch={batch} seq={seq}")
    proto = model if isinstance(model, onnx.ModelProto) else as_model_input(model).proto
    keys = list(chips) if chips is not None else chip_keys()
    resolved = [get_chip(key) for key in keys]  # unknown names fail before any work
    work, unsized = node_work(proto, {input_name: (batch, seq)})  # counted once, priced per chip
    return [estimate_from_work(work, chip, unsized) for chip in resolved]


def config_work(config: ModelConfig, batch: int, seq: int, moe_lowering: str = "sparse") -> list[NodeWork]:
    """Count a model's work from its config alone, without building or exporting it.

    For presets too large to build (``deepseek-v3``). The layers are those of the reference model
    (:mod:`exporters.reference_model`): per layer RMSNorms, q/k/v/o projections, causal attention
    scores, and a dense SwiGLU MLP or an MoE block (router, shared experts, routed experts). Each
    matrix product is counted as the exported graph counts it (2 FLOPs per multiply-add; its
    inputs, weights and output moved once); element-wise work (norms, activations, softmax) is
    counted per element, as the graph-based count does for single nodes, but not node by node.

    Args:
        config: the model's sizes.
        batch / seq: the input size.
        moe_lowering: "sparse" (each token runs its top-k experts; the weights read are those of
            the experts at least one token picks, expected under uniform routing) or "dense"
            (every expert on every token, as the dense lowering computes).

    Raises:
        ConfigError: for a size below 1 or another lowering.
    """
    if batch < 1 or seq < 1:
        raise ConfigError(f"batch and seq must be at least 1, got batch={batch} seq={seq}")
    if moe_lowering not in ("sparse", "dense"):
        raise ConfigError(f"the config-based count knows the sparse and dense lowerings, not {moe_lowering!r}")
    tokens, hidden = batch * seq, config.hidden_size
    heads, head_dim = config.num_attention_heads, config.head_dim
    work: list[NodeWork] = [NodeWork("embedding", "Gather", 0.0, 2.0 * tokens * hidden, 8.0 * tokens)]

    def matmul(name: str, rows: float, inner: float, columns: float, weights: float | None = None) -> NodeWork:
        weight_elements = inner * columns if weights is None else weights
        return NodeWork(
            name, "MatMul", 2.0 * rows * inner * columns, rows * inner + weight_elements + rows * columns, 0
        )

    def elementwise(name: str, op_type: str, elements: float, flops_per_element: float = 1.0) -> NodeWork:
        return NodeWork(name, op_type, flops_per_element * elements, 2.0 * elements, 0.0)

    def swiglu(name: str, rows: float, width: float, experts: float = 1.0, weight_experts: float | None = None) -> list:
        stored = experts if weight_experts is None else weight_experts
        return [
            matmul(f"{name}.gate", rows, hidden, width * experts, stored * hidden * width),
            matmul(f"{name}.up", rows, hidden, width * experts, stored * hidden * width),
            elementwise(f"{name}.silu_mul", "Mul", rows * width * experts, 5.0),
            matmul(f"{name}.down", rows * experts, width, hidden, stored * width * hidden),
        ]

    for layer in range(config.num_hidden_layers):
        prefix = f"layer{layer}"
        work += [elementwise(f"{prefix}.input_norm", "RMSNorm", tokens * hidden, 4.0)]
        work += [matmul(f"{prefix}.{name}_proj", tokens, hidden, hidden) for name in ("q", "k", "v")]
        work += [
            elementwise(f"{prefix}.rotary", "Mul", 2.0 * tokens * hidden, 3.0),
            matmul(f"{prefix}.scores", batch * heads * seq, head_dim, seq, batch * heads * seq * head_dim),
            elementwise(f"{prefix}.softmax", "Softmax", batch * heads * seq * seq, 5.0),
            matmul(f"{prefix}.attend", batch * heads * seq, seq, head_dim, batch * heads * seq * head_dim),
            matmul(f"{prefix}.o_proj", tokens, hidden, hidden),
            elementwise(f"{prefix}.post_attention_norm", "RMSNorm", tokens * hidden, 4.0),
        ]
        if layer not in config.moe_layer_indices:
            work += swiglu(f"{prefix}.mlp", tokens, config.intermediate_size)
            continue
        experts, top_k, width = config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size
        work += [
            matmul(f"{prefix}.router", tokens, hidden, experts),
            elementwise(f"{prefix}.router_scores", "Sigmoid", tokens * experts, 4.0),
            NodeWork(f"{prefix}.router_topk", "TopK", float(tokens * experts), tokens * experts, 16.0 * tokens * top_k),
        ]
        if config.n_shared_experts:
            work += swiglu(f"{prefix}.shared", tokens, width * config.n_shared_experts)
        if moe_lowering == "dense":
            # Every expert on every token: [T, H] x [E, H, I] per projection, then the gate zeroes most.
            work += swiglu(f"{prefix}.experts", tokens, width, experts, experts)
        else:
            touched = experts * (1.0 - (1.0 - top_k / experts) ** tokens)  # experts some token picks
            work += swiglu(f"{prefix}.experts", tokens * top_k, width, 1.0, touched)
        work += [elementwise(f"{prefix}.combine", "Mul", tokens * top_k * hidden, 2.0)]
    work += [
        elementwise("final_norm", "RMSNorm", tokens * hidden, 4.0),
        matmul("lm_head", tokens, hidden, config.vocab_size),
    ]
    return work


def estimate_config(
    config: ModelConfig, batch: int, seq: int, chips: Iterable[str] | None = None, moe_lowering: str = "sparse"
) -> list[Estimate]:
    """Estimate a preset at input ``[batch, seq]`` on several chips from its config (see :func:`config_work`).

    Raises:
        ConfigError: for an unknown chip, a size below 1 or an unknown lowering.
    """
    keys = list(chips) if chips is not None else chip_keys()
    resolved = [get_chip(key) for key in keys]
    work = config_work(config, batch, seq, moe_lowering)
    return [estimate_from_work(work, chip) for chip in resolved]


__all__ = [
    "CPU_CHIP_KEY",
    "Chip",
    "Estimate",
    "NodeCost",
    "NodeWork",
    "chip_keys",
    "config_work",
    "estimate_bundle",
    "estimate_config",
    "estimate_from_work",
    "estimate_model",
    "get_chip",
    "measure_host_cpu",
    "node_work",
]
