"""The in-place decoder's attention as ONNX Runtime's GroupQueryAttention (portable_moe/run/fused_attention.py):
the same tokens and logits as the decoder graph's grown cache, the cache written in its own buffer, and
the unfused graph kept where the fusion does not fit or does not hold."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from portable_moe.compare import tolerance_for
from portable_moe.run import fused_attention
from portable_moe.run.fused_attention import FUSED_OP, fuse_group_query_attention
from portable_moe.run.generation import Generator
from portable_moe.run.preallocated_cache import (
    CACHE_POSITION,
    divide_by_root_mean_square,
    find_cache_pairs,
    static_cache_graph,
)

FLOAT32 = tolerance_for("float32")


@pytest.fixture(scope="module")
def generation_bundle(bundle_factory):
    """The tiny preset's decoder graph, shared with test_generation.py and test_preallocated_cache.py."""
    return bundle_factory("tiny", "dense", 2, generation=True)


@pytest.fixture(scope="module")
def fused(generation_bundle):
    generator = Generator(generation_bundle, "cpu")
    assert generator.writes_in_place and generator.fused_attention
    return generator


@pytest.fixture(scope="module")
def grown(generation_bundle):
    return Generator(generation_bundle, "cpu", io_binding=False)


@pytest.fixture(scope="module")
def static_graph(generation_bundle, grown):
    proto = grown._model_input().proto
    pairs = find_cache_pairs(proto)
    static = static_cache_graph(proto, pairs)
    divide_by_root_mean_square(static)
    return static, [pair.past for pair in pairs]


def test_fused_generation_equals_the_grown_cache(fused, grown):
    """Prefill, then steps through a cache that grows twice (sized for the prompt alone)."""
    expected = grown.generate([5, 17, 3, 9], 16)
    cache, feed = fused.empty_cache(positions=4), np.array([[5, 17, 3, 9]], dtype=np.int64)
    tokens, logits = [], []
    for _ in range(16):
        output = fused.step(feed, cache)
        tokens.append(int(np.argmax(output.logits)))
        logits.append(output.logits)
        cache, feed = output.cache, np.array([[tokens[-1]]], dtype=np.int64)
    assert cache.values[0].shape()[2] >= 19 > 4
    assert tokens == expected.tokens
    np.testing.assert_allclose(logits, expected.logits, rtol=FLOAT32.rtol, atol=FLOAT32.atol)


def test_a_batch_with_a_chunk_after_its_past_equals_the_grown_cache(fused, grown):
    """Batch 2: a prefill, a 3-token chunk (ONNX Runtime's kernel takes it only for one sequence, so it
    runs one token at a time), then decode steps; every position's logits and experts."""
    rng = np.random.default_rng(0)
    vocab = fused.config.vocab_size
    blocks = [rng.integers(0, vocab, (2, new)) for new in (4, 3, 1, 1)]
    in_place = fused._in_place
    heads, head_dim = fused.spec.cache_shape[1], fused.spec.cache_shape[3]
    values = in_place.allocate((2, heads, 12, head_dim))
    past = {name: np.zeros((2, heads, 0, head_dim), np.float32) for name in fused.spec.past}
    length = 0
    for ids in blocks:
        expected = grown.compiled.run({"input_ids": ids, **past})
        actual = in_place.run(ids, values, length)
        assert actual["logits"].shape == expected["logits"].shape
        np.testing.assert_allclose(actual["logits"], expected["logits"], rtol=FLOAT32.rtol, atol=FLOAT32.atol)
        for name in grown.spec.routing_outputs:
            np.testing.assert_array_equal(actual[name], expected[name])
        past = {name: expected[present] for name, present in zip(fused.spec.past, fused.spec.present)}
        length += ids.shape[1]


