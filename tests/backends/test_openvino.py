"""The ``openvino`` backend: availability, options, dynamic shapes and conformance on the tiny preset.

Tests that compile need the ``openvino`` package (in the dev extra) and skip with the probe's
reason without it; the availability decisions are tested either way.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest

from backends import openvino_runtime
from backends.openvino_runtime import OpenVinoBackend, check_device, expand_broadcast_matmuls
from portable_moe.backend import as_model_input
from portable_moe.compare import routing_agreement
from portable_moe.conformance.model_check import check_backend
from portable_moe.errors import BackendError, UnsupportedError, UnsupportedReason
from portable_moe.registry import get_backend

PROBE = OpenVinoBackend().probe()
needs_openvino = pytest.mark.skipif(not PROBE.available, reason=f"openvino unavailable: {PROBE.reason}")


# -- availability and options (no openvino needed) --


def test_probe_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    probe = OpenVinoBackend().probe()
    assert not probe.available
    assert probe.reason.startswith("openvino is not installed (")
    assert probe.reason.endswith('run: pip install "portable-moe[openvino]"')


def test_probe_without_devices_is_unavailable(monkeypatch):
    core = types.SimpleNamespace(available_devices=[])
    fake = types.SimpleNamespace(__version__="2026.4.1-22982-abc", Core=lambda: core)
    monkeypatch.setattr(openvino_runtime, "_import_openvino", lambda: fake)
    probe = OpenVinoBackend().probe()
    assert not probe.available
    assert probe.reason == "openvino 2026.4.1 found no device on this machine"


def test_registered_with_its_capabilities():
    backend = get_backend("openvino")
    assert isinstance(backend, OpenVinoBackend)
    assert backend.capabilities.moe_lowerings == ("dense", "sparse", "capacity")
    assert backend.capabilities.domains == frozenset()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"precision": "int8"}, r"openvino option precision must be one of f32, f16, bf16, got 'int8'"),
        ({"threads": -1}, r"openvino option threads must be an integer >= 0, got -1"),
        ({"threads": True}, r"openvino option threads must be an integer >= 0, got True"),
    ],
)
def test_bad_options_are_refused(override, message):
    with pytest.raises(BackendError, match=message):
        OpenVinoBackend().check_options(override)


def test_unknown_device_is_refused_with_the_devices_there_are():
    with pytest.raises(BackendError, match=r"openvino has no device 'GPU.7'; devices here: CPU \(or AUTO\)"):
        check_device("GPU.7", ["CPU"])
    check_device("AUTO", ["CPU"])


class _FakeOp:
    def __init__(self, precision: str | None) -> None:
        self._info = (
            {} if precision is None else {"runtimePrecision": types.SimpleNamespace(astype=lambda _: precision)}
        )

    def get_rt_info(self) -> dict:
        return self._info


class _FakeCompiled:
    """What _precision_name reads of an OpenVINO CompiledModel: the runtime model and the hint property."""

    def __init__(self, node_precisions: list | None, hint: str = "f32") -> None:
        self._nodes, self._hint = node_precisions, hint

    def get_runtime_model(self):
        if self._nodes is None:
            raise RuntimeError("this plugin has no runtime model")
        return types.SimpleNamespace(get_ordered_ops=lambda: [_FakeOp(p) for p in self._nodes])

    def get_property(self, name):
        return types.SimpleNamespace(get_type_name=lambda: self._hint)


@pytest.mark.parametrize(
    ("nodes", "hint", "expected"),
    [
        (["i64", "f32", "bf16", None], "f32", "bf16"),  # the nodes decide, whatever the hint says
        (["f32", "f16", "i32"], "bf16", "f16"),
        (["f32", "i32", None], "bf16", "f32"),  # a bf16 hint that did not take effect
        (None, "bf16", "bf16"),  # no runtime model: the compiled model's own property
    ],
)
def test_precision_is_what_the_compiled_model_runs_in(nodes, hint, expected):
    assert openvino_runtime._precision_name(_FakeCompiled(nodes, hint)) == expected


def test_model_with_com_microsoft_ops_is_refused_before_openvino_sees_it():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        fused (float[2, 4] x) => (float[2, 4] y) { y = com.microsoft.Gelu(x) }
        """
    )
    with pytest.raises(BackendError, match=r"cannot run operators of domain\(s\) com.microsoft"):
        get_backend("openvino").check_supported(as_model_input(model))


# -- the MatMul rewrite that works around OpenVINO's CPU plugin (checked with ONNX Runtime) --

BATCHED_WEIGHTS = np.random.default_rng(0).standard_normal((8, 16, 4)).astype(np.float32)


