"""Tests for the fused com.microsoft::MoE lowering of the routed experts (exporters/lowering_fused.py)."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")

import onnx_ir as ir  # noqa: E402  (comes with the export extra, like torch)
from torch.nn import functional  # noqa: E402

from exporters.lowering_fused import (  # noqa: E402
    FUSED_TRANSLATION_TABLE,
    fold_fused_weights,
    routed_experts_fused,
)

HIDDEN, INTER, EXPERTS, TOP_K = 32, 16, 8, 2


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w1 = torch.randn(EXPERTS, INTER, HIDDEN, generator=generator) * 0.2
    w3 = torch.randn(EXPERTS, INTER, HIDDEN, generator=generator) * 0.2
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=generator) * 0.2
    return w1, w3, w2


def _routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=generator)
    ids = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(tokens)])
    # Scaled like normalised weights times a routed_scaling_factor of 2.5, with one exact zero to
    # exercise the clamp before the log.
    weights = torch.rand(tokens, TOP_K, generator=generator) * 2.5
    weights[0, -1] = 0.0
    return hidden, ids, weights


def _naive(hidden, ids, weights, w1, w3, w2) -> torch.Tensor:
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            x = hidden[t]
            out[t] += weights[t, j] * (w2[e] @ (functional.silu(w1[e] @ x) * (w3[e] @ x)))
    return out


class _Routed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        w1, w3, w2 = _weights()
        self.w1, self.w3, self.w2 = (torch.nn.Parameter(w) for w in (w1, w3, w2))

    def forward(self, hidden, ids, weights):
        return routed_experts_fused(hidden, ids, weights, self.w1, self.w3, self.w2)


@pytest.fixture(scope="module")
def exported() -> tuple[ir.Model, int]:
    """One export with a dynamic token count, folded; returns the model and how many MoE were folded.

    The exporter's optimizer already folds the fc1 interleave for tensors as small as these, so it
    is switched off here to leave the interleave for :func:`fold_fused_weights`, as it is at real sizes.
    """
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    program = torch.onnx.export(
        _Routed().eval(),
        _routing(5, seed=1),
        dynamo=True,
        input_names=["hidden", "expert_ids", "expert_weights"],
        output_names=["routed"],
        dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}),
        opset_version=20,
        custom_translation_table=FUSED_TRANSLATION_TABLE,
        optimize=False,
        verbose=False,
    )
    folded = fold_fused_weights(program)
    return program.model, folded


@pytest.fixture(scope="module")
def session(exported: tuple[ir.Model, int]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    proto = ir.to_proto(exported[0])
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_eager_matches_naive(tokens: int) -> None:
    hidden, ids, weights = _routing(tokens, seed=tokens)
    w1, w3, w2 = _weights()
    routed = routed_experts_fused(hidden, ids, weights, w1, w3, w2)
    torch.testing.assert_close(routed, _naive(hidden, ids, weights, w1, w3, w2), rtol=0, atol=1e-5)


def test_graph_is_one_moe_node_with_folded_fc1(exported: tuple[ir.Model, int]) -> None:
    model, folded = exported
    assert folded == 1
    moe_nodes = [node for node in model.graph if node.domain == "com.microsoft"]
    assert [node.op_type for node in moe_nodes] == ["MoE"]
    moe = moe_nodes[0]
    attributes = {name: attr.value for name, attr in moe.attributes.items()}
    assert attributes["k"] == TOP_K
    assert attributes["activation_type"] == "swiglu"
    assert attributes["swiglu_fusion"] == 1
    assert attributes["normalize_routing_weights"] == 1
    assert attributes["activation_alpha"] == 1.0
    assert attributes["activation_beta"] == 0.0
    assert math.isinf(attributes["swiglu_limit"])

    # fc1 is one precomputed initializer with gate and up rows interleaved; w1 and w3 are gone.
    fc1 = moe.inputs[2]
    assert fc1.is_initializer()
    w1, w3, w2 = _weights()
    expected = torch.stack([w1, w3], dim=2).reshape(EXPERTS, 2 * INTER, HIDDEN)
    np.testing.assert_array_equal(fc1.const_value.numpy(), expected.numpy())
    np.testing.assert_array_equal(fc1.const_value.numpy()[:, 0::2], w1.numpy())
    assert moe.inputs[3] is None  # no fc1 bias
    assert set(model.graph.initializers) & {"w1", "w3"} == set()
    assert {node.op_type for node in model.graph} <= {
        "MoE",
        "Max",
        "Log",
        "Shape",
        "Concat",
        "Expand",
        "ScatterElements",
        "ReduceSum",
        "Mul",
        "Constant",
    }


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_ort_matches_naive(session: ort.InferenceSession, tokens: int) -> None:
    hidden, ids, weights = _routing(tokens, seed=10 + tokens)
    w1, w3, w2 = _weights()
    feeds = {"hidden": hidden.numpy(), "expert_ids": ids.numpy(), "expert_weights": weights.numpy()}
    (routed,) = session.run(["routed"], feeds)
    expected = _naive(hidden, ids, weights, w1, w3, w2)
    np.testing.assert_allclose(routed, expected.numpy(), rtol=0, atol=1e-5)


def test_fold_leaves_models_without_interleave_alone() -> None:
    # A MoE node whose fc1 is already an initializer, and a graph with no MoE at all: nothing to do.
    fc1 = ir.Value(name="fc1", const_value=ir.tensor(np.zeros((2, 4, 3), np.float32), name="fc1"))
    hidden = ir.Value(name="hidden", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3]))
    router = ir.Value(name="router", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2]))
    w2 = ir.Value(name="w2", const_value=ir.tensor(np.zeros((2, 3, 2), np.float32), name="w2"))
    node = ir.Node("com.microsoft", "MoE", [hidden, router, fc1, None, w2], num_outputs=1)
    graph = ir.Graph([hidden, router], node.outputs, nodes=[node], initializers=[fc1, w2], opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    assert fold_fused_weights(model) == 0
    assert node.inputs[2] is fc1
