"""Tests for weight formats (exporters/weight_formats.py, exporters/fp8_sources.py) and how conformance
judges them. The tiny bundle is exported once per session; each format is a pass over a copy of it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters.fp8_sources import decode_float8_e4m3, dequantize_fp8_blocks, requantize_fp8_blocks
from exporters.weight_formats import MATMULNBITS_ACCURACY_LEVEL, dequantize, plan_weights, quantize
from exporters.weight_pass import apply_weight_plan, convert_bundle, fold_weight_preparation
from portable_moe import compare, get_backend
from portable_moe.compare import compare_outputs, tolerance_for, with_weights
from portable_moe.conformance.model_check import check_backend
from portable_moe.errors import BackendError, BundleError, ConformanceError, ExportError

# (weights, block size, kernel) -> format key; every format a bundle can have, and the ORT fast path.
FORMATS = {
    ("float16", None, "dequantize"): "float16",
    ("bfloat16", None, "dequantize"): "bfloat16",
    ("int8", 0, "dequantize"): "int8/channel",
    ("int8", 32, "dequantize"): "int8/block",
    ("int4", 32, "dequantize"): "int4/block",
    ("int4", 32, "matmulnbits"): "int4/block",
}
BACKENDS = ("cpu", "reference", "openvino", "npu-sim")


@pytest.fixture(scope="session")
def weight_bundle(tiny_bundle, tmp_path_factory):
    """A memoized factory: (weights, block size, kernel) -> the tiny bundle converted to that format."""
    made = {}
    root = tmp_path_factory.mktemp("weights")

    def make(weights: str, block_size: int | None, kernel: str):
        key = (weights, block_size, kernel)
        if key not in made:
            made[key] = convert_bundle(tiny_bundle, root / f"{weights}-{block_size}-{kernel}", *key)
        return made[key]

    return make


def _initializers(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in proto.graph.initializer}


# ---------------------------------------------------------------- quantization arithmetic


@pytest.mark.parametrize(("bits", "block_size", "axis"), [(8, 0, 0), (8, 32, 1), (4, 32, 0), (4, 16, 2)])
def test_quantize_is_symmetric_blockwise_and_within_half_a_step(bits, block_size, axis):
    weight = np.random.default_rng(axis).standard_normal((64, 96, 32)[: 2 + (axis == 2)]).astype(np.float32)
    codes, scales = quantize(weight, bits, block_size, axis)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == np.int8 and codes.shape == weight.shape
    assert codes.min() >= -qmax and codes.max() <= qmax
    expected_scales = list(weight.shape)
    expected_scales[axis] = weight.shape[axis] // block_size if block_size else 1
    assert list(scales.shape) == expected_scales
    restored = dequantize(codes, scales, block_size, axis)
    step = np.repeat(scales, block_size or weight.shape[axis], axis=axis)
    assert np.all(np.abs(restored - weight) <= step / 2 + 1e-7)
    # The largest magnitude of every block is a code of +-qmax (the scale is set by it).
    assert np.abs(codes).max() == qmax
    # Re-quantizing the dequantized weights gives the same codes, bit for bit.
    again, _ = quantize(restored, bits, block_size, axis)
    np.testing.assert_array_equal(again, codes)


def test_bad_requests_are_refused_at_the_door():
    with pytest.raises(ExportError, match="unknown weight format 'int3'; formats: float32, float16"):
        plan_weights("int3")
    with pytest.raises(ExportError, match="block size 24 is not a power of two of at least 16"):
        plan_weights("int8", 24)
    with pytest.raises(ExportError, match="int4 weights need blocks"):
        plan_weights("int4", 0)
    with pytest.raises(ExportError, match="--block-size applies to int8 and int4 weights, not float16"):
        plan_weights("float16", 32)
    with pytest.raises(ExportError, match="the matmulnbits kernel is for int8 and int4 weights, not bfloat16"):
        plan_weights("bfloat16", None, "matmulnbits")
    with pytest.raises(ExportError, match="MatMulNBits takes block-wise scales only"):
        plan_weights("int8", 0, "matmulnbits")
    with pytest.raises(ExportError, match="unknown weight kernel 'fast'; kernels: dequantize, matmulnbits"):
        plan_weights("int8", 0, "fast")
    with pytest.raises(ExportError, match=r"block size 64 does not divide the reduction axis \(96\)"):
        quantize(np.ones((96, 4), np.float32), 4, 64, 0)


# ---------------------------------------------------------------- the graph pass on the tiny bundle


@pytest.mark.parametrize(("weights", "block_size", "kernel"), [key for key in FORMATS if key[2] == "dequantize"])
def test_stored_weights_are_the_reference_quantization_bit_for_bit(
    tiny_bundle, weight_bundle, weights, block_size, kernel
):
    from onnx.reference import ReferenceEvaluator

    bundle = weight_bundle(weights, block_size, kernel)
    original = _initializers(tiny_bundle.load_onnx())
    proto = bundle.load_onnx()
    converted = _initializers(proto)
    record = bundle.manifest["weights"]
    quantized = {name: entry for name, entry in record["tensors"].items() if entry["format"] == weights}
    assert len(quantized) == record["converted"] > 20
    producers = {node.output[0]: node for node in proto.graph.node}
    assert not set(quantized) & set(converted)  # the float32 weights are gone from the graph
    # One weight of each kind is evaluated through the graph: attention/MLP MatMul, shared-expert Gemm, expert stacks.
    kinds = {}
    for name, entry in quantized.items():
        kinds.setdefault((len(entry["shape"]), tuple(entry["consumers"])), name)
    for name in kinds.values():
        entry = quantized[name]
        weight = numpy_helper.to_array(original[name])
        stored = converted[f"{name}.{weights}" if weights.endswith("float16") else f"{name}.q{weights[3:]}"]
        if entry["format"] in ("float16", "bfloat16"):
            import ml_dtypes  # onnx's own dependency for bfloat16

            rounded = weight.astype(np.float16 if weights == "float16" else ml_dtypes.bfloat16)  # nearest, ties to even
            np.testing.assert_array_equal(numpy_helper.to_array(stored).view(np.uint16), rounded.view(np.uint16))
            continue
        codes, scales = quantize(weight, int(weights[3:]), entry["block_size"], entry["axis"])
        if block_size:  # block-wise: the codes and scales are stored in the weight's own layout
            np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.int8), codes)
        # Whatever the layout, the graph's dequantized weight is codes * scales, exactly.
        value = next(
            f"{name}.{step}" for step in ("transposed", "reshaped", "dequantized") if f"{name}.{step}" in producers
        )
        chain = [node for node in proto.graph.node if set(node.output) & _upstream(proto, value)]
        small = onnx.helper.make_model(
            onnx.helper.make_graph(
                chain,
                "dequantize",
                [],
                [onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None)],
                [converted[i] for node in chain for i in node.input if i in converted],
            ),
            opset_imports=proto.opset_import,
        )
        np.testing.assert_array_equal(
            ReferenceEvaluator(small).run(None, {})[0], dequantize(codes, scales, entry["block_size"], entry["axis"])
        )


def _upstream(proto: onnx.ModelProto, value: str) -> set[str]:
    producers = {output: node for node in proto.graph.node for output in node.output}
    seen, pending = set(), [value]
    while pending:
        name = pending.pop()
        if name in producers and name not in seen:
            seen.add(name)
            pending.extend(producers[name].input)
    return seen


def test_matmulnbits_holds_the_same_codes_packed(tiny_bundle, weight_bundle):
    bundle = weight_bundle("int4", 32, "matmulnbits")
    proto = bundle.load_onnx()
    original = _initializers(tiny_bundle.load_onnx())
    converted = _initializers(proto)
    fused = [node for node in proto.graph.node if node.op_type == "MatMulNBits"]
    kernels = {entry.get("kernel") for entry in bundle.manifest["weights"]["tensors"].values()}
    # 2-D weights take the fused node; the dense lowering's 3-D expert stacks keep DequantizeLinear.
    assert fused and kernels == {"matmulnbits", "dequantize", None}
    assert {"com.microsoft"} <= {opset.domain for opset in proto.opset_import}
    # int8 activations: ONNX Runtime's integer kernels (level 0 dequantizes every weight per call).
    levels = {
        onnx.helper.get_attribute_value(a) for node in fused for a in node.attribute if a.name == "accuracy_level"
    }
    assert levels == {MATMULNBITS_ACCURACY_LEVEL} == {bundle.manifest["weights"]["accuracy_level"]}
    for node in fused:
        name = node.input[1].removesuffix(".nbits")
        entry = bundle.manifest["weights"]["tensors"][name]
        codes, scales = quantize(numpy_helper.to_array(original[name]), 4, 32, entry["axis"])
        packed = numpy_helper.to_array(converted[node.input[1]])
        unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.int16) - 8
        np.testing.assert_array_equal(unpacked, np.moveaxis(codes, entry["axis"], -1))
        np.testing.assert_array_equal(
            numpy_helper.to_array(converted[node.input[2]]), np.moveaxis(scales, entry["axis"], -1).reshape(-1)
        )


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_lowering_experts_become_one_qmoe_node_holding_the_same_codes(bundle_factory, tmp_path, bits):
    """The fused lowering's MoE node becomes ONNX Runtime's QMoE, which reads only the selected experts' codes."""
    fused = bundle_factory("tiny", "fused")  # shared with tests/exporters/test_lowerings.py
    bundle = convert_bundle(fused, tmp_path / f"int{bits}", f"int{bits}", 32, "matmulnbits")  # validates on cpu
    proto = bundle.load_onnx()
    moe_nodes = [node for node in proto.graph.node if node.op_type in ("MoE", "QMoE")]
    assert [node.op_type for node in moe_nodes] == ["QMoE"] * len(fused.routing_outputs)
    original, converted = _initializers(fused.load_onnx()), _initializers(proto)
    for node in moe_nodes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["expert_weight_bits"] == bits and attributes["block_size"] == 32
        for codes_input in (2, 5):  # fc1 (gate and up interleaved) and fc2, [experts, out, in]
            name = node.input[codes_input].removesuffix(".nbits")
            assert bundle.manifest["weights"]["tensors"][name]["kernel"] == "qmoe"
            codes, scales = quantize(numpy_helper.to_array(original[name]), bits, 32, -1)
            packed = numpy_helper.to_array(converted[node.input[codes_input]]).astype(np.int16)
            if bits == 4:
                packed = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(codes.shape)
            np.testing.assert_array_equal(packed - 2 ** (bits - 1), codes)
            np.testing.assert_array_equal(numpy_helper.to_array(converted[node.input[codes_input + 1]]), scales)
    assert check_backend(bundle, get_backend("cpu")).status == "passed"


