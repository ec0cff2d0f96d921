"""Graph partitioning: which nodes run on the simulated device, which fall back to the host CPU.

Nodes the operator table accepts are grouped into device partitions: connected groups of device
nodes, split where joining two groups would need a round trip through the host (fusing them
would make the partition graph cyclic, which no runtime can schedule). Every tensor crossing
between host and device is a transfer, sized from shape inference at the gear's static shapes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from backends.npu_sim.gears import referenced_names
from backends.npu_sim.optable import OpTable

DEVICE = "npu-sim device"
HOST = "host CPU"
FOLDED = "folded at compile time"

ValueTypes = Mapping[str, tuple[str | None, tuple[int | None, ...] | None]]


@dataclass(frozen=True)
class NodePlacement:
    """Where one node runs and, for the host, why."""

    name: str
    op_type: str
    on_device: bool
    reason: str = ""


@dataclass(frozen=True)
class Partition:
    """One group of device nodes compiled and launched together."""

    index: int
    nodes: tuple[str, ...]
    op_types: dict[str, int]


@dataclass(frozen=True)
class Transfer:
    """One tensor copied between host and device on every run."""

    tensor: str
    direction: str  # "host->device" or "device->host"
    dtype: str | None
    shape: tuple[int | None, ...] | None
    bytes: int | None  # None when shape inference could not size it

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "direction": self.direction,
            "dtype": self.dtype,
            "shape": list(self.shape) if self.shape is not None else None,
            "bytes": self.bytes,
        }


@dataclass
class GraphPlan:
    """The partitioning of one gear's static graph."""

    placements: list[NodePlacement]
    partitions: list[Partition]
    transfers: list[Transfer]
    folded: list[NodePlacement] = field(default_factory=list)

    @property
    def device_nodes(self) -> int:
        return sum(placement.on_device for placement in self.placements)

    @property
    def host_nodes(self) -> list[NodePlacement]:
        return [placement for placement in self.placements if not placement.on_device]

    def transfer_bytes(self) -> int:
        return sum(transfer.bytes or 0 for transfer in self.transfers)


def tensor_bytes(types: ValueTypes, name: str, float_itemsize: int | None = None) -> int | None:
    """Bytes of a typed tensor, or None if its dtype or shape is unknown.

    Args:
        float_itemsize: count floating-point elements at this size (e.g. 2 for float16 storage).
    """
    dtype, shape = types.get(name, (None, None))
    if dtype is None or shape is None or None in shape:
        return None
    itemsize = np.dtype(dtype).itemsize
    if float_itemsize is not None and np.issubdtype(np.dtype(dtype), np.floating):
        itemsize = float_itemsize
    return math.prod(shape) * itemsize  # type: ignore[arg-type]


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def place_nodes(model: onnx.ModelProto, types: ValueTypes, table: OpTable) -> list[NodePlacement]:
    """Decide, node by node, device or host, with the host reason.

    Args:
        model: a static, shape-inferred model.
        types: its value types (see :func:`backends.npu_sim.gears.value_types`).
        table: the operator table.
    """
    opset = ai_onnx_opset(model)
    constants = {init.name for init in model.graph.initializer} - {value.name for value in model.graph.input}
    placements = []
    for node in model.graph.node:
        reason = table.check_node(node, opset, [types.get(name, (None, None))[0] for name in node.input])
        if reason is None and all(name in constants for name in node.input if name):
            reason = f"all inputs are constants: {table.rule_reason('all_constant_inputs')}"
        if reason is None:
            if any(name and tensor_bytes(types, name) is None for name in node.output):
                reason = f"an output has no static shape at this gear: {table.rule_reason('static_shapes')}"
        placements.append(NodePlacement(node.name, node.op_type, reason is None, reason or ""))
    return placements


def _producers(model: onnx.ModelProto) -> dict[str, int]:
    return {name: index for index, node in enumerate(model.graph.node) for name in node.output if name}


