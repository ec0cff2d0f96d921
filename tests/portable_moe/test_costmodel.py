"""Tests for the roofline cost model (portable_moe/perf/costmodel.py) and its chip table."""

from __future__ import annotations

import json
from importlib import resources

import onnx.parser
import pytest

from portable_moe.errors import ConfigError
from portable_moe.perf.costmodel import (
    Chip,
    NodeWork,
    chip_keys,
    estimate_bundle,
    estimate_model,
    get_chip,
    measure_host_cpu,
    node_work,
)

# [4, 8] x [8, 16] -> [4, 16]: 2*4*8*16 = 1024 FLOPs; 32 + 128 + 64 = 224 elements moved.
MATMUL = """
<ir_version: 8, opset_import: ["" : 20]>
matmul (float[4, 8] a, float[8, 16] b) => (float[4, 16] y) {
    y = MatMul(a, b)
}
"""

# A slow, narrow "chip" whose roofline is easy to work out by hand: 1000 FLOP/s and 1000 B/s.
SLOW = Chip("slow", "slow", "test", peak_tflops=1e-9, memory_gb=1, bandwidth_tbs=1e-9, compute_dtype="float16")


def test_matmul_flops_bytes_and_roofline_by_hand():
    model = onnx.parser.parse_model(MATMUL)
    work, unsized = node_work(model)
    assert unsized == 0 and work == [NodeWork("MatMul_0", "MatMul", 1024.0, 224.0, 0.0)]
    assert work[0].bytes(2) == 448.0 and work[0].bytes(4) == 896.0
    estimate = estimate_model(model, SLOW)
    # compute 1024 / 1000 = 1.024 s beats memory 448 / 1000 = 0.448 s (float16 storage on this chip)
    assert estimate.seconds == pytest.approx(1.024)
    assert estimate.nodes[0].bound == "compute" and estimate.bytes == 448.0
    starved = Chip("starved", "starved", "test", peak_tflops=1e-9, memory_gb=1, bandwidth_tbs=1e-10)
    assert estimate_model(model, starved).seconds == pytest.approx(4.48)
    assert estimate_model(model, starved).nodes[0].bound == "memory"


def test_stored_weights_are_read_in_their_stored_format():
    # The MATMUL product with b stored as int4 blocks (64 codes = 32 bytes, 2 scales) or float16 (128 bytes).
    int4 = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        quantized (float[4, 8] a) => (float[4, 16] y)
        <int4[8, 16] codes = {0}, float[1, 16] scale = {1.0}> {
            b = DequantizeLinear <axis = 0, block_size = 8> (codes, scale)
            y = MatMul(a, b)
        }
        """.replace("{0}", "{" + ", ".join(["1"] * 128) + "}").replace("{1.0}", "{" + ", ".join(["1.0"] * 16) + "}")
    )
    work, unsized = node_work(int4)
    assert unsized == 0
    assert work[0] == NodeWork(work[0].name, "DequantizeLinear", 0.0, 0.0, 0.0)  # once, at load
    # a and y as floats (32 + 64 elements); the weight as stored: 64 bytes of int4 codes + 16 float32 scales.
    assert work[1] == NodeWork(work[1].name, "MatMul", 1024.0, 96.0, 64.0 + 64.0)
    assert work[1].bytes(2) < node_work(onnx.parser.parse_model(MATMUL))[0][0].bytes(2)


def test_dynamic_inputs_are_sized_by_the_shapes_given():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 20]>
        g (float[n, 8] a, float[8, 16] b) => (float[n, 16] y) <int64[1] flat = {-1}, int64[2] back = {-1, 16}> {
            m = MatMul(a, b)
            r = Reshape(m, flat)
            y = Reshape(r, back)
        }
        """
    )
    work, unsized = node_work(model, {"a": (10, 8)})
    assert unsized == 0
    assert work[0].flops == 2 * 10 * 8 * 16 and work[0].float_elements == 10 * 8 + 8 * 16 + 10 * 16
    assert [(item.flops, item.bytes(4)) for item in work[1:]] == [(0.0, 0.0)] * 2  # reshapes are views: free
    with pytest.raises(ConfigError, match="no model input"):
        node_work(model, {"x": (1, 8)})
    with pytest.raises(ConfigError, match="has rank 2, got shape"):
        node_work(model, {"a": (10,)})