def test_folding_weight_preparation_keeps_stored_codes():
    """Concat of initializers folds (as ONNX Runtime does at load); DequantizeLinear of codes stays."""
    proto = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        agraph (float[1, 4] x) => (float[1, 2] y)
        <int8[4, 2] codes = {1, 2, 3, 4, 5, 6, 7, 8}, float scale = {0.5}, float[2, 2] a = {1, 2, 3, 4},
         float[2, 2] b = {5, 6, 7, 8}, int64[1] zero = {0}, int64[1] one = {1}>
        {
            weight = DequantizeLinear(codes, scale)
            stacked = Concat<axis = 0>(a, b)
            bias = Slice(stacked, zero, one, zero)
            product = MatMul(x, weight)
            y = Add(product, bias)
        }
        """
    )
    fold_weight_preparation(proto)
    assert [node.op_type for node in proto.graph.node] == ["DequantizeLinear", "MatMul", "Add"]
    assert {"codes", "scale"} <= {tensor.name for tensor in proto.graph.initializer}


def test_router_stays_float32_and_the_manifest_records_every_tensor(tiny_bundle, weight_bundle):
    bundle = weight_bundle("int4", 32, "dequantize")
    record = bundle.manifest["weights"]
    assert record["key"] == "int4/block" and record["router"] == "float32" and record["block_size"] == 32
    routers = {name for name, entry in record["tensors"].items() if entry.get("note", "").startswith("router")}
    assert len(routers) == len(tiny_bundle.routing_outputs)  # one router per MoE layer
    original, converted = _initializers(tiny_bundle.load_onnx()), _initializers(bundle.load_onnx())
    for name in routers:
        assert converted[name].SerializeToString() == original[name].SerializeToString()
    # Every float initializer of the float32 model is accounted for, by its original name.
    float_names = {
        name
        for name, tensor in original.items()
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) >= 2
    }
    assert float_names <= set(record["tensors"])
    # The golden data are the float32 bundle's, untouched.
    for (_, outputs), (_, outputs32) in zip(bundle.golden_sets(), tiny_bundle.golden_sets()):
        for name in outputs32:
            np.testing.assert_array_equal(outputs[name], outputs32[name])


def test_apply_weight_plan_rewrites_a_model_file_in_place(tiny_bundle, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copyfile(tiny_bundle.model_path, path)
    record = apply_weight_plan(path, plan_weights("float32"), list(tiny_bundle.routing_outputs))
    assert path.read_bytes() == tiny_bundle.model_path.read_bytes() and record["converted"] == 0
    record = apply_weight_plan(path, plan_weights("int8"), list(tiny_bundle.routing_outputs), lambda message: None)
    assert record["key"] == "int8/channel" and path.stat().st_size < tiny_bundle.model_path.stat().st_size * 0.6
    onnx.checker.check_model(str(path), full_check=True)


def test_a_float32_plan_records_external_weights_without_reading_them(tiny_bundle, tmp_path):
    """A large model's float32 weights live in external data: the float32 record comes from the graph
    alone (reading them would hold every weight in memory twice more at the peak of an export)."""
    inline = apply_weight_plan(tiny_bundle.model_path, plan_weights("float32"), list(tiny_bundle.routing_outputs))
    path = tmp_path / "model.onnx"
    onnx.save_model(
        onnx.load(str(tiny_bundle.model_path)), str(path), save_as_external_data=True, location="model.onnx.data"
    )
    (tmp_path / "model.onnx.data").unlink()  # what is not read cannot be missed
    record = apply_weight_plan(path, plan_weights("float32"), list(tiny_bundle.routing_outputs))
    assert record == inline and record["tensors"]
    with pytest.raises(onnx.checker.ValidationError, match="model.onnx.data"):  # the int8 pass reads them
        apply_weight_plan(path, plan_weights("int8"), list(tiny_bundle.routing_outputs))


def test_convert_refuses_a_converted_source_and_an_existing_output(tiny_bundle, weight_bundle, tmp_path):
    int8 = weight_bundle("int8", 0, "dequantize")
    with pytest.raises(ExportError, match="already holds int8/channel weights; convert from a float32 bundle"):
        convert_bundle(int8, tmp_path / "again", "int4")
    with pytest.raises(BundleError, match="already exists; choose another directory or pass overwrite"):
        convert_bundle(tiny_bundle, int8.path, "int8")


# ---------------------------------------------------------------- backends and conformance


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(("weights", "block_size", "kernel"), list(FORMATS))
def test_every_format_runs_on_every_backend_that_declares_it(weight_bundle, backend_name, weights, block_size, kernel):
    backend = get_backend(backend_name)
    if not backend.safe_probe().available:
        pytest.skip(f"{backend_name} unavailable here: {backend.safe_probe().reason}")
    bundle = weight_bundle(weights, block_size, kernel)
    capabilities = backend.capabilities
    key = FORMATS[(weights, block_size, kernel)]
    result = check_backend(bundle, backend)
    if key not in capabilities.weight_formats:
        assert result.status == "error" and f"does not take {key} weights: " in result.reason
        assert capabilities.weight_format_refusals[key] in result.reason  # the backend says why
    elif kernel == "matmulnbits" and "com.microsoft" not in capabilities.domains:
        assert result.status == "error" and "cannot run operators of domain(s) com.microsoft" in result.reason
    else:
        assert result.status == "passed", result.reason
        assert result.precision.endswith(f"+weights:{key}")
        assert all(
            0.0 <= layer.load_drift <= 1.0 and layer.flip_rate == 1 - layer.agreement for layer in result.routing
        )


def test_npu_sim_refuses_int4_at_compile_time_with_the_reason(weight_bundle):
    bundle = weight_bundle("int4", 32, "dequantize")
    with pytest.raises(
        BackendError, match=r"does not take int4/block weights: the simulated Ascend matrix unit takes int8"
    ):
        get_backend("npu-sim").compile(bundle)
    with pytest.raises(BackendError, match="takes one int8 scale per output channel, not per block"):
        get_backend("npu-sim").compile(weight_bundle("int8", 32, "dequantize"))


def test_tolerance_rows_combine_with_precision_modes_and_unknown_formats_are_refused():
    row = tolerance_for("float32", with_weights("exact", "int8/block"))
    assert row is compare.WEIGHT_TOLERANCES["int8/block"]
    npu_modes = get_backend("npu-sim").capabilities.precision_modes
    mode = tolerance_for("float32", "force_fp16", npu_modes)
    combined = tolerance_for("float32", with_weights("force_fp16", "int8/channel"), npu_modes)
    assert combined.atol == pytest.approx(mode.atol + compare.WEIGHT_TOLERANCES["int8/channel"].atol)
    assert combined.min_routing_agreement == compare.WEIGHT_TOLERANCES["int8/channel"].min_routing_agreement
    assert with_weights("exact", "float32") == "exact"
    with pytest.raises(ConformanceError, match="no tolerance for weight format 'int2/block'"):
        tolerance_for("float32", with_weights("exact", "int2/block"))


def test_a_loosened_row_would_hide_a_real_routing_change(weight_bundle, monkeypatch):
    """Negating one MoE layer's router is a real routing change; the int8 row catches it, a loosened row not."""
    bundle = weight_bundle("int8", 0, "dequantize")
    proto = bundle.load_onnx()
    routers = [
        name for name, entry in bundle.manifest["weights"]["tensors"].items() if "router" in entry.get("note", "")
    ]
    for tensor in proto.graph.initializer:
        if tensor.name == routers[-1]:
            tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
    feeds, expected = bundle.golden_sets()[0]
    cpu = get_backend("cpu")
    honest = cpu.compile(bundle.load_onnx()).run(feeds)
    broken = cpu.compile(proto).run(feeds)
    precision = with_weights("exact", bundle.weight_format)

    def routing_verdicts(actual):
        return [
            c.passed
            for c in compare_outputs(expected, actual, bundle.routing_outputs, precision)
            if c.kind == "routing"
        ]

    assert all(routing_verdicts(honest))  # the format's own flips are inside its row
    assert not all(routing_verdicts(broken))  # the real change is not
    loosened = compare.Tolerance(atol=1e9, rtol=1.0, min_routing_agreement=0.0, reason="loosened")
    monkeypatch.setitem(compare.WEIGHT_TOLERANCES, "int8/channel", loosened)
    assert all(c.passed for c in compare_outputs(expected, broken, bundle.routing_outputs, precision))


