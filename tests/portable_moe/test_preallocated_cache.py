"""The decoder graph rewritten for a preallocated cache written in place (portable_moe/run/preallocated_cache.py),
and the CPU generator that binds each present output to its past's buffer."""

from __future__ import annotations

import numpy as np
import onnx.parser
import pytest

from portable_moe.errors import BackendError
from portable_moe.run.generation import Generator
from portable_moe.run.preallocated_cache import (
    POSITIONS_DIM,
    divide_by_root_mean_square,
    find_cache_pairs,
    static_cache_graph,
    verify_rewrite,
)

# A cache appended along axis 2 whose past length is read through Shape(past, 2, 3).
APPENDING = """
<ir_version: 8, opset_import: ["" : 20]>
appending (float[batch, 1, new, 2] x, float[batch, 1, past, 2] past_key)
    => (float[batch, 1, total, 2] present_key, int64[1] past_length) {
    present_key = Concat <axis = 2> (past_key, x)
    past_length = Shape <start = 2, end = 3> (past_key)
}
"""
# The same cache, but its past is added to, not appended: npu-sim cannot keep it in gears.
NOT_APPENDED = """
<ir_version: 8, opset_import: ["" : 20]>
not_appended (float[batch, 1, new, 2] x, float[batch, 1, past, 2] past_key, float[batch, 1, past, 2] past_value)
    => (float[batch, 1, total, 2] present_key, float[batch, 1, past, 2] y) {
    present_key = Concat <axis = 2> (past_key, x)
    y = Identity(past_value)
}
"""
# An RMS norm as the exporter writes it; the second Reciprocal has two consumers and must stay.
RMS_NORMS = """
<ir_version: 8, opset_import: ["" : 20]>
norms (float[2, 8] x) => (float[2, 8] y, float[2, 8] z) {
    two = Constant <value = float {2.0}> ()
    axes = Constant <value = int64[1] {-1}> ()
    epsilon = Constant <value = float {1e-6}> ()
    square = Pow(x, two)
    mean = ReduceMean(square, axes)
    shifted = Add(mean, epsilon)
    root = Sqrt(shifted)
    inverse = Reciprocal(root)
    y = Mul(x, inverse)
    root2 = Sqrt(shifted)
    inverse2 = Reciprocal(root2)
    scaled = Mul(inverse2, x)
    z = Add(scaled, inverse2)
}
"""


@pytest.fixture(scope="module")
def generation_bundle(bundle_factory):
    return bundle_factory("tiny", "dense", 2, generation=True)


def test_cpu_writes_the_cache_in_place_and_grows_it_when_full(generation_bundle):
    """A cache sized for one position grows as the steps need; every step equals the grown-cache graph's."""
    in_place = Generator(generation_bundle, "cpu")
    grown = Generator(generation_bundle, "cpu", io_binding=False)
    assert in_place._in_place is not None and grown._in_place is None
    expected = grown.generate([5, 17, 3], 20)
    cache, feed, logits = in_place.empty_cache(), np.array([[5, 17, 3]], dtype=np.int64), []
    first = cache.values[0]
    for token in expected.tokens:
        output = in_place.step(feed, cache)
        if output.cache.values[0].shape() == cache.values[0].shape():
            assert output.cache.values[0] is cache.values[0]  # written into the same buffer
        logits.append(output.logits)
        cache, feed = output.cache, np.array([[token]], dtype=np.int64)
    assert cache.values[0] is not first and cache.values[0].shape()[2] >= cache.length == 22
    for got, want in zip(logits, expected.logits):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_rewrite_writes_in_place_and_reads_the_position():
    (pair,) = find_cache_pairs(onnx.parser.parse_model(APPENDING))
    static = static_cache_graph(onnx.parser.parse_model(APPENDING), [pair])
    assert [node.op_type for node in static.graph.node if pair.present in node.output] == ["ScatterElements"]
    # The past length the graph read from Shape(past_key)[2] is now the cache_position input.
    (read,) = [node for node in static.graph.node if node.output[0] == "past_length"]
    assert (read.op_type, list(read.input)) == ("Identity", ["cache_position"])
    assert [value.name for value in static.graph.input][-1] == "cache_position"
    dims = [dim.dim_param or dim.dim_value for dim in static.graph.input[1].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, POSITIONS_DIM, 2]


def test_a_past_that_is_not_appended_is_refused():
    with pytest.raises(BackendError, match="not appended that way: past_value$"):
        find_cache_pairs(onnx.parser.parse_model(NOT_APPENDED))


def test_a_decoder_that_never_reads_the_past_length_is_refused():
    model = onnx.parser.parse_model(APPENDING.replace("past_length = Shape <start = 2, end = 3> (past_key)", ""))
    with pytest.raises(BackendError, match="never reads the past length"):
        static_cache_graph(model, find_cache_pairs(model))


def test_a_shape_across_the_cache_axis_and_others_is_refused():
    model = onnx.parser.parse_model(APPENDING.replace("<start = 2, end = 3>", "<start = 1, end = 3>"))
    with pytest.raises(BackendError, match="reads the shape of 'past_key' across the cache axis and others"):
        static_cache_graph(model, find_cache_pairs(model))


def test_a_rewrite_that_disagrees_with_the_decoder_graph_is_refused():
    model = onnx.parser.parse_model(APPENDING)
    pairs = find_cache_pairs(model)

    def grown(feeds):
        return {"logits": np.zeros(3), "present_key": np.zeros((1, 1, 3, 2), dtype=np.float32)}

    def differs(feeds):
        return {"logits": np.ones(3), "present_key": np.zeros((1, 1, 4, 2), dtype=np.float32)}

    def fails(feeds):
        raise RuntimeError("invalid expand shape")

    verify_rewrite(model, pairs, grown, grown)  # agreeing graphs pass
    with pytest.raises(BackendError, match="does not hold: its logits differ from the decoder graph's by up to 1"):
        verify_rewrite(model, pairs, grown, differs)
    with pytest.raises(BackendError, match="does not run: RuntimeError: invalid expand shape"):
        verify_rewrite(model, pairs, grown, fails)


def test_rms_norms_divide_by_the_root_and_compute_the_same():
    import onnxruntime

    original = onnx.parser.parse_model(RMS_NORMS)
    rewritten = onnx.parser.parse_model(RMS_NORMS)
    assert divide_by_root_mean_square(rewritten) == 1
    ops = [node.op_type for node in rewritten.graph.node]
    assert ops.count("Reciprocal") == 1 and ops.count("Div") == 1  # the shared reciprocal is left alone
    (divide,) = [node for node in rewritten.graph.node if node.op_type == "Div"]
    assert list(divide.input) == ["x", "root"]
    x = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)}
    before, after = (
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
        for model in (original, rewritten)
    )
    for want, got in zip(before, after):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
