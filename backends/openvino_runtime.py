"""``openvino``: Intel's OpenVINO runtime, reading the bundle's ONNX directly.

OpenVINO's ONNX frontend turns the graph into an OpenVINO model once (``Core.read_model``), and
``Core.compile_model`` builds it for one device. Dynamic input dimensions stay dynamic, so one
compiled model takes any batch and sequence length. The runtime is imported lazily: without the
``openvino`` package this backend stays listed as unavailable, with the command that installs it.

OpenVINO raises ``RuntimeError`` for everything, so its words cannot say why it refused a model
without reading them. When reading a model fails, :func:`unconverted_operators` asks its ONNX
frontend instead: a partial conversion leaves the operators it has no conversion rule for as
nodes outside OpenVINO's opsets, and those make the model *unsupported*
(:class:`~portable_moe.errors.UnsupportedError`, with OpenVINO's message quoted).
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from portable_moe.backend import (
    WEIGHT_FORMAT_KEYS,
    Backend,
    Capabilities,
    CompiledModel,
    ModelInput,
    Option,
    ProbeResult,
)
from portable_moe.compare import PrecisionMode, Tolerance
from portable_moe.errors import BackendError, UnsupportedError, UnsupportedReason
from portable_moe.tensors import NUMPY_NATIVE_DTYPES, outputs_not_carried

INSTALL_HINT = 'pip install "portable-moe[openvino]"'

# Initializers up to this many elements keep their values for shape inference (shape tensors are tiny).
_SMALL_TENSOR = 1024

# OpenVINO's names for the inference precision hint, by the names users type.
PRECISION_HINTS = ("f32", "f16", "bf16")

_NEAR_TIE_REASON = "bfloat16 rounds router scores by ~4e-3 relative and float16 by ~5e-4; 1e-2 covers both"
# The precision modes its compiled models report under the f16/bf16 hints (f32 is core's "exact"), with the
# tolerances their outputs are checked against, measured on the tiny bundle's golden inputs.
TOLERANCES: dict[str, PrecisionMode] = {
    "openvino-bf16": PrecisionMode(
        tolerances={
            "float32": Tolerance(
                atol=0.25,
                rtol=1e-2,
                min_routing_agreement=1.0,
                reason=(
                    "bfloat16 keeps 8 bits of mantissa (~4e-3 relative per operation): measured max abs error 0.118 on the "
                    "tiny bundle's logits (|logits| <= 3.9), needing atol 0.114 at rtol 1e-2; 0.25 leaves ~2x headroom. "
                    "Routing agreed on every golden token."
                ),
            ),
        },
        near_tie_margin=1e-2,
        near_tie_reason=_NEAR_TIE_REASON,
    ),
    "openvino-f16": PrecisionMode(
        tolerances={
            "float32": Tolerance(
                atol=5e-2,
                rtol=1e-2,
                min_routing_agreement=1.0,
                reason=(
                    "OpenVINO's f16 hint: measured max abs error 1.49e-2 on the tiny bundle's logits, needing atol 1.15e-2 "
                    "at rtol 1e-2; the float16 rows share atol 5e-2 (~4x headroom here). Routing agreed on every golden token."
                ),
            ),
        },
        near_tie_margin=1e-2,
        near_tie_reason=_NEAR_TIE_REASON,
    ),
}


def _import_openvino() -> Any:
    import openvino

    return openvino


def _device_names(core: Any) -> list[str]:
    """Each device with its full name, e.g. ``CPU (Intel(R) Xeon(R) Processor)``."""
    names = []
    for device in core.available_devices:
        try:
            names.append(f"{device} ({core.get_property(device, 'FULL_DEVICE_NAME')})")
        except Exception:  # a device plugin without FULL_DEVICE_NAME is still a device
            names.append(device)
    return names


def check_device(device: str, available_devices: list[str]) -> None:
    """Refuse a device OpenVINO would reject later with a less helpful message.

    Raises:
        BackendError: if ``device`` is not one of ``available_devices`` (or ``AUTO``).
    """
    if device != "AUTO" and device not in available_devices:
        raise BackendError(
            f"openvino has no device {device!r}; devices here: {', '.join(available_devices) or 'none'} (or AUTO)"
        )


def expand_broadcast_matmuls(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Make a MatMul's batch broadcasting explicit where OpenVINO's CPU plugin gets it wrong.

    OpenVINO's CPU plugin (seen in 2026.4.1) turns a MatMul with constant weights into its
    FullyConnected node. When the weights carry batch dimensions the activation must broadcast
    to (``[1, T, K] @ [E, K, N]``, as the dense MoE lowering does for all experts at once), the
    compiled model fails: at run time with "Can not clone with new dims" when T is dynamic, at
    compile time with "ranks are not equal" for a ``[T, K]`` activation. Expanding the activation
    to the weights' batch dimensions first computes the same values and compiles.

    Returns:
        The model (a rewritten copy when anything changed) and how many MatMuls were rewritten.
    """
    matmuls = [
        i for i, node in enumerate(model.graph.node) if node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
    ]
    if not matmuls:
        return model, 0
    shapes = _static_shapes(model)
    expand_to: dict[int, tuple[int, ...]] = {}
    for index in matmuls:
        activation, weights = model.graph.node[index].input
        batch = shapes.get(weights, ())[:-2]
        activation_shape = shapes.get(activation)
        # A 1-D activation is a vector, not a row of a batch: MatMul drops its axis from the
        # result, which expanding it to [*batch, 1, K] would keep. Unknown ranks are left alone too.
        if activation_shape is None or len(activation_shape) < 2:
            continue
        if batch and all(isinstance(dim, int) for dim in batch) and math.prod(batch) > 1:
            if activation_shape[:-2] != batch:
                expand_to[index] = batch
    if not expand_to:
        return model, 0
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(rewritten.graph.node):
        if index in expand_to:
            name = f"portable_moe_openvino_expand_{len(nodes)}"
            shape = np.array([*expand_to[index], 1, 1], dtype=np.int64)
            rewritten.graph.initializer.append(onnx.numpy_helper.from_array(shape, f"{name}_shape"))
            nodes.append(onnx.helper.make_node("Expand", [node.input[0], f"{name}_shape"], [name], name=name))
            node.input[0] = name
        nodes.append(node)
    rewritten.graph.ClearField("node")
    rewritten.graph.node.extend(nodes)
    return rewritten, len(expand_to)


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Every value's shape that ONNX shape inference knows (dims: int, symbolic name or None)."""
    # Inference needs the weights' shapes, not their values: a copy without large values stays
    # small (and under protobuf's 2 GB limit), keeping the small tensors shapes are computed from.
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    for name in ("node", "input", "output", "value_info"):
        getattr(light.graph, name).extend(getattr(model.graph, name))
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) <= _SMALL_TENSOR:
            light.graph.initializer.append(tensor)
        else:
            light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    inferred = onnx.shape_inference.infer_shapes(light)
    shapes: dict[str, tuple[int | str | None, ...]] = {
        tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer
    }
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor_type.shape.dim
            )
    return shapes