def _drop_selection_bias(proto: onnx.ModelProto, routers: list[str]) -> None:
    biases = [t for t in proto.graph.initializer if t.name.endswith("e_score_correction_bias")]
    assert len(biases) == len(routers)
    for tensor in biases:
        tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(tensor)), tensor.name))


def _swap_routers(proto: onnx.ModelProto, routers: list[str]) -> None:
    """Each MoE layer reads the next layer's router (a weight mapped to the wrong layer)."""
    tensors = {t.name: t for t in proto.graph.initializer if t.name in routers}
    arrays = [numpy_helper.to_array(tensors[name]) for name in routers]
    for name, array in zip(routers, arrays[1:] + arrays[:1]):
        tensors[name].CopyFrom(numpy_helper.from_array(array, name))


@pytest.mark.parametrize(
    ("weights", "block_size", "wrong_change"),
    [("int8", 0, _drop_selection_bias), ("int4", 32, _swap_routers)],
    ids=["int8-bias-dropped", "int4-routers-swapped"],
)
def test_a_wrong_router_fails_the_row_the_honest_format_passes(weight_bundle, weights, block_size, wrong_change):
    """Issue 14 part 6: the format's own flips pass its row; a real routing change on top of them does not."""
    bundle = weight_bundle(weights, block_size, "dequantize")
    routers = sorted(
        name for name, entry in bundle.manifest["weights"]["tensors"].items() if "router" in entry.get("note", "")
    )
    assert len(routers) == len(bundle.routing_outputs) == 2
    proto = bundle.load_onnx()
    wrong_change(proto, routers)
    feeds, expected = bundle.golden_sets()[0]
    cpu = get_backend("cpu")
    precision = with_weights("exact", bundle.weight_format)

    def routing(actual):
        return [c for c in compare_outputs(expected, actual, bundle.routing_outputs, precision) if c.kind == "routing"]

    honest, wrong = routing(cpu.compile(bundle.load_onnx()).run(feeds)), routing(cpu.compile(proto).run(feeds))
    assert all(c.passed for c in honest)
    failed = [c for c in wrong if not c.passed]  # the check fails when any MoE layer does
    assert failed and all("expert overlap" in c.message for c in failed)
    row = compare.WEIGHT_TOLERANCES[bundle.weight_format]
    assert min(c.expert_overlap for c in wrong) < row.min_expert_overlap <= min(c.expert_overlap for c in honest)