def test_the_fused_node_writes_the_cache_in_its_own_buffer(fused):
    cache = fused.empty_cache(positions=8)
    output = fused.step(np.array([[1, 2, 3]], dtype=np.int64), cache)
    output = fused.step(np.array([[4]], dtype=np.int64), output.cache)
    assert output.cache.values[0] is cache.values[0]
    written = fused._in_place._binding.get_outputs()[: len(cache.values)]
    assert [value.data_ptr() for value in written] == [value.data_ptr() for value in cache.values]
    key = cache.values[0].numpy()
    assert np.abs(key[:, :, 3]).max() > 0 and np.abs(key[:, :, 4:]).max() == 0  # position 3 written, no more


def test_a_fusion_that_does_not_hold_falls_back_to_the_unfused_graph(generation_bundle, grown, monkeypatch):
    """A fused graph whose scale is wrong runs, but differs from the decoder graph: it is not used."""
    fuse = fused_attention.fuse_group_query_attention

    def wrong_scale(*args, **kwargs):
        model = fuse(*args, **kwargs)
        for node in model.graph.node:
            if node.op_type == FUSED_OP:
                next(attribute for attribute in node.attribute if attribute.name == "scale").f *= 2
        return model

    monkeypatch.setattr(fused_attention, "fuse_group_query_attention", wrong_scale)
    generator = Generator(generation_bundle, "cpu")
    assert generator.writes_in_place and not generator.fused_attention
    result = generator.generate([5, 17, 3], 4)
    assert result.tokens == grown.generate([5, 17, 3], 4).tokens


def test_each_layer_attention_becomes_one_fused_node(static_graph, generation_bundle):
    static, pasts = static_graph
    model = fuse_group_query_attention(static, pasts, 64)
    nodes = model.graph.node
    assert sum(node.op_type == FUSED_OP for node in nodes) == generation_bundle.config.num_hidden_layers
    # What the fused node does itself is gone: the cache writes, the softmax, the rotary's halves.
    assert not [node for node in nodes if node.op_type == "ScatterElements" and node.input[0] in pasts]
    assert not {"Softmax", "Neg"} & {node.op_type for node in nodes}
    (cos_cache,) = [tensor for tensor in model.graph.initializer if tensor.name.endswith("cos_cache")]
    assert list(cos_cache.dims) == [64, 8]  # every position, half the tiny preset's head size of 16
    assert {opset.domain for opset in model.opset_import} >= {"", "com.microsoft"}


def _changed(static: onnx.ModelProto, op_type: str, change) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(static)
    for node in [node for node in model.graph.node if node.op_type == op_type]:
        change(model.graph, node)
    return model


def _fill_with(value: float):
    def change(graph, node):
        name = f"fill_{node.name}"
        graph.initializer.append(helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]))
        node.input[1] = name

    return change


def _set_attribute(name: str, value: int):
    def change(graph, node):
        kept = [attribute for attribute in node.attribute if attribute.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(name, value)])

    return change


@pytest.mark.parametrize(
    ("op_type", "change"),
    [
        ("Where", _fill_with(-1e4)),  # masked with a finite value, not -inf
        ("Softmax", _set_attribute("axis", 2)),  # normalised over the queries
        ("Split", _set_attribute("axis", 2)),  # rotary halves taken on another axis
    ],
    ids=["finite-mask", "softmax-axis", "rotary-axis"],
)
def test_an_attention_that_is_not_the_pattern_is_left_alone(static_graph, op_type, change):
    static, pasts = static_graph
    assert fuse_group_query_attention(_changed(static, op_type, change), pasts, 64) is None


def test_rotary_tables_that_depend_on_the_tokens_are_not_fused(static_graph):
    """The tables are computed once from positions; if the graph's angles read the token ids, no fusion."""
    static, pasts = static_graph

    def from_tokens(graph, node):
        if node.output[0] == CACHE_POSITION or CACHE_POSITION not in node.input:
            return
        ids = f"ids_as_position_{node.name}"
        graph.node.insert(0, helper.make_node("ReduceMax", ["input_ids"], [ids], keepdims=1))
        node.input[list(node.input).index(CACHE_POSITION)] = ids

    model = _changed(static, "Identity", from_tokens)
    assert fuse_group_query_attention(model, pasts, 64) is None