class OpenVinoCompiledModel(CompiledModel):
    """An OpenVINO ``CompiledModel`` and one reusable infer request behind the CompiledModel contract.

    Attributes:
        execution_devices: the devices OpenVINO actually runs on (for ``AUTO``, the one it chose).
        expanded_matmuls: how many MatMuls :func:`expand_broadcast_matmuls` rewrote.
        inference_precision: the precision OpenVINO reports it computes in (a device without
            bf16 or f16 units keeps f32 whatever the hint).
    """

    def __init__(self, backend: Backend, model: ModelInput, compiled: Any, node_count: int, expanded: int) -> None:
        super().__init__(backend, model)
        self.compiled = compiled
        # OpenVINO drops graph inputs no output depends on; feeding one raises "Port ... was not found".
        self._kept_inputs = {name for port in compiled.inputs for name in port.get_names()}
        self.expanded_matmuls = expanded
        self._request = compiled.create_infer_request()
        self._node_count = node_count
        self.execution_devices = [str(device) for device in compiled.get_property("EXECUTION_DEVICES")]
        self.inference_precision = _precision_name(compiled)
        # Conformance judges an f32 model by the exact row; a reduced hint that took effect gets its own row.
        self.precision = "exact" if self.inference_precision == "f32" else f"openvino-{self.inference_precision}"

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_outputs=False copies the outputs out of the request, which the next run overwrites.
        openvino = _import_openvino()
        kept: dict[str, Any] = {}
        for name, value in feeds.items():
            if name not in self._kept_inputs:
                continue
            if isinstance(value, np.ndarray) and value.dtype.name not in NUMPY_NATIVE_DTYPES:
                # infer() would take such an array's bytes for the port's type; a Tensor asks the binding first.
                try:
                    value = openvino.Tensor(value)
                except Exception as error:
                    raise UnsupportedError(
                        UnsupportedReason.DTYPE_NOT_CARRIED,
                        f"openvino's Python binding has no element type for input {name!r} of numpy dtype "
                        f"{value.dtype.name}; it answered: {' '.join(str(error).split())}",
                    ) from error
            kept[name] = value
        results = self._request.infer(kept, share_outputs=False)
        outputs = {spec.name: np.asarray(results[self.compiled.output(spec.name)]) for spec in self.outputs}
        not_carried = outputs_not_carried(self.outputs, outputs)
        if not_carried:
            raise UnsupportedError(
                UnsupportedReason.DTYPE_NOT_CARRIED,
                f"openvino's Python binding has no numpy type for output(s) {'; '.join(not_carried)}",
            )
        return outputs

    def placement(self) -> dict[str, int]:
        # Without HETERO, OpenVINO runs the whole graph on the one device it compiled for.
        return {f"openvino:{'+'.join(self.execution_devices)}": self._node_count}


