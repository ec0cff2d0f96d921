"""Divergence bisection: a backend that perturbs one node is caught at exactly that node."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend
from portable_moe.conformance.bisection import bisect_divergence, expose_values
from portable_moe.conformance.model_check import check_bundle
from portable_moe.errors import ConformanceError
from portable_moe.registry import get_backend, register_backend, unregister_backend


def _first_sigmoid(proto: onnx.ModelProto) -> onnx.NodeProto:
    return next(node for node in proto.graph.node if node.op_type == "Sigmoid")


class SigmoidBugBackend(OnnxRuntimeCpuBackend):
    """An adapter with a bug in one kernel: the first Sigmoid's output comes out 1% too large."""

    name = "sigmoid-bug"

    def _compile(self, model, options):
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        sigmoid = _first_sigmoid(proto)
        original = sigmoid.output[0]
        sigmoid.output[0] = original + "_before_bug"
        scale = onnx.helper.make_tensor(original + "_bug_scale", onnx.TensorProto.FLOAT, [], [1.01])
        proto.graph.initializer.append(scale)
        position = list(proto.graph.node).index(sigmoid) + 1
        proto.graph.node.insert(
            position, onnx.helper.make_node("Mul", [sigmoid.output[0], scale.name], [original], name="bug")
        )
        # A new ModelInput: the caller's is shared with other backends and must stay unchanged.
        return super()._compile(dataclasses.replace(model, proto=proto, path=None), options)


@pytest.fixture
def sigmoid_bug():
    register_backend("sigmoid-bug", SigmoidBugBackend)
    yield get_backend("sigmoid-bug")
    unregister_backend("sigmoid-bug")


def test_bisect_names_exactly_the_perturbed_node(tiny_bundle, sigmoid_bug):
    proto = tiny_bundle.load_onnx()
    feeds = tiny_bundle.golden_sets()[0][0]
    result = bisect_divergence(proto, sigmoid_bug, feeds)
    assert result.error == ""
    assert result.oracle == "reference"
    found = result.first_divergence
    assert found is not None
    assert found.node == _first_sigmoid(proto).name and found.op_type == "Sigmoid"
    # Its inputs agree (the bug is inside the node), its output is off by ~1%.
    assert all(comparison.passed for comparison in found.inputs)
    assert not found.outputs[0].passed and 1e-3 < found.outputs[0].max_abs_error < 1e-2
    assert f"first divergence at node '{found.node}' (Sigmoid)" in result.summary()
    # On a backend whose outputs conform, the same finding is where the largest deviation starts.
    conforming = result.summary(outputs_conform=True)
    assert f"outputs conform; largest deviation starts at node '{found.node}' (Sigmoid)" in conforming
    assert "divergence" not in conforming


def test_check_bundle_bisects_failing_backends_only_when_asked(tiny_bundle, sigmoid_bug):
    cpu, bug = check_bundle(tiny_bundle, ["cpu", "sigmoid-bug"], bisect="failed")
    assert cpu.passed and cpu.bisection is None
    assert bug.status == "failed"
    assert bug.bisection.first_divergence.op_type == "Sigmoid"
    assert bug.to_dict()["bisection"]["first_divergence"]["node"] == _first_sigmoid(tiny_bundle.load_onnx()).name


def test_a_correct_backend_has_no_divergence_even_with_static_shapes(tiny_bundle):
    feeds = tiny_bundle.golden_sets()[0][0]
    proto = tiny_bundle.load_onnx()
    for name, options in (("cpu", None), ("npu-sim", {"precision": "must_keep_origin_dtype"})):
        result = bisect_divergence(proto, get_backend(name), feeds, options)
        assert result.error == "" and result.first_divergence is None, result.summary()
        assert result.compared_values > 100
        assert "within tolerance" in result.summary()


def test_expose_values_fixes_input_shapes_and_keeps_float_values_only(tiny_bundle):
    proto = tiny_bundle.load_onnx()
    copy, exposed = expose_values(proto, None, {"input_ids": (2, 16)})
    assert len(proto.graph.output) == 3  # the original is left alone
    assert len(copy.graph.output) == 3 + len(exposed)
    types = {value.name: value.type.tensor_type for value in copy.graph.output}
    assert all(types[name].elem_type == onnx.TensorProto.FLOAT for name in exposed)
    assert [d.dim_value for d in copy.graph.input[0].type.tensor_type.shape.dim] == [2, 16]
    only, named = expose_values(proto, [exposed[0], "no_such_value"])
    assert named == [exposed[0]]


def test_expose_values_reports_a_shape_inference_failure(tiny_bundle, monkeypatch):
    # onnx's inference (non-strict) rarely raises; when it does, e.g. on a corrupt graph, the message says what failed.
    def broken(model, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] corrupt graph")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    with pytest.raises(ConformanceError, match="shape inference failed, cannot expose intermediate values: .*corrupt"):
        expose_values(tiny_bundle.load_onnx(), None, {"input_ids": (2, 16)})


def test_bisect_records_a_backend_that_cannot_compile(tiny_bundle):
    result = bisect_divergence(
        tiny_bundle.load_onnx(), get_backend("npu-sim"), tiny_bundle.golden_sets()[0][0], {"fail_on_compile": True}
    )
    assert result.first_divergence is None
    assert "simulated device error while compiling" in result.error
    assert result.summary().startswith("bisect: ")
    assert np.isfinite(result.worst_ratio)