def broadcast_matmul_model(activation_shape: list) -> onnx.ModelProto:
    """``x @ w`` with constant weights [8, 16, 4] that the activation must broadcast to (as the dense lowering does)."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "broadcast_matmul",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, activation_shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, "tokens", 4])],
        [onnx.numpy_helper.from_array(BATCHED_WEIGHTS, "w")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("activation_shape", [[1, "tokens", 16], ["tokens", 16]])
def test_broadcast_matmul_is_expanded_without_changing_values(activation_shape):
    import onnxruntime

    model = broadcast_matmul_model(activation_shape)
    rewritten, count = expand_broadcast_matmuls(model)
    assert count == 1
    assert [node.op_type for node in rewritten.graph.node] == ["Expand", "MatMul"]
    assert [node.op_type for node in model.graph.node] == ["MatMul"], "the caller's model must stay as it was"
    onnx.checker.check_model(rewritten)
    x = np.random.default_rng(1).standard_normal([5 if dim == "tokens" else dim for dim in activation_shape])
    x = x.astype(np.float32)
    want = x @ BATCHED_WEIGHTS
    for proto in (model, rewritten):
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_matmuls_that_need_no_broadcast_are_left_alone():
    already_batched = broadcast_matmul_model([8, "tokens", 16])
    assert expand_broadcast_matmuls(already_batched) == (already_batched, 0)
    plain = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        plain (float[n, 3] x) => (float[n, 2] y) <float[3, 2] w = {1, 2, 3, 4, 5, 6}> { y = MatMul(x, w) }
        """
    )
    assert expand_broadcast_matmuls(plain) == (plain, 0)


def test_a_one_dimensional_activation_is_not_expanded():
    """MatMul drops a 1-D operand's axis from the result; expanding it to [*batch, 1, K] would keep it."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "vector_matmul",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 4])],
        [onnx.numpy_helper.from_array(BATCHED_WEIGHTS, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    assert expand_broadcast_matmuls(model) == (model, 0)


# -- running (needs openvino) --


@needs_openvino
def test_matmul_of_a_vector_keeps_its_shape():
    """As onnx's test_matmul_1d_3d: [3] @ [2, 3, 4] is [2, 4] (it came out [2, 1, 4] when the vector was expanded)."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        vector (float[3] a, float[2, 3, 4] b) => (float[2, 4] y) { y = MatMul(a, b) }
        """
    )
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(3).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float32)
    y = get_backend("openvino").compile(model).run({"a": a, "b": b})["y"]
    assert y.shape == (2, 4)
    np.testing.assert_allclose(y, a @ b, rtol=1e-5, atol=1e-6)


@needs_openvino
def test_an_input_openvino_dropped_is_not_fed():
    """CastLike reads only the type of its second input: OpenVINO drops that input, and feeding it raised."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        castlike (float[3] x, float16[0] like) => (float16[3] y) { y = CastLike(x, like) }
        """
    )
    compiled = get_backend("openvino").compile(model)
    feeds = {"x": np.array([-1.0, 0.5, 2.0], np.float32), "like": np.zeros(0, np.float16)}
    y = compiled.run(feeds)["y"]
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, [-1.0, 0.5, 2.0])


@needs_openvino
def test_an_operator_without_a_conversion_rule_is_unsupported_in_openvinos_words():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 20]>
        concat (string[2] a, string[2] b) => (string[2] y) { y = StringConcat(a, b) }
        """
    )
    with pytest.raises(UnsupportedError, match=r"ONNX frontend has no conversion rule for StringConcat; it answered: "):
        get_backend("openvino").compile(model, check_declared=False)


@needs_openvino
@pytest.mark.parametrize(
    ("text", "stage", "message"),
    [
        (
            "fnuz (float8e4m3fnuz[2] x) => (float8e4m3fnuz[2] y) { y = Identity(x) }",
            "compile",
            "ONNX frontend cannot load a tensor of type float8e4m3fnuz; it answered: ",
        ),
        (
            "bf16 (bfloat16[2] x) => (bfloat16[2] y) { y = Identity(x) }",
            "run",
            "Python binding has no element type for input 'x' of numpy dtype bfloat16; it answered: ",
        ),
        (
            "to_bf16 (float[2] x) => (bfloat16[2] y) { y = Cast<to = 16>(x) }",
            "run",
            r"Python binding has no numpy type for output\(s\) y: float16 for bfloat16",
        ),
    ],
    ids=["type the frontend cannot load", "input the binding cannot carry", "output the binding cannot carry"],
)
def test_a_dtype_openvino_cannot_carry_is_unsupported(text, stage, message):
    import ml_dtypes

    model = onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 21]>\n' + text)
    backend = get_backend("openvino")
    with pytest.raises(UnsupportedError, match=message) as raised:
        compiled = backend.compile(model, {"nan_policy": "pass"}, check_declared=False)
        dtype = ml_dtypes.bfloat16 if text.startswith("bf16 (") else np.float32
        assert stage == "run"
        compiled.run({"x": np.ones(2, dtype)})
    assert raised.value.code == UnsupportedReason.DTYPE_NOT_CARRIED