def test_expert_overlap_counts_the_experts_each_token_kept():
    expected = np.array([[[0, 1, 2], [3, 4, 5]], [[0, 1, 2], [6, 7, 0]]])
    actual = np.array([[[2, 1, 0], [3, 4, 9]], [[5, 6, 7], [0, 6, 7]]])  # 3, 2, 0 and 3 of 3 kept
    assert compare.expert_overlap(expected, actual) == pytest.approx(8 / 12)
    assert compare.expert_overlap(expected, expected) == 1.0
    row = compare.Tolerance(atol=0, rtol=0, min_routing_agreement=0.0, reason="", min_expert_overlap=0.7)
    (verdict,) = compare_outputs({"ids": expected}, {"ids": actual}, {"ids": 1}, "exact")
    assert not verdict.passed and verdict.expert_overlap == pytest.approx(8 / 12)
    # A row's agreement bounds its overlap from below; combined rows keep the looser requirement.
    assert row.required_overlap == 0.7
    assert compare.Tolerance(0, 0, 0.9, "").required_overlap == 0.9
    combined = tolerance_for(
        "float32", with_weights("force_fp16", "int4/block"), get_backend("npu-sim").capabilities.precision_modes
    )
    assert combined.min_expert_overlap == compare.WEIGHT_TOLERANCES["int4/block"].min_expert_overlap