def _opset_nodes(model: Any) -> Any:
    """Every operation of an OpenVINO model and of its bodies (If, Loop, TensorIterator)."""
    for operation in model.get_ordered_ops():
        yield operation
        for index in range(getattr(operation, "get_internal_subgraphs_size", lambda: 0)()):
            yield from _opset_nodes(operation.get_function(index))


def unconverted_operators(path: str) -> list[str]:
    """The operators of the ONNX file at ``path`` that OpenVINO's ONNX frontend has no conversion rule for.

    The frontend's partial conversion keeps each of them as a node outside OpenVINO's opsets
    (its type's version is not ``opsetN``): a framework node names the ONNX operator it stands
    for (``ai.onnx.preview.training:Adagrad``), other leftovers are named as OpenVINO names them
    (``util::SequenceInsert``).
    """
    from openvino.frontend import FrontEndManager

    # Every object stays referenced until the walk ends: the unconverted nodes point into the
    # frontend's input model, and reading them after it is freed crashes the process.
    manager = FrontEndManager()
    frontend = manager.load_by_framework("onnx")
    input_model = frontend.load(path)
    converted = frontend.convert_partially(input_model)
    names = set()
    for operation in _opset_nodes(converted):
        version = operation.get_type_info().version_id
        if not version.startswith("opset"):
            # A framework node carries the ONNX operator it stands for; other leftovers have their own names.
            attributes = operation.get_attributes()
            onnx_type, domain = attributes.get("ONNX_META_type"), attributes.get("ONNX_META_domain")
            if onnx_type:
                names.add(f"{domain}:{onnx_type}" if domain else str(onnx_type))
            else:
                names.add(f"{version}::{operation.get_type_name()}")
    del converted, input_model, frontend, manager  # in this order: nodes before what they point into
    return sorted(names)


