"""Tests for the npu-sim backend (backends/npu_sim): op table, partitioning, gears, precision, cache, faults."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import onnx
import onnx.parser
import pytest

from backends.npu_sim import PRECISION_MODES, NpuSimBackend
from backends.npu_sim.cache import default_cache_dir
from backends.npu_sim.gears import Gear, build_gears, select_gear
from backends.npu_sim.optable import _validate, load_optable
from portable_moe.conformance.model_check import check_backend
from portable_moe.errors import BackendError, InputError
from portable_moe.registry import get_backend
from portable_moe.tensors import TensorSpec

# A Trilu (not on the device) between two device ops: two partitions, one fallback, four transfers.
SANDWICH = """
<ir_version: 8, opset_import: ["" : 20]>
sandwich (float[batch, seq] x) => (float[batch, seq] y) {
    a = Relu(x)
    b = Trilu(a)
    y = Sigmoid(b)
}
"""

# Add of two initializers: nothing the device should be sent.
CONSTANT_ADD = """
<ir_version: 8, opset_import: ["" : 20]>
constant_add (float[batch, 2] x) => (float[batch, 2] y) <float[2] w1 = {1.0, 2.0}, float[2] w2 = {3.0, 4.0}> {
    c = Add(w1, w2)
    y = Mul(x, c)
}
"""

# An ONNX Runtime contrib op between two device ops (its output type declared, as onnx cannot infer it).
CONTRIB = """
<ir_version: 8, opset_import: ["" : 20, "com.microsoft": 1]>
contrib (float[batch, 4] x) => (float[batch, 4] y) <float[batch, 4] g> {
    a = Relu(x)
    g = com.microsoft.Gelu(a)
    y = Neg(g)
}
"""

# One model per limitation of the op table, each with the node that must fall back and why.
LIMITED = {
    "integer TopK": (
        """
        <ir_version: 8, opset_import: ["" : 20]>
        g (int64[batch, 8] x) => (int64[batch, 2] v, int64[batch, 2] i) <int64[1] k = {2}> {
            v, i = TopK(x, k)
        }
        """,
        "TopK",
        r"TopK input 0 is int64",
    ),
    "scatter with reduction": (
        """
        <ir_version: 8, opset_import: ["" : 20]>
        g (float[batch, 4] d, int64[batch, 2] i, float[batch, 2] u) => (float[batch, 4] y) {
            r = Relu(d)
            y = ScatterElements<axis = 1, reduction = "add">(r, i, u)
        }
        """,
        "ScatterElements",
        r"reduction='add'.*opset 16",
    ),
    "data-dependent shape": (
        """
        <ir_version: 8, opset_import: ["" : 20]>
        g (float[batch, 4] x) => (int64[] y) {
            n = NonZero(x)
            y = ReduceSum<keepdims = 0>(n)
        }
        """,
        "NonZero",
        r"known only at run time",
    ),
}

FAST = {"batch_sizes": (2,), "seq_lengths": (16,)}  # one gear, the golden input's own shape


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "npu-sim-cache"


def _compile(model, cache_dir, **options):
    return NpuSimBackend().compile(model, {"cache_dir": cache_dir, **options})


def _tokens(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(seed).integers(0, 256, size=(batch, seq)).astype(np.int64)}


def test_registered_through_its_entry_point_as_a_simulation():
    backend = get_backend("npu-sim")
    assert isinstance(backend, NpuSimBackend)
    assert backend.simulated is True and "simulated" in backend.description
    assert backend.safe_probe().available
    capabilities = backend.capabilities
    assert capabilities.moe_lowerings == ("capacity", "dense") and capabilities.preferred_lowering == "capacity"


def test_op_table_loads_and_every_limitation_has_a_reason():
    table = load_optable()
    data = table.data
    assert len(table.supported_op_types()) > 100
    limitations = [*data["rules"], *data["dtype_sets"].values()]
    limitations += [entry for entry in data["ops"].values() if not entry.get("supported", True)]
    limitations += [limit for entry in data["ops"].values() for limit in entry.get("limits", ())]
    assert len(limitations) > 10
    for limitation in limitations:
        assert limitation["reason"].strip() and limitation["basis"] in data["sources"], limitation
    # The tiny preset's operators are all in the table, and the realistic gaps are there too.
    tiny_ops = "Einsum TopK ScatterElements GatherElements Trilu Range Gemm MatMul Softmax Sigmoid Where Expand"
    assert set(tiny_ops.split()) <= set(data["ops"])
    assert {op for op in ("Einsum", "Trilu", "NonZero") if not table.entry(op).supported} == {
        "Einsum",
        "Trilu",
        "NonZero",
    }


def test_op_table_refuses_a_limitation_without_a_reason():
    data = json.loads(json.dumps(load_optable().data))
    data["ops"]["ScatterND"]["limits"][0]["reason"] = " "
    with pytest.raises(BackendError, match="limit 'attribute' of ScatterND has no reason"):
        _validate(data)
    data["ops"]["ScatterND"]["limits"][0]["reason"] = "x"
    data["ops"]["ScatterND"]["limits"][0]["basis"] = "hearsay"
    with pytest.raises(BackendError, match="basis 'hearsay', not a key of 'sources'"):
        _validate(data)


def test_unsupported_op_in_the_middle_makes_two_partitions_and_four_transfers(cache_dir):
    model = onnx.parser.parse_model(SANDWICH)
    compiled = _compile(model, cache_dir, gears=[{"batch": 2, "seq": 4}], precision="must_keep_origin_dtype")
    report = compiled.report()
    assert [partition["op_types"] for partition in report.partitions] == [{"Relu": 1}, {"Sigmoid": 1}]
    assert list(report.fallbacks) == ["Trilu"] and report.fallbacks["Trilu"]["nodes"] == ["Trilu_1"]
    assert "CANN execution provider" in report.fallbacks["Trilu"]["reasons"][0]
    directions = sorted((t["tensor"], t["direction"], t["bytes"]) for t in report.transfers)
    assert directions == [
        ("a", "device->host", 32),
        ("b", "host->device", 32),
        ("x", "host->device", 32),
        ("y", "device->host", 32),
    ]
    assert compiled.placement() == {"npu-sim device": 2, "host CPU": 1}
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    expected = 1 / (1 + np.exp(-np.triu(np.maximum(x, 0))))
    np.testing.assert_allclose(compiled.run({"x": x})["y"], expected, rtol=1e-6)
    assert compiled.report().runs == {
        "total": 1,
        "per_gear": {"batch=2 seq=4": 1},
        "transferred_bytes": 128,
        "padded_runs_with_dropped_slots": 0,
    }


def test_strict_mode_refuses_fallback_naming_the_nodes(cache_dir):
    model = onnx.parser.parse_model(SANDWICH)
    with pytest.raises(
        BackendError, match=r"strict=True: 1 node\(s\) would fall back to the host CPU: Trilu 'Trilu_1'"
    ):
        _compile(model, cache_dir, gears=[{"batch": 2, "seq": 4}], strict=True)


def test_node_with_only_constant_inputs_is_not_offloaded(cache_dir):
    model = onnx.parser.parse_model(CONSTANT_ADD)
    unfolded = _compile(model, cache_dir, fold_constants=False, batch_sizes=(2,))
    assert unfolded.report().fallbacks["Add"]["reasons"][0].startswith("all inputs are constants")
    assert unfolded.placement() == {"npu-sim device": 1, "host CPU": 1}
    folded = _compile(model, cache_dir, batch_sizes=(2,))
    assert folded.report().folded == {"Add": 1}
    assert folded.placement() == {"npu-sim device": 1, "host CPU": 0, "folded at compile time": 1}
    x = np.ones((2, 2), np.float32)
    for compiled in (unfolded, folded):
        np.testing.assert_allclose(compiled.run({"x": x})["y"], [[4.0, 6.0], [4.0, 6.0]], rtol=1e-3)


def test_contrib_op_falls_back_to_the_host_cpu(cache_dir):
    model = onnx.parser.parse_model(CONTRIB)
    compiled = _compile(model, cache_dir, batch_sizes=(2,), precision="must_keep_origin_dtype")
    report = compiled.report()
    assert report.fallbacks["Gelu"]["reasons"] == [
        "domain 'com.microsoft' is not ai.onnx: " + load_optable().rule_reason("domain")
    ]
    assert len(report.partitions) == 2
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    relu = np.maximum(x, 0).astype(np.float64)
    gelu = 0.5 * relu * (1 + np.vectorize(math.erf)(relu / math.sqrt(2)))
    np.testing.assert_allclose(compiled.run({"x": x})["y"], -gelu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(LIMITED))
def test_limited_nodes_fall_back_and_compute_what_the_cpu_backend_does(case, cache_dir):
    text, op_type, reason = LIMITED[case]
    model = onnx.parser.parse_model(text)
    compiled = _compile(model, cache_dir, batch_sizes=(2,), precision="must_keep_origin_dtype")
    assert op_type in compiled.report().fallbacks
    assert any(re.search(reason, why) for why in compiled.report().fallbacks[op_type]["reasons"])
    rng = np.random.default_rng(1)
    feeds = {}
    for spec in compiled.inputs:
        shape = [2 if dim == "batch" else dim for dim in spec.shape]
        if spec.dtype == "int64" and spec.name == "i":
            feeds[spec.name] = rng.integers(0, 4, size=shape).astype(np.int64)
        elif spec.dtype == "int64":
            feeds[spec.name] = rng.integers(-50, 50, size=shape).astype(np.int64)
        else:
            feeds[spec.name] = (rng.standard_normal(shape) * (rng.random(shape) > 0.5)).astype(np.float32)
    expected = get_backend("cpu").compile(model).run(feeds)
    actual = compiled.run(feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-6)


def test_gears_default_to_ascend_like_profiles_and_pick_the_smallest_that_fits():
    gears = build_gears([TensorSpec("input_ids", "int64", ("batch", "seq"))], NpuSimBackend.option_defaults)
    assert len(gears) == 12 and gears[0].describe() == "batch=1 seq=32" and gears[-1].describe() == "batch=8 seq=512"
    assert select_gear(gears, {"batch": 3, "seq": 40}).describe() == "batch=4 seq=128"
    assert select_gear(gears, {"batch": 1, "seq": 32}).describe() == "batch=1 seq=32"
    single = build_gears([TensorSpec("x", "int64", ("batch", "seq"))], {"batch_sizes": 4, "seq_lengths": "64, 16"})
    assert [gear.describe() for gear in single] == ["batch=4 seq=16", "batch=4 seq=64"]
    with pytest.raises(BackendError, match="must be positive integers"):
        build_gears([TensorSpec("x", "float32", ("batch", "seq"))], {"batch_sizes": "1,two"})
    with pytest.raises(BackendError, match=r"dynamic dimension\(s\) 'tokens'.*give explicit gears"):
        build_gears([TensorSpec("x", "float32", ("tokens", 4))], {})
    with pytest.raises(BackendError, match="neither a fixed size nor a name"):
        build_gears([TensorSpec("x", "float32", (None, 4))], {})
    assert build_gears([TensorSpec("x", "float32", ("tokens", 4))], {"gears": [{"tokens": 8}]}) == [
        Gear((("tokens", 8),))
    ]


def test_padding_to_a_gear_does_not_change_the_result(tiny_bundle, cache_dir):
    feeds = _tokens(3, 20)  # batch 3 and seq 20 both need padding (to 4 and 32)
    expected = get_backend("cpu").compile(tiny_bundle).run(feeds)
    exact_gear = {"gears": [{"batch": 3, "seq": 20}]}
    padded_gear = {"batch_sizes": (1, 4), "seq_lengths": (32,)}
    padded = _compile(tiny_bundle, cache_dir, precision="must_keep_origin_dtype", **padded_gear)
    actual = padded.run(feeds)
    assert padded.report().runs["per_gear"] == {"batch=4 seq=32": 1}
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-4, atol=2e-5)
    # In float16 too, the padded run equals a run at the input's own shape.
    unpadded16 = _compile(tiny_bundle, cache_dir, **exact_gear).run(feeds)
    padded16 = _compile(tiny_bundle, cache_dir, **padded_gear).run(feeds)
    for name, value in unpadded16.items():
        np.testing.assert_allclose(padded16[name], value, rtol=1e-5, atol=1e-5)


def test_input_larger_than_every_gear_is_refused_naming_the_gears(tiny_bundle, cache_dir):
    compiled = _compile(tiny_bundle, cache_dir, batch_sizes=(1, 2), seq_lengths=(16,))
    with pytest.raises(
        InputError, match=r"batch=3 seq=16 is larger than every compiled gear .*batch=1 seq=16; batch=2 seq=16"
    ):
        compiled.run(_tokens(3, 16))


def test_every_precision_mode_passes_conformance_and_fp16_really_computes_in_fp16(tiny_bundle, cache_dir):
    feeds, expected = tiny_bundle.golden_sets()[0]
    rms = {}
    for mode in PRECISION_MODES:
        options = {"cache_dir": cache_dir, "precision": mode, **FAST}
        result = check_backend(tiny_bundle, NpuSimBackend(), options)
        assert result.passed, (mode, result.reason)
        assert result.routing_agreement() == 1.0
        difference = NpuSimBackend().compile(tiny_bundle, options).run(feeds)["logits"] - expected["logits"]
        rms[mode] = float(np.sqrt(np.mean(difference.astype(np.float64) ** 2)))
    # Ascend's ranking: must_keep_origin_dtype > allow_fp32_to_fp16 > allow_mix_precision > force_fp16.
    assert 0 < rms["must_keep_origin_dtype"] < 1e-5
    assert rms["allow_fp32_to_fp16"] > 100 * rms["must_keep_origin_dtype"]
    assert rms["force_fp16"] > rms["allow_mix_precision"] > rms["allow_fp32_to_fp16"]
    compiled = _compile(tiny_bundle, cache_dir, **FAST)
    assert compiled.precision == "force_fp16"
    artifact = onnx.load(compiled.report().gears[0].artifact)
    matmuls = [node for node in artifact.graph.node if node.op_type == "MatMul"]
    # ORT has no float16 MatMul on the CPU, so a float16 MatMul reads operands rounded to float16 ("x__fp16",
    # cast back to float32 as "x__fp16__as_fp32") and its output is rounded to float16 at once.
    rounded = ("__fp16", "__fp16__as_fp32")
    float32_matmuls = [node for node in matmuls if not all(name.endswith(rounded) for name in node.input)]
    rounded_outputs = {node.input[0] for node in artifact.graph.node if node.op_type == "Cast"}
    assert all(node.output[0] in rounded_outputs for node in matmuls if node not in float32_matmuls)
    # Every MatMul is float16 except each MoE layer's router gate (router_fp32, the default), which feeds
    # the TopKs in float32.
    assert len(matmuls) > 10 and len(float32_matmuls) == len(tiny_bundle.routing_outputs)
    topk_inputs = [name for node in artifact.graph.node if node.op_type == "TopK" for name in node.input]
    assert topk_inputs and not any(name.endswith("__fp16") for name in topk_inputs)


def test_cache_hit_is_faster_and_a_corrupt_entry_is_rebuilt(tiny_bundle, cache_dir):
    options = {"batch_sizes": (1, 2), "seq_lengths": (16, 32)}
    started = time.perf_counter()
    first = _compile(tiny_bundle, cache_dir, **options)
    miss_seconds = time.perf_counter() - started
    started = time.perf_counter()
    second = _compile(tiny_bundle, cache_dir, **options)
    hit_seconds = time.perf_counter() - started
    assert first.report().cache["misses"] == 4 and second.report().cache["hits"] == 4
    assert hit_seconds < miss_seconds / 2, (hit_seconds, miss_seconds)
    assert not list(cache_dir.rglob("*.tmp"))  # atomic writes leave no temporary files

    truncated, flipped = (row.artifact for row in second.report().gears[:2])
    with open(truncated, "r+b") as handle:
        handle.truncate(100)
    data = bytearray(open(flipped, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(flipped, "wb").write(bytes(data))
    third = _compile(tiny_bundle, cache_dir, **options)
    statuses = [row.cache for row in third.report().gears]
    assert "truncated" in statuses[0] and "sha256 does not match" in statuses[1]
    assert third.report().cache == {**third.report().cache, "hits": 2, "rebuilt": 2}
    feeds, expected = tiny_bundle.golden_sets()[0]
    np.testing.assert_allclose(third.run(feeds)["logits"], expected["logits"], atol=4e-2, rtol=1e-2)
    assert [row.cache for row in _compile(tiny_bundle, cache_dir, **options).report().gears] == ["hit"] * 4


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PORTABLE_MOE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "npu-sim"
    monkeypatch.delenv("PORTABLE_MOE_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "portable-moe", "npu-sim")


def test_memory_budget_refuses_a_model_that_does_not_fit(tiny_bundle, cache_dir):
    with pytest.raises(
        BackendError, match=r"does not fit npu-sim's device memory: weights .* at the largest gear \(batch=2 seq=16\)"
    ):
        _compile(tiny_bundle, cache_dir, memory_gib=1e-4, **FAST)
    report = _compile(tiny_bundle, cache_dir, **FAST).report()
    assert 0 < report.memory["weight_bytes"] + report.memory["activation_bytes"] < 64 * 2**30


def test_fault_injection_fails_the_nth_run_and_the_compile(tiny_bundle, cache_dir):
    compiled = _compile(tiny_bundle, cache_dir, fail_on_run=2, **FAST)
    feeds = _tokens(2, 16)
    compiled.run(feeds)
    with pytest.raises(BackendError, match=r"simulated device error on run 2 \(fault injected by fail_on_run=2\)"):
        compiled.run(feeds)
    compiled.run(feeds)  # only the Nth run fails
    with pytest.raises(BackendError, match="simulated device error while compiling"):
        _compile(tiny_bundle, cache_dir, fail_on_compile=True, **FAST)
    result = check_backend(tiny_bundle, NpuSimBackend(), {"cache_dir": cache_dir, "fail_on_compile": True, **FAST})
    assert result.status == "error" and "simulated device error" in result.reason


def test_bad_options_are_refused(tiny_bundle, cache_dir):
    with pytest.raises(BackendError, match="option precision must be one of force_fp16, .*got 'fp8'"):
        _compile(tiny_bundle, cache_dir, precision="fp8")
    with pytest.raises(BackendError, match=r"option memory_gib must be a number >= 0, got 'lots'"):
        _compile(tiny_bundle, cache_dir, memory_gib="lots")
    with pytest.raises(BackendError, match=r"has no option\(s\) turbo"):
        _compile(tiny_bundle, cache_dir, turbo=True)
    with pytest.raises(BackendError, match="option strict must be true or false, got 'maybe'"):
        _compile(tiny_bundle, cache_dir, strict="maybe")
    with pytest.raises(BackendError, match="option fail_on_run must be an integer >= 0, got -1"):
        _compile(tiny_bundle, cache_dir, fail_on_run=-1)
    # The command line's -O passes words: "False" means false, not a truthy string.
    sandwich = onnx.parser.parse_model(SANDWICH)
    assert _compile(sandwich, cache_dir, strict="False", gears=[{"batch": 1, "seq": 2}]).report().fallbacks
    with pytest.raises(BackendError, match="strict=True"):
        _compile(sandwich, cache_dir, strict="TRUE", gears=[{"batch": 1, "seq": 2}])


def test_output_axis_that_cannot_be_cut_back_is_refused(cache_dir):
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 20]>
        g (float[batch, 4] x) => (float[n] y) {
            y = Flatten<axis = 0>(x)
        }
        """
    )
    with pytest.raises(BackendError, match="output 'y' axis 0 is 'n', not one of the input dimensions"):
        _compile(model, cache_dir)