def test_values_after_a_flip_are_left_to_the_routing_verdict():
    expected = {
        "logits": np.zeros((1, 4, 3), np.float32),
        "expert_ids_layer1": np.array([[[0, 1], [0, 1], [2, 3], [0, 1]]]),
    }
    actual = {
        "logits": np.zeros((1, 4, 3), np.float32),
        "expert_ids_layer1": np.array([[[1, 0], [0, 1], [2, 4], [0, 1]]]),
    }
    actual["logits"][0, 2:] = 5.0  # the flipped token and the one after it differ a lot
    mask = compare.tokens_before_first_flip(expected, actual, {"expert_ids_layer1": 1})
    np.testing.assert_array_equal(mask, [[True, True, False, False]])
    routing = {"expert_ids_layer1": 1}
    exact = compare_outputs(expected, actual, routing, "exact")
    assert not exact[0].passed  # a row that allows no flip judges every token
    loose = compare_outputs(expected, actual, routing, with_weights("exact", "int4/block"))
    assert loose[0].passed and loose[0].max_abs_error == 5.0  # errors still describe every token
    actual["logits"][0, 1] = 9.0
    failed = compare_outputs(expected, actual, routing, with_weights("exact", "int4/block"))[0]
    assert not failed.passed and "2 of 4 tokens judged (the rest follow a routing flip)" in failed.message


