"""Divergence bisection: find the first graph node whose output leaves tolerance on a backend.

A backend that fails conformance only says *that* the final outputs differ. Bisection exposes the
graph's intermediate values as extra graph outputs (on a copy of the model), runs that copy on the
backend under test and on an oracle (``reference``, onnx's numpy evaluator, or ``cpu`` when the
reference cannot run the model, e.g. for ``com.microsoft`` operators), and walks the nodes in
topological order: the first node whose output is outside the backend's tolerance while its inputs
are within it is where the backend computes something different.

The copy has its input dimensions fixed to the feeds' shapes before shape inference, so every
intermediate gets concrete dimensions and backends that need static shapes (npu-sim's gears) take
it through the public ``compile`` like any other model. It carries no bundle, so no lowering check
applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from portable_moe.backend import Backend
from portable_moe.compare import OutputComparison, compare_values, tolerance_for
from portable_moe.errors import ConformanceError, PortableMoEError
from portable_moe.registry import as_backend

# Element types whose values bisection compares; integer values (indices, shapes) are left out, their
# effect shows in the float values computed from them.
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
# The default oracles, tried in order: onnx's numpy evaluator (the oracle for operator semantics), then
# ONNX Runtime's CPU provider for what the evaluator cannot run (com.microsoft operators). Every function
# that runs an oracle takes ``oracles`` (Backend objects or registry names) instead.
ORACLES: tuple[str, ...] = ("reference", "cpu")


def _fix_input_shapes(graph: onnx.GraphProto, shapes: Mapping[str, tuple[int, ...]]) -> None:
    for value in graph.input:
        if value.name not in shapes or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shapes[value.name]):
            continue  # a rank mismatch is the feed check's to report, with its own message
        for dim, size in zip(dims, shapes[value.name]):
            dim.Clear()
            dim.dim_value = int(size)


def _with_shape(value: onnx.ValueInfoProto, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, list(shape))


def expose_values(
    proto: onnx.ModelProto,
    names: Iterable[str] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    value_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``proto`` with intermediate values added as graph outputs.

    Args:
        proto: the model (left unchanged).
        names: the values to expose; None exposes every float-typed node output of the main graph.
        input_shapes: input name -> concrete shape, fixed in the copy before shape inference so that
            the exposed values get concrete shapes (static-shape backends need them).
        value_shapes: value name -> concrete shape, e.g. as observed on another backend; given
            where shape inference leaves a dimension unknown (a Range's length, say).

    Returns:
        ``(the copy, the names actually exposed)``: values whose type shape inference cannot tell
        are skipped, as are values that are graph outputs already.

    Raises:
        ConformanceError: if shape inference fails on the model.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    if input_shapes:
        _fix_input_shapes(copy.graph, input_shapes)
        # Exporters record value_info with symbolic dimensions; inference keeps those, so drop them to
        # let the fixed input shapes propagate.
        del copy.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, data_prop=True)
    except Exception as error:  # onnx raises several types (InferenceError, ValidationError, RuntimeError)
        raise ConformanceError(f"shape inference failed, cannot expose intermediate values: {error}") from error
    types = {value.name: value for value in inferred.graph.value_info}
    existing = {value.name for value in copy.graph.output}
    wanted = set(names) if names is not None else None
    exposed: list[str] = []
    for node in copy.graph.node:
        for output in node.output:
            if not output or output in existing or (wanted is not None and output not in wanted):
                continue
            value = types.get(output)
            if value is None or value.type.tensor_type.elem_type not in _FLOAT_TYPES:
                continue
            if value_shapes and output in value_shapes:
                value = _with_shape(value, value_shapes[output])
            copy.graph.output.append(value)
            existing.add(output)
            exposed.append(output)
    # The copy keeps the inferred shapes of the original outputs as well, so none is left symbolic.
    inferred_outputs = {value.name: value for value in inferred.graph.output}
    for index, value in enumerate(copy.graph.output):
        if value.name in inferred_outputs and input_shapes:
            copy.graph.output[index].CopyFrom(inferred_outputs[value.name])
    return copy, exposed


def run_exposed(
    backend: Backend,
    proto: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    names: Iterable[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Run ``proto`` with intermediate values exposed on ``backend``.

    Returns:
        ``(every output by name, the names of the exposed intermediates)``.

    Raises:
        PortableMoEError: whatever compiling or running on the backend raises.
    """
    shapes = {name: tuple(np.asarray(value).shape) for name, value in feeds.items()}
    exposed_proto, exposed = expose_values(proto, names, shapes)
    compiled = backend.compile(exposed_proto, options)
    return compiled.run(feeds), exposed


@dataclass
class NodeDivergence:
    """The first node whose output leaves tolerance, with its inputs' and outputs' error figures."""

    node: str
    op_type: str
    inputs: list[OutputComparison]
    outputs: list[OutputComparison]
    exact_inputs: list[str] = field(default_factory=list)
    uncompared_inputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "inputs": [c.to_dict() for c in self.inputs],
            "exact_inputs": self.exact_inputs,
            "uncompared_inputs": self.uncompared_inputs,
            "outputs": [c.to_dict() for c in self.outputs],
        }