def test_report_is_labelled_as_a_simulation_with_an_estimate(tiny_bundle, cache_dir):
    report = _compile(tiny_bundle, cache_dir, **FAST).report()
    text = report.format()
    assert "simulated device" in text and "roofline estimate (not a measurement)" in text
    # The tiny preset runs wholly on the device: shape computations (and the Trilu of the causal mask,
    # which is not on the allowlist) become constants at static shapes and are folded.
    assert report.fallbacks == {} and len(report.partitions) == 1
    assert report.folded["Shape"] > 0 and report.folded["Trilu"] == 1
    assert [t["tensor"] for t in report.transfers] == ["input_ids", "logits", *tiny_bundle.routing_outputs]
    assert report.gears[0].estimate_seconds > 0
    assert json.loads(json.dumps(report.to_dict()))["precision"] == "force_fp16"


def test_concurrent_compiles_of_one_entry_do_not_corrupt_the_cache(cache_dir):
    from concurrent.futures import ThreadPoolExecutor

    model = onnx.parser.parse_model(SANDWICH)
    options = {"cache_dir": cache_dir, "batch_sizes": (1, 2, 4), "seq_lengths": (4, 8)}
    with ThreadPoolExecutor(4) as pool:
        compiled = list(pool.map(lambda _: NpuSimBackend().compile(model, options), range(4)))
    x = np.ones((3, 5), np.float32)
    assert all(np.array_equal(c.run({"x": x})["y"], compiled[0].run({"x": x})["y"]) for c in compiled)
    again = NpuSimBackend().compile(model, options).report()
    assert again.cache["hits"] == 6 and not list(cache_dir.rglob("*.tmp"))