# ---------------------------------------------------------------- FP8 sources


def _synthetic_fp8(rows: int = 256, columns: int = 384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)
    codes = generator.integers(0, 256, size=(rows, columns), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    scale_inv = generator.uniform(1e-3, 1e-2, size=(rows // 128, columns // 128)).astype(np.float32)
    real = decode_float8_e4m3(codes) * np.repeat(np.repeat(scale_inv, 128, 0), 128, 1)
    np.testing.assert_array_equal(dequantize_fp8_blocks(codes, scale_inv), real)
    return codes, scale_inv, real


def test_e4m3_decoding_matches_torch():
    torch = pytest.importorskip("torch", reason="needs torch (pip install 'portable-moe[export]')")
    codes = np.arange(256, dtype=np.uint8)
    expected = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(decode_float8_e4m3(codes), expected)  # NaN positions compare equal too


@pytest.mark.parametrize(("weights", "block_size"), [("int8", 32), ("int4", 64), ("int8", 128), ("int8", 0)])
def test_fp8_blocks_requantize_keeping_their_scales(weights, block_size):
    codes, scale_inv, real = _synthetic_fp8()
    new_codes, scales = requantize_fp8_blocks(codes, scale_inv, weights, block_size)
    restored = dequantize(new_codes, scales, block_size, axis=1)
    step = np.repeat(scales, block_size or real.shape[1], axis=1)
    assert np.all(np.abs(restored - real) <= step / 2 + 1e-6 * np.abs(real).max())
    reference_codes, reference_scales = quantize(real, int(weights[3:]), block_size, axis=1)
    np.testing.assert_allclose(scales, reference_scales, rtol=1e-6)
    # The same codes as quantizing the real weight, except where a value sits on a rounding tie (e4m3 values
    # are a coarse grid, so ties are common) and the two float paths round it to different sides.
    ratio = real / np.repeat(reference_scales, block_size or real.shape[1], axis=1)
    differ = new_codes != reference_codes
    assert np.all(np.abs(new_codes.astype(int) - reference_codes) <= 1)
    assert np.all(np.abs(np.abs(ratio - np.floor(ratio)) - 0.5)[differ] < 1e-4)
    if block_size:  # each block's scale is its FP8 tile's scale times the block's own e4m3 range
        tile = np.repeat(np.repeat(scale_inv, 128, 0), 128, 1)[:, ::block_size]
        fp8_range = np.abs(decode_float8_e4m3(codes)).reshape(256, -1, block_size).max(-1)
        np.testing.assert_allclose(scales, tile * fp8_range / (2 ** (int(weights[3:]) - 1) - 1), rtol=1e-6)


def test_fp8_requantize_refuses_what_it_cannot_keep():
    codes, scale_inv, _ = _synthetic_fp8()
    with pytest.raises(ExportError, match=r"scale_inv has shape \[1, 3\], expected \[2, 3\]"):
        requantize_fp8_blocks(codes, scale_inv[:1], "int8", 32)
    with pytest.raises(ExportError, match="block size 256 must divide the FP8 tile width 128"):
        requantize_fp8_blocks(codes, scale_inv, "int8", 256)
    with pytest.raises(
        ExportError, match="FP8 blocks requantize to int8 or int4, not bfloat16; use dequantize_fp8_blocks"
    ):
        requantize_fp8_blocks(codes, scale_inv, "bfloat16", 0)
    codes[0, 0] = 0x7F
    with pytest.raises(ExportError, match="holds NaN codes"):
        requantize_fp8_blocks(codes, scale_inv, "int4", 32)


# ---------------------------------------------------------------- the command line


def test_cli_convert_check_and_bench_compare(tiny_bundle, tmp_path, capsys):
    from portable_moe.cli import main

    target = tmp_path / "int8"
    assert main(["convert", str(tiny_bundle.path), "-o", str(target), "--weights", "int8"]) == 0
    assert "int8/channel weights" in capsys.readouterr().out
    report = tmp_path / "check.json"
    assert main(["check", str(target), "--backend", "cpu", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["weight_format"] == "int8/channel" and data["results"][0]["precision"] == "exact+weights:int8/channel"
    assert {"flip_rate", "near_tie_share", "load_drift"} <= set(data["results"][0]["routing"][0])
    bench = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(target),
            "--batch",
            "1",
            "--seq",
            "1",
            "--runs",
            "3",
            "--warmup",
            "1",
            "--compare",
            str(tiny_bundle.path),
            "--json",
            str(bench),
        ]
    )
    assert code == 0 and "speed vs first" in capsys.readouterr().out
    rows = json.loads(bench.read_text())["compare"]
    assert [row["weight_format"] for row in rows] == ["int8/channel", "float32"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "int4", "--block-size", "20"], "block size 20 is not a power of two"),
        (["--weights", "float16", "--block-size", "32"], "--block-size applies to int8 and int4 weights"),
    ],
)
def test_cli_bad_weight_options_exit_2(tiny_bundle, tmp_path, capsys, args, message):
    from portable_moe.cli import main

    assert main(["convert", str(tiny_bundle.path), "-o", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_applies_the_format_before_validation(tmp_path):
    """The one export of this module: int4 raises the opset to 21, which the manifest must say.

    Seed 5, so that it is not the float32 tiny bundle's model traced a second time."""
    from exporters import export_bundle
    from portable_moe import check_bundle

    messages = []
    bundle = export_bundle(tmp_path / "int4", "tiny", 5, weights="int4", block_size=32, progress=messages.append)
    assert bundle.weight_format == "int4/block" and bundle.manifest["opset"] == 21
    assert messages.index("storing weights as int4/block (dequantize kernel); the router stays float32") < next(
        index for index, message in enumerate(messages) if message.startswith("validating: ONNX Runtime")
    )
    [result] = check_bundle(bundle, ["cpu"])
    assert result.status == "passed", result.reason
    with pytest.raises(ExportError, match="int4 weights need blocks"):
        export_bundle(tmp_path / "never", "tiny", 0, weights="int4", block_size=0)
    assert not (tmp_path / "never").exists()


def test_weights_prepared_from_initializers_are_folded_then_converted():
    """The sparse lowering's pattern: expert weights concatenated and split before each Gemm."""
    from onnx.reference import ReferenceEvaluator

    from exporters.weight_pass import convert_weights

    generator = np.random.default_rng(0)
    gate, up = (generator.standard_normal((2, 4, 32)).astype(np.float32) for _ in range(2))
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                onnx.helper.make_node("Concat", ["gate", "up"], ["both"], axis=1),
                onnx.helper.make_node("Split", ["both"], ["expert0", "expert1"], axis=0, num_outputs=2),
                onnx.helper.make_node("Squeeze", ["expert1", "axes"], ["weight"]),
                onnx.helper.make_node("Gemm", ["x", "weight"], ["y"], transB=1),
            ],
            "sparse-like",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 32])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 8])],
            [
                numpy_helper.from_array(gate, "gate"),
                numpy_helper.from_array(up, "up"),
                numpy_helper.from_array(np.array([0], np.int64), "axes"),
            ],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 20)],
    )
    original = model.SerializeToString()
    converted, record = convert_weights(model, "int8", 16)
    assert model.SerializeToString() == original  # a copy was converted
    in_place, same_record = convert_weights(model, "int8", 16, in_place=True)
    assert in_place is model and same_record == record
    assert in_place.SerializeToString() == converted.SerializeToString()
    assert [node.op_type for node in converted.graph.node] == ["DequantizeLinear", "Gemm"]
    assert record["converted"] == 1 and not {"gate", "up"} & {t.name for t in converted.graph.initializer}
    weight = np.concatenate([gate, up], axis=1)[1]  # [8, 32]: Gemm's transB layout, reduction axis 1
    codes, scales = quantize(weight, 8, 16, axis=1)
    x = generator.standard_normal((3, 32)).astype(np.float32)
    expected = x @ dequantize(codes, scales, 16, axis=1).T
    np.testing.assert_allclose(ReferenceEvaluator(converted).run(None, {"x": x})[0], expected, rtol=1e-6, atol=1e-6)