@dataclass
class BisectResult:
    """Where a backend first diverges from the oracle, or why that could not be told."""

    backend: str
    oracle: str
    compared_values: int
    first_divergence: NodeDivergence | None = None
    worst_node: str = ""
    worst_ratio: float = 0.0  # largest (max abs error / allowed error) over the compared values
    error: str = ""

    def summary(self, outputs_conform: bool = False) -> str:
        """One line for the terminal table.

        Args:
            outputs_conform: the backend's final outputs passed. Then a node outside the per-value
                tolerance is where the largest deviation starts, not a divergence: reduced-precision
                backends leave it inside the graph and still conform.
        """
        if self.error:
            return f"bisect: {self.error}"
        if self.first_divergence is None:
            return (
                f"bisect vs {self.oracle}: all {self.compared_values} intermediates within tolerance "
                f"(closest to the limit: {self.worst_node}, {self.worst_ratio:.2g}x of allowed)"
            )
        found = self.first_divergence
        worst = max(found.outputs, key=lambda c: c.max_abs_error)
        inputs = max((c.max_abs_error for c in found.inputs), default=0.0)
        uncompared = (
            f"; uncompared integer inputs: {', '.join(found.uncompared_inputs)}" if found.uncompared_inputs else ""
        )
        where = f"node {found.node!r} ({found.op_type}): output abs error {worst.max_abs_error:.3g}, "
        if outputs_conform:
            return (
                f"bisect vs {self.oracle}: outputs conform; largest deviation starts at {where}"
                f"inputs' max abs error {inputs:.3g}{uncompared} (intermediates may exceed the output tolerance)"
            )
        return f"bisect vs {self.oracle}: first divergence at {where}inputs' max abs error {inputs:.3g}{uncompared}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "oracle": self.oracle,
            "compared_values": self.compared_values,
            "first_divergence": self.first_divergence.to_dict() if self.first_divergence else None,
            "worst_node": self.worst_node,
            "worst_ratio": self.worst_ratio,
            "error": self.error,
        }


def _oracle_outputs(
    proto: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    names: list[str] | None,
    oracles: Sequence[Backend | str] = ORACLES,
) -> tuple[str, dict[str, np.ndarray]]:
    """Run the exposed model on the first of ``oracles`` that can run it."""
    failures = []
    for oracle in oracles:
        try:
            backend = as_backend(oracle)
            outputs, _ = run_exposed(backend, proto, feeds, names)
            return backend.name, outputs
        except PortableMoEError as error:
            failures.append(f"{getattr(oracle, 'name', oracle)}: {error}")
    raise ConformanceError("no oracle could run the model with its intermediates exposed: " + "; ".join(failures))


def bisect_divergence(
    proto: onnx.ModelProto,
    backend: Backend,
    feeds: Mapping[str, np.ndarray],
    options: Mapping[str, Any] | None = None,
    precision: str | None = None,
    oracles: Sequence[Backend | str] = ORACLES,
) -> BisectResult:
    """Find the first node (in topological order) whose output on ``backend`` leaves tolerance.

    Args:
        proto: the model, as the backend would compile it.
        backend: the backend under test.
        feeds: one input set.
        options: the backend's compile options.
        precision: the precision mode whose tolerances apply; None takes the compiled model's.
        oracles: the backends (or registry names) whose values are taken as right, tried in order
            until one runs the model.

    Returns:
        The result; a failure to compile or run either side is recorded in ``error``, not raised.
    """
    try:
        # The oracle runs first: the shapes it observes make every exposed value concrete for the
        # backend under test, which static-shape backends need.
        oracle, expected = _oracle_outputs(proto, feeds, None, oracles)
        shapes = {name: tuple(np.asarray(value).shape) for name, value in feeds.items()}
        observed = {name: value.shape for name, value in expected.items()}
        exposed_proto, _ = expose_values(proto, list(expected), shapes, observed)
        compiled = backend.compile(exposed_proto, options)
        actual = compiled.run(feeds)
    except PortableMoEError as error:
        return BisectResult(backend.name, "", 0, error=str(error))
    precision = precision or compiled.precision
    produced = {output for node in proto.graph.node for output in node.output}
    comparisons: dict[str, OutputComparison] = {}
    worst_node, worst_ratio = "", 0.0
    for node in proto.graph.node:  # ONNX requires nodes in topological order
        outputs = []
        for name in node.output:
            if name not in expected or name not in actual or not np.issubdtype(expected[name].dtype, np.floating):
                continue
            tolerance = tolerance_for(expected[name].dtype.name, precision, backend.capabilities.precision_modes)
            comparison = compare_values(name, expected[name], np.asarray(actual[name]), tolerance)
            comparisons[name] = comparison
            outputs.append(comparison)
            ratio = _error_ratio(expected[name], np.asarray(actual[name]), tolerance.atol, tolerance.rtol)
            if ratio > worst_ratio:
                worst_node, worst_ratio = node.name or name, ratio
        if any(not comparison.passed for comparison in outputs):
            inputs = [comparisons[name] for name in node.input if name in comparisons]
            exact = [name for name in node.input if name and name not in produced]
            # Integer inputs (indices, routing selections) are not compared: name them, they may be the cause.
            uncompared = [name for name in node.input if name in produced and name not in comparisons]
            divergence = NodeDivergence(node.name or node.output[0], node.op_type, inputs, outputs, exact, uncompared)
            return BisectResult(backend.name, oracle, len(comparisons), divergence, worst_node, worst_ratio)
    return BisectResult(backend.name, oracle, len(comparisons), None, worst_node, worst_ratio)


def _error_ratio(expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> float:
    """The largest abs error as a multiple of what the tolerance allows there (finite elements only)."""
    expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
    finite = np.isfinite(expected64) & np.isfinite(actual64)
    if not finite.any():
        return 0.0
    allowed = atol + rtol * np.abs(expected64[finite])
    return float(np.max(np.abs(actual64[finite] - expected64[finite]) / allowed))