def find_partitions(model: onnx.ModelProto, placements: Sequence[NodePlacement]) -> list[Partition]:
    """Group device nodes into partitions (maximal, acyclic once fused).

    Each node gets a level: the most host nodes on any path reaching it. Levels never decrease
    along an edge, and pass through a host node raises them, so grouping connected device nodes of
    equal level can never put a host round trip inside one partition.
    """
    producers = _producers(model)
    nodes = model.graph.node
    level = [0] * len(nodes)
    parent = list(range(len(nodes)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for index, node in enumerate(nodes):
        predecessors = {producers[name] for name in referenced_names(node) if name in producers}
        for predecessor in predecessors:
            level[index] = max(level[index], level[predecessor] + (0 if placements[predecessor].on_device else 1))
        if not placements[index].on_device:
            continue
        for predecessor in predecessors:
            if placements[predecessor].on_device and level[predecessor] == level[index]:
                parent[root(predecessor)] = root(index)
    groups: dict[int, list[int]] = {}
    for index, placement in enumerate(placements):
        if placement.on_device:
            groups.setdefault(root(index), []).append(index)
    ordered = sorted(groups.values(), key=lambda members: members[0])
    return [
        Partition(
            number,
            tuple(placements[i].name for i in members),
            dict(Counter(placements[i].op_type for i in members).most_common()),
        )
        for number, members in enumerate(ordered)
    ]


def find_transfers(model: onnx.ModelProto, placements: Sequence[NodePlacement], types: ValueTypes) -> list[Transfer]:
    """Every tensor that crosses between host and device on a run (weights stay resident: not counted).

    Graph inputs start on the host and graph outputs end there. A tensor is counted once per
    direction however many nodes on the other side read it.
    """
    constants = {init.name for init in model.graph.initializer} - {value.name for value in model.graph.input}
    producers = _producers(model)
    consumers: dict[str, set[bool]] = {}
    for index, node in enumerate(model.graph.node):
        for name in referenced_names(node):
            consumers.setdefault(name, set()).add(placements[index].on_device)
    for value in model.graph.output:
        consumers.setdefault(value.name, set()).add(False)
    transfers = []
    for name, sides in consumers.items():
        if name in constants:
            continue
        produced_on_device = name in producers and placements[producers[name]].on_device
        dtype, shape = types.get(name, (None, None))
        if not produced_on_device and True in sides:
            transfers.append(Transfer(name, "host->device", dtype, shape, tensor_bytes(types, name)))
        if produced_on_device and False in sides:
            transfers.append(Transfer(name, "device->host", dtype, shape, tensor_bytes(types, name)))
    return transfers


def plan_graph(model: onnx.ModelProto, types: ValueTypes, table: OpTable) -> GraphPlan:
    """Place, partition and count transfers for one static, shape-inferred model."""
    placements = place_nodes(model, types, table)
    return GraphPlan(placements, find_partitions(model, placements), find_transfers(model, placements, types))


def device_memory(
    model: onnx.ModelProto, placements: Sequence[NodePlacement], types: ValueTypes, float16_tensors: set[str]
) -> tuple[int, int]:
    """Estimate device memory: ``(weight bytes, peak activation bytes)``.

    Weights are the initializers device nodes read. Activations are the tensors living on the
    device (produced there, or copied in), each alive from its creation to its last device reader;
    the peak of their sum over the node order is the estimate (no allocator overhead or
    workspace). Tensors in ``float16_tensors`` count at 2 bytes per element.
    """
    constants = {init.name for init in model.graph.initializer} - {value.name for value in model.graph.input}
    nodes = model.graph.node

    def size(name: str) -> int:
        return tensor_bytes(types, name, 2 if name in float16_tensors else None) or 0

    device_reads: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        if placements[index].on_device:
            for name in referenced_names(node):
                device_reads.setdefault(name, []).append(index)
    weights = sum(size(name) for name in device_reads if name in constants)
    born: dict[str, int] = {}
    for index, node in enumerate(nodes):
        if placements[index].on_device:
            for name in node.output:
                if name:
                    born[name] = index
    for name, readers in device_reads.items():
        if name not in constants and name not in born:
            born[name] = min(readers)  # copied in just before its first device reader
    last = {name: max(device_reads.get(name, [born[name]])) for name in born}
    peak = live = 0
    events: dict[int, int] = {}
    for name, start in born.items():
        events[start] = events.get(start, 0) + size(name)
        events[last[name] + 1] = events.get(last[name] + 1, 0) - size(name)
    for index in sorted(events):
        live += events[index]
        peak = max(peak, live)
    return weights, peak