def _w8a8_reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray):
    """Ascend W8A8 in numpy: per-token symmetric int8 activations, int32 accumulation, dequantized output."""
    scale = np.max(np.abs(x), axis=-1, keepdims=True) / np.float32(127)
    scale = np.where(scale == 0, np.float32(1), scale)
    quantized = np.clip(np.round(x / scale), -127, 127).astype(np.int8)  # np.round: half to even
    accumulated = np.matmul(quantized.astype(np.int32), codes.astype(np.int32))
    return quantized, accumulated, (accumulated.astype(np.float32) * scale) * scales


def test_w8a8_rewrite_matches_a_numpy_reference_bit_exactly():
    import onnxruntime

    from backends.npu_sim.precision import quantize_activations

    rng = np.random.default_rng(3)
    codes = rng.integers(-127, 128, size=(16, 8)).astype(np.int8)
    scales = rng.uniform(0.001, 0.02, size=8).astype(np.float32)
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token: scale 1, codes 0
    x[0, 1, :4] = [127.0, 0.5, 1.5, -2.5]  # scale 1: halves round to even (0, 2, -2)
    x[0, 1, 4:] = 0.25
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("DequantizeLinear", ["codes", "scales"], ["weight"], axis=1),
            onnx.helper.make_node("MatMul", ["x", "weight"], ["y"]),
            onnx.helper.make_node("Gemm", ["x2", "weight_t"], ["y2"], transB=1),
            onnx.helper.make_node("Transpose", ["weight"], ["weight_t"]),
        ],
        "w8a8",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 16]),
            onnx.helper.make_tensor_value_info("x2", onnx.TensorProto.FLOAT, [3, 16]),
        ],
        [
            onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 8]),
            onnx.helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [3, 8]),
        ],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    rewritten, count = quantize_activations(model)
    assert count == 2
    assert not [node for node in rewritten.graph.node if node.op_type in ("DequantizeLinear", "Transpose", "MatMul")]
    extra = ["y.w8a8_codes", "y.w8a8_int32", "y2.w8a8_codes", "y2.w8a8_int32"]
    rewritten.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in extra)
    session = onnxruntime.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    y, y2, codes_x, int32_x, codes_x2, int32_x2 = session.run(None, {"x": x, "x2": x[1]})
    for actual_codes, actual_int32, actual, source in [(codes_x, int32_x, y, x), (codes_x2, int32_x2, y2, x[1])]:
        quantized, accumulated, expected = _w8a8_reference(source, codes, scales)
        np.testing.assert_array_equal(actual_codes, quantized)
        np.testing.assert_array_equal(actual_int32, accumulated)
        np.testing.assert_array_equal(actual, expected)
    assert codes_x[0, 0].tolist() == [0] * 16 and codes_x[0, 1, :4].tolist() == [127, 0, 2, -2]