@functools.cache
def frontend_refuses_type(elem_type: int) -> str:
    """OpenVINO's words when its ONNX frontend cannot load a tensor of ONNX type ``elem_type``, else "".

    Asked with a one-node model (``Identity`` of that type), so the answer is about the type alone.
    """
    from openvino.frontend import FrontEndManager

    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "type_probe",
        [value("x", elem_type, [1])],
        [value("y", elem_type, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    with tempfile.TemporaryDirectory(prefix="portable-moe-openvino-") as scratch:
        path = Path(scratch) / "probe.onnx"
        onnx.save_model(model, path)
        manager = FrontEndManager()
        frontend = manager.load_by_framework("onnx")
        try:
            frontend.load(str(path))
        except Exception as error:
            return " ".join(str(error).split())
    return ""


def _element_types(model: onnx.ModelProto) -> set[int]:
    """The ONNX element types of a model's inputs, outputs, initializers and Cast targets."""
    graph = model.graph
    types = {tensor.data_type for tensor in graph.initializer}
    for value in [*graph.input, *graph.output]:
        if value.type.WhichOneof("value") == "tensor_type":
            types.add(value.type.tensor_type.elem_type)
    for node in graph.node:
        types.update(attribute.i for attribute in node.attribute if node.op_type == "Cast" and attribute.name == "to")
    return types - {onnx.TensorProto.UNDEFINED}


def _read_model(core: Any, path: str, model: onnx.ModelProto) -> Any:
    """``core.read_model``, or UnsupportedError when OpenVINO's ONNX frontend says it cannot take the model.

    Two answers are asked for after a failure: an element type the frontend cannot load at all
    (:func:`frontend_refuses_type`), and operators it has no conversion rule for
    (:func:`unconverted_operators`).
    """
    try:
        return core.read_model(path)
    except Exception as error:
        words = " ".join(str(error).split())
        refused = {elem_type: frontend_refuses_type(elem_type) for elem_type in sorted(_element_types(model))}
        refused = {elem_type: answer for elem_type, answer in refused.items() if answer}
        if refused:
            names = ", ".join(onnx.TensorProto.DataType.Name(elem_type).lower() for elem_type in refused)
            raise UnsupportedError(
                UnsupportedReason.DTYPE_NOT_CARRIED,
                f"openvino's ONNX frontend cannot load a tensor of type {names}; it answered: {words}",
            ) from error
        try:
            unconverted = unconverted_operators(path)
        except Exception:  # the frontend cannot even load it: the original error says why
            unconverted = []
        if not unconverted:
            raise
        raise UnsupportedError(
            UnsupportedReason.NO_KERNEL,
            f"openvino's ONNX frontend has no conversion rule for {', '.join(unconverted)}; it answered: {words}",
        ) from error


def _precision_name(compiled: Any) -> str:
    """The precision the compiled model really computes in, ``f32``/``f16``/``bf16`` (OpenVINO's ``Type`` names).

    The runtime model (the graph the plugin executes) records each node's ``runtimePrecision``:
    the lowest float precision found there is what took effect. That is the plugin's own answer,
    where guessing from the CPU's OPTIMIZATION_CAPABILITIES is not: a Xeon with AVX-512 but no
    AVX512_BF16 omits BF16 there yet honours a bf16 hint. A device without a runtime model falls
    back to the compiled model's INFERENCE_PRECISION_HINT property.
    """
    try:
        used = {
            str(op.get_rt_info()["runtimePrecision"].astype(str))
            for op in compiled.get_runtime_model().get_ordered_ops()
            if "runtimePrecision" in op.get_rt_info()
        }
    except Exception:  # a plugin without a runtime model (or without the attribute) reports its hint below
        used = set()
    for reduced in ("bf16", "f16"):
        if reduced in used:
            return reduced
    if used:
        return "f32"
    try:
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception:  # a device without the property computes in the model's own precision
        return "f32"
    return value.get_type_name()  # "f32", "f16", "bf16"


class OpenVinoBackend(Backend):
    name = "openvino"
    vendor = "Intel OpenVINO (CPU, Intel GPU and NPU)"
    description = "OpenVINO runtime reading the bundle's ONNX"
    declared_options = {
        "device": Option("CPU", str, "device to compile for (CPU, GPU, NPU, AUTO; see 'portable-moe backends')"),
        "precision": Option("f32", str, "inference precision hint", choices=PRECISION_HINTS),
        "threads": Option(0, int, "inference threads (0: OpenVINO decides)", minimum=0),
    }
    expected_failures_file = Path(__file__).with_name("openvino_runtime_expected_failures.toml")

    def probe(self) -> ProbeResult:
        try:
            openvino = _import_openvino()
        except ImportError as error:
            return ProbeResult(False, f"openvino is not installed ({error}); run: {INSTALL_HINT}")
        version = openvino.__version__.split("-")[0]  # "2026.4.1-22982-<commit>-<branch>" -> "2026.4.1"
        core = openvino.Core()
        devices = list(core.available_devices)
        if not devices:
            return ProbeResult(False, f"openvino {version} found no device on this machine")
        return ProbeResult(
            True,
            f"openvino {version}; devices: {', '.join(_device_names(core))}",
            {"version": version, "devices": devices},
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            min_opset=7,
            max_opset=23,
            dtypes=frozenset({"float32", "float16", "int64", "int32", "bool"}),
            moe_lowerings=("dense", "sparse", "capacity"),
            domains=frozenset(),
            # Checked on the tiny preset with every format (scripts/benchmark_weights.py): it imports
            # Cast from float16/bfloat16 and DequantizeLinear with int4 codes and block_size.
            weight_formats=WEIGHT_FORMAT_KEYS,
            precision_modes=TOLERANCES,
            runtime_reports_unsupported=True,
        )

    def _compile(self, model: ModelInput, options: dict[str, Any]) -> CompiledModel:
        openvino = _import_openvino()
        core = openvino.Core()
        check_device(options["device"], list(core.available_devices))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": options["precision"]}
        if options["threads"]:
            config["INFERENCE_NUM_THREADS"] = options["threads"]
        proto, expanded = expand_broadcast_matmuls(model.proto)
        # From the bundle's file, OpenVINO finds external weight files beside it; an in-memory or
        # rewritten model is written out first. Compiled while the file exists: OpenVINO may map
        # weights from it rather than copy them.
        with tempfile.TemporaryDirectory(prefix="portable-moe-openvino-") as scratch:
            path = model.path
            if path is None or expanded:
                path = Path(scratch) / "model.onnx"
                onnx.save_model(
                    proto, path, save_as_external_data=True, location="weights.bin", size_threshold=_SMALL_TENSOR
                )
            compiled = core.compile_model(_read_model(core, str(path), proto), options["device"], config)
        return OpenVinoCompiledModel(self, model, compiled, len(proto.graph.node), expanded)
