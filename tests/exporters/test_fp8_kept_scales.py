"""int8/int4 weights of a block-wise FP8 checkpoint keep its block scales (the weight pass on an
exported bundle, with the checkpoint's FP8 blocks beside it).

The bundle is the FP8 sparse export test_hf_export.py checks (exported once per session); the pass
runs here on its already-exported graph, not in a new export.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reading FP8 checkpoints needs torch (pip install 'portable-moe[export]')")
pytest.importorskip("transformers", reason="Hugging Face export needs pip install 'portable-moe[hf]'")

from onnx import numpy_helper  # noqa: E402

from exporters.fp8_sources import fp8_sources_of_checkpoint  # noqa: E402
from exporters.weight_formats import plan_weights, quantize  # noqa: E402
from exporters.weight_pass import apply_weight_plan, convert_weights, fold_weight_preparation  # noqa: E402

TILE = 16  # the fixture checkpoint's weight_block_size


@pytest.fixture(scope="module")
def fp8_export(fp8_deepseek_checkpoint, hf_bundle):
    """(checkpoint directory, float32 bundle exported from it, its FP8 sources)."""
    bundle = hf_bundle(fp8_deepseek_checkpoint, "sparse")
    return fp8_deepseek_checkpoint, bundle, fp8_sources_of_checkpoint(fp8_deepseek_checkpoint)


def _fp8_weights(directory):
    """FP8 weight name -> (e4m3 values as float32 by torch's own conversion, scale_inv), read with safetensors."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return {
        name: (tensor.float().numpy(), tensors[name + "_scale_inv"].numpy())
        for name, tensor in tensors.items()
        if tensor.dtype == torch.float8_e4m3fn
    }


def _reference(values, scale_inv, bits, block_size):
    """Codes and scales from the FP8 blocks, written out: per block of one row, scale = scale_inv * max|e4m3| / qmax."""
    qmax = 2 ** (bits - 1) - 1
    rows, columns = values.shape
    blocks = values.reshape(rows, columns // block_size, block_size)
    relative = np.abs(blocks).max(axis=2) / np.float32(qmax)
    relative = np.where(relative > 0, relative, np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint(blocks / relative[..., None]), -qmax, qmax).astype(np.int8).reshape(rows, columns)
    tile_scale = np.repeat(scale_inv, TILE, 0)[:rows][:, np.arange(columns // block_size) * block_size // TILE]
    return codes, (relative * tile_scale).astype(np.float32)


def _graph_weights(bundle):
    """The exported float32 initializers by name, per-expert weights folded out of their stacks as the pass does."""
    proto = bundle.load_onnx()
    fold_weight_preparation(proto)
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}


@pytest.mark.parametrize(("weights", "block_size"), [("int8", 16), ("int4", 16)])
def test_fp8_weights_keep_their_block_scales_bit_for_bit(fp8_export, weights, block_size):
    directory, bundle, sources = fp8_export
    converted, record = convert_weights(
        bundle.load_onnx(), weights, block_size, routing_outputs=list(bundle.routing_outputs), fp8_sources=sources
    )
    stored = {tensor.name: numpy_helper.to_array(tensor) for tensor in converted.graph.initializer}
    fp8 = _fp8_weights(directory)
    # Which exported weights are an FP8 weight's dequantization, found here with torch's float8 conversion.
    by_value = {
        (values * np.repeat(np.repeat(scale, TILE, 0), TILE, 1)[: values.shape[0], : values.shape[1]]).tobytes(): name
        for name, (values, scale) in fp8.items()
    }
    bits = 8 if weights == "int8" else 4
    kept = {name for name, entry in record["tensors"].items() if entry.get("scales") == "fp8"}
    matched = set()
    for name, array in _graph_weights(bundle).items():
        entry = record["tensors"].get(name, {})
        if "axis" not in entry:
            continue
        matrix = np.ascontiguousarray(np.moveaxis(array, entry["axis"], -1))
        source = by_value.get(matrix.tobytes()) if matrix.ndim == 2 else None
        if source is None:
            continue
        matched.add(name)
        codes, scales = _reference(*fp8[source], bits, block_size)
        got_codes = stored[f"{name}.q{bits}"]
        np.testing.assert_array_equal(np.moveaxis(got_codes, entry["axis"], -1), codes)
        np.testing.assert_array_equal(np.moveaxis(stored[f"{name}.scale"], entry["axis"], -1), scales)
        # Against dequantize-then-requantize: the same codes but where the two float32 roundings of a
        # value at a half-way point differ (at most one code), and scales within float32 rounding.
        requantized, requantized_scales = quantize(array, bits, block_size, entry["axis"])
        assert np.abs(got_codes.astype(np.int16) - requantized).max() <= 1
        np.testing.assert_allclose(stored[f"{name}.scale"], requantized_scales, rtol=1e-6)
    assert matched and kept == matched
    assert record["fp8_scales"] == {"kept": len(kept), "fallback": None}


def test_per_channel_scales_fall_back_and_say_so_once(fp8_export, tmp_path):
    _, bundle, sources = fp8_export
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(bundle.load_onnx().SerializeToString())
    said = []
    record = apply_weight_plan(model_path, plan_weights("int8", 0), list(bundle.routing_outputs), said.append, sources)
    assert record["fp8_scales"]["kept"] == 0
    assert "one int8 scale per output channel spans 16x16 FP8 tiles" in record["fp8_scales"]["fallback"]
    fp8_lines = [line for line in said if "FP8" in line]
    assert fp8_lines == [f"FP8 source: block scales not kept: {record['fp8_scales']['fallback']}"]
    assert not any(entry.get("scales") for entry in record["tensors"].values())
    assert record["converted"] > 0


def test_fallback_reasons_name_the_layout_that_does_not_fit(fp8_export):
    sources = fp8_export[2]
    assert sources.tile == (16, 16) and len(sources) > 0
    assert sources.fallback_reason("int8", 16) is None
    assert "block size 32 does not divide the FP8 tile width 16" in sources.fallback_reason("int4", 32)
    assert "bfloat16 weights are float" in sources.fallback_reason("bfloat16", 0)


def test_a_checkpoint_without_fp8_weights_has_no_fp8_sources(hf_checkpoint):
    assert fp8_sources_of_checkpoint(hf_checkpoint("DeepseekV3ForCausalLM")) is None