def test_npu_sim_w8a8_passes_its_row_and_really_quantizes_activations(weight_bundle, tmp_path):
    from backends.npu_sim.backend import NpuSimBackend

    bundle = weight_bundle("int8", 0, "dequantize")
    batch, seq = bundle.golden_sets()[0][0]["input_ids"].shape
    options = {"activations": "int8", "batch_sizes": (batch,), "seq_lengths": (seq,), "cache_dir": tmp_path}
    result = check_backend(bundle, NpuSimBackend(), options)
    assert result.passed, result.reason
    compiled = NpuSimBackend().compile(bundle, options)
    assert compiled.precision == compiled.report().precision == "force_fp16+w8a8"
    artifact = onnx.load(compiled.report().gears[0].artifact)
    op_types = [node.op_type for node in artifact.graph.node]
    quantized = [n for n, entry in bundle.manifest["weights"]["tensors"].items() if entry.get("format") == "int8"]
    assert op_types.count("MatMulInteger") == len(quantized) > 20 and "DequantizeLinear" not in op_types
    assert compiled.report().gears[0].host_nodes == 0  # the W8A8 nodes run on the simulated device
    feeds, _ = bundle.golden_sets()[0]
    w8a16 = NpuSimBackend().compile(bundle, {**options, "activations": "float"}).run(feeds)["logits"]
    assert not np.array_equal(compiled.run(feeds)["logits"], w8a16)


def test_npu_sim_refuses_int8_activations_without_per_channel_int8_weights(tiny_bundle, tmp_path):
    from backends.npu_sim.backend import NpuSimBackend

    with pytest.raises(BackendError, match=r"activations=int8 \(Ascend W8A8\) needs int8 weights with one scale per "):
        NpuSimBackend().compile(tiny_bundle, {"activations": "int8", "cache_dir": tmp_path})
    with pytest.raises(BackendError, match=r"option activations must be one of float, int8, got 'int4'"):
        NpuSimBackend().compile(tiny_bundle, {"activations": "int4", "cache_dir": tmp_path})