def test_command_line_prints_the_report(tiny_bundle, cache_dir, capsys):
    from backends.npu_sim.__main__ import main

    assert (
        main([str(tiny_bundle.path), "--cache-dir", str(cache_dir), "--batch-sizes", "2", "--seq-lengths", "16"]) == 0
    )
    assert "npu-sim compile report (simulated device" in capsys.readouterr().out
    assert main([str(tiny_bundle.path), "--cache-dir", str(cache_dir), "--seq-lengths", "0"]) == 2
    assert "seq_lengths must be positive integers" in capsys.readouterr().err
    main(
        [
            str(tiny_bundle.path),
            "--cache-dir",
            str(cache_dir),
            "--json",
            "--precision",
            "allow_mix_precision",
            "--seq-lengths",
            "16",
        ]
    )
    assert json.loads(capsys.readouterr().out)["precision"] == "allow_mix_precision"


def test_report_notes_what_padding_does_to_a_capacity_lowering(tiny_bundle, cache_dir):
    import dataclasses

    from portable_moe.backend import as_model_input

    exact = _compile(tiny_bundle, cache_dir, precision="must_keep_origin_dtype", **FAST).report()
    assert exact.notes == []
    capacity = dataclasses.replace(as_model_input(tiny_bundle), moe_lowering="capacity")
    notes = NpuSimBackend().compile(capacity, {"cache_dir": cache_dir, **FAST}).report().notes
    assert len(notes) == 2 and "float16" in notes[0] and "padding to a gear" in notes[1]


def test_padded_runs_that_drop_expert_slots_are_counted(cache_dir):
    # Stands in for a capacity-lowered MoE: an output named dropped_slots_* counts what was dropped.
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 20]>
        g (float[batch, seq] x) => (float[batch, seq] y, int64[] dropped_slots_layer1) {
            y = Relu(x)
            total = ReduceSum<keepdims = 0>(x)
            dropped_slots_layer1 = Cast<to = 7>(total)
        }
        """
    )
    compiled = _compile(model, cache_dir, gears=[{"batch": 1, "seq": 4}], precision="must_keep_origin_dtype")
    assert compiled.run({"x": np.zeros((1, 3), np.float32)})["dropped_slots_layer1"].shape == ()
    compiled.run({"x": np.ones((1, 4), np.float32)})  # drops, but not padded
    assert compiled.report().runs["padded_runs_with_dropped_slots"] == 0
    compiled.run({"x": np.ones((1, 3), np.float32)})  # padded, and drops
    report = compiled.report()
    assert report.runs["padded_runs_with_dropped_slots"] == 1
    assert "1 padded run(s) dropped expert slots" in report.format()