@needs_openvino
@pytest.mark.parametrize("activation_shape", [[1, "tokens", 16], ["tokens", 16]])
def test_broadcast_matmul_runs_on_openvino_for_any_length(activation_shape):
    compiled = get_backend("openvino").compile(broadcast_matmul_model(activation_shape))
    assert compiled.expanded_matmuls == 1
    for tokens in (1, 5, 33):
        shape = [tokens if dim == "tokens" else dim for dim in activation_shape]
        x = np.random.default_rng(tokens).standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(compiled.run({"x": x})["y"], x @ BATCHED_WEIGHTS, rtol=1e-4, atol=1e-4)


@needs_openvino
def test_probe_lists_the_devices():
    assert "CPU" in PROBE.details["devices"]
    assert "devices: CPU (" in PROBE.reason


@needs_openvino
def test_tiny_preset_conforms(tiny_bundle):
    backend = get_backend("openvino")
    result = check_backend(tiny_bundle, backend)
    assert result.passed, result.reason
    assert result.worst("max_abs_error") < 1e-4
    assert result.routing_agreement() == 1.0
    compiled = backend.compile(tiny_bundle)
    # Every node of the graph OpenVINO compiled: the bundle's, plus the Expands the adapter added.
    expected_nodes = len(tiny_bundle.load_onnx().graph.node) + compiled.expanded_matmuls
    assert result.placement == compiled.placement() == {"openvino:CPU": expected_nodes}


@needs_openvino
def test_one_compile_takes_every_batch_and_sequence_length(tiny_bundle):
    compiled = get_backend("openvino").compile(tiny_bundle, {"threads": 1})
    oracle = get_backend("cpu").compile(tiny_bundle)
    rng = np.random.default_rng(0)
    for batch, seq in [(1, 1), (4, 64), (2, 7), (3, 33)]:
        feeds = {"input_ids": rng.integers(0, 256, (batch, seq), dtype=np.int64)}
        got, want = compiled.run(feeds), oracle.run(feeds)
        assert got["logits"].shape == (batch, seq, 256)
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=1e-3)
        for name in ("expert_ids_layer1", "expert_ids_layer2"):
            assert got[name].dtype == np.int64
            assert routing_agreement(want[name], got[name])[0] == 1.0, (name, batch, seq)


@needs_openvino
def test_outputs_are_not_overwritten_by_the_next_run(tiny_bundle):
    compiled = get_backend("openvino").compile(tiny_bundle)
    first_feeds = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8)}
    first = compiled.run(first_feeds)
    kept = first["logits"].copy()
    compiled.run({"input_ids": np.full((1, 8), 200, dtype=np.int64)})
    np.testing.assert_array_equal(first["logits"], kept)


@needs_openvino
def test_in_memory_model_compiles_and_runs():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        double (float[n] x) => (float[n] y) { y = Add(x, x) }
        """
    )
    compiled = get_backend("openvino").compile(model)
    np.testing.assert_array_equal(compiled.run({"x": np.arange(5, dtype=np.float32)})["y"], np.arange(5) * 2.0)
    assert compiled.placement() == {"openvino:CPU": 1}
    assert compiled.precision == "exact"


@needs_openvino
def test_unknown_device_is_refused_at_compile(tiny_bundle):
    with pytest.raises(BackendError, match=r"openvino has no device 'NPU.9'"):
        get_backend("openvino").compile(tiny_bundle, {"device": "NPU.9"})


@needs_openvino
def test_reduced_precision_hint_is_reported_as_what_took_effect(tiny_bundle):
    # Whether bf16 takes effect depends on the CPU (AVX-512, AMX, ...); what holds on any CPU is that the
    # reported precision matches the values: f32 gives the f32 compile's outputs, bf16 visibly different ones.
    backend = get_backend("openvino")
    reduced, full = backend.compile(tiny_bundle, {"precision": "bf16"}), backend.compile(tiny_bundle)
    assert full.inference_precision == "f32" and full.precision == "exact"
    assert reduced.inference_precision in ("f32", "bf16")
    assert reduced.precision == ("exact" if reduced.inference_precision == "f32" else "openvino-bf16")
    feeds, expected = tiny_bundle.golden_sets()[0]
    logits = reduced.run(feeds)["logits"].astype(np.float64)
    difference = np.abs(logits - full.run(feeds)["logits"]).max()
    if reduced.inference_precision == "f32":
        assert difference < 1e-5
    else:
        assert difference > 1e-3  # 8 mantissa bits: far beyond float32 rounding
    golden = expected["logits"].ravel().astype(np.float64)
    # bf16 keeps 8 mantissa bits: close in direction (measured 0.9998 on this preset), not to 1e-4.
    assert logits.ravel() @ golden / (np.linalg.norm(logits) * np.linalg.norm(golden)) > 0.999


def test_the_guide_states_the_tolerance_rows_the_code_has():
    from pathlib import Path

    from backends.openvino_runtime import TOLERANCES

    guide = (Path(__file__).resolve().parents[2] / "docs" / "backends-cuda-openvino.md").read_text()
    for mode in ("openvino-bf16", "openvino-f16"):
        tolerance = TOLERANCES[mode].tolerances["float32"]
        assert f"`{mode}` (atol {tolerance.atol:g}, rtol {tolerance.rtol:g})" in guide