def test_gemm_and_einsum_count_every_multiply_add():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 20]>
        g (float[3, 4] x, float[5, 4] w, float[5] bias, float[2, 5, 4] e) => (float[3, 5] y, float[2, 3, 5] z) {
            y = Gemm<transB = 1>(x, w, bias)
            z = Einsum<equation = "th,eih->eti">(x, e)
        }
        """
    )
    work = {item.op_type: item.flops for item in node_work(model)[0]}
    assert work["Gemm"] == 2 * 3 * 5 * 4 + 3 * 5  # products plus the bias
    assert work["Einsum"] == 2 * 3 * 4 * 2 * 5


def test_chip_table_uses_dense_figures_with_sources():
    data = json.loads(resources.files("portable_moe.perf").joinpath("data", "chips.json").read_text())
    assert "no single datasheet" in data["about"]
    by_key = {chip["key"]: chip for chip in data["chips"]}
    assert set(by_key) == {"ascend-910b", "ascend-910c", "h100-sxm", "h200-sxm", "h20"}
    for chip in data["chips"]:
        assert chip["sources"] and all(source.strip() for source in chip["sources"])
        low, high = chip["fp16_tflops_range"]
        assert low <= chip["fp16_tflops"] <= high
    assert by_key["h100-sxm"]["fp16_tflops"] == 989  # not the 1,979 "with sparsity"
    assert all("no Huawei datasheet" in by_key[key]["sources"][0] for key in ("ascend-910b", "ascend-910c"))
    assert get_chip("h200-sxm").bandwidth_tbs == 4.8
    with pytest.raises(ConfigError, match="unknown chip 'b200'; chips: ascend-910b"):
        get_chip("b200")


def test_this_machines_cpu_is_measured_once_per_process():
    cpu = measure_host_cpu()
    assert cpu is measure_host_cpu() and get_chip("cpu") is cpu
    assert cpu.peak_tflops > 0 and cpu.bandwidth_tbs > 0 and cpu.compute_dtype == "float32"
    assert "measured" in cpu.sources[0]


def test_estimate_bundle_on_every_chip(tiny_bundle):
    estimates = estimate_bundle(tiny_bundle, batch=1, seq=1)
    assert [estimate.chip.key for estimate in estimates] == chip_keys()
    by_key = {estimate.chip.key: estimate for estimate in estimates}
    assert all(estimate.seconds > 0 and estimate.label.startswith("roofline estimate") for estimate in estimates)
    # One token is memory-bound: the chip with more bandwidth is faster, whatever its FLOPs.
    assert by_key["h200-sxm"].seconds < by_key["h100-sxm"].seconds
    assert by_key["h20"].seconds < by_key["ascend-910b"].seconds
    assert by_key["h100-sxm"].flops == by_key["cpu"].flops and by_key["cpu"].bytes > by_key["h100-sxm"].bytes
    longer = estimate_bundle(tiny_bundle.path, batch=1, seq=64, chips=["h100-sxm"])[0]
    assert longer.flops > 60 * by_key["h100-sxm"].flops
    with pytest.raises(ConfigError, match="batch and seq must be at least 1"):
        estimate_bundle(tiny_bundle, batch=0, seq=4)
    with pytest.raises(ConfigError, match="unknown chip"):
        estimate_bundle(tiny_bundle, batch=1, seq=4, chips=["h100-sxm", "tpu"])


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (2, 16)])
def test_config_count_agrees_with_the_exported_graph(tiny_bundle, batch, seq):
    # Two independent counts of the same model: from the dense bundle's graph and from its config alone.
    from portable_moe.perf.costmodel import config_work

    graph, _ = node_work(tiny_bundle.load_onnx(), {"input_ids": (batch, seq)})
    config = config_work(tiny_bundle.config, batch, seq, moe_lowering="dense")

    def matmul_flops(work):
        return sum(item.flops for item in work if item.op_type in ("MatMul", "Gemm", "Einsum"))

    assert matmul_flops(config) == pytest.approx(matmul_flops(graph), rel=0.01)
    assert sum(item.flops for item in config) == pytest.approx(sum(item.flops for item in graph), rel=0.05)


def test_deepseek_v3_is_priced_from_its_config_without_building_it():
    from portable_moe.config import get_preset
    from portable_moe.perf.costmodel import config_work, estimate_config

    config = get_preset("deepseek-v3")
    flops = sum(item.flops for item in config_work(config, 1, 1))
    # One token multiplies by every weight it touches once: 2 FLOPs per active parameter, the input
    # embedding (a lookup) aside; attention over one position adds next to nothing.
    active = config.parameter_count()["active_per_token"] - config.vocab_size * config.hidden_size
    assert flops == pytest.approx(2 * active, rel=0.005)
    h100, h200 = estimate_config(config, 1, 1, ["h100-sxm", "h200-sxm"])
    assert h100.flops == h200.flops and h200.seconds < h100.seconds  # decode is bandwidth-bound
    assert h100.bytes >= 2 * active  # float16 weights are read at least once
    with pytest.raises(ConfigError, match="the config-based count knows the sparse and dense lowerings, not 'fused'"):
        config_work(config, 1, 1, "fused")
    with pytest.raises(ConfigError, match="batch and seq must be at least 1"):
        estimate_config(config, 0, 1, ["h100-sxm"])
