"""Tests for the static-capacity lowering of the routed experts (exporters/lowering_capacity.py)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")

from torch.nn import functional  # noqa: E402

from exporters.lowering_capacity import expert_capacity, routed_experts_capacity  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K = 32, 16, 8, 2
# The exported configuration: C = max(1, ceil(T * 2 / 8)), tight enough that random routing drops.
FACTOR, MIN_CAPACITY = 1.0, 1


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
    # Scaled like normalised weights times a routed_scaling_factor of 2.5.
    weights = torch.rand(tokens, TOP_K, generator=generator) * 2.5
    return hidden, ids, weights


def _naive(hidden, ids, weights, w1, w3, w2, kept=None) -> torch.Tensor:
    """Token by token, slot by slot; ``kept`` [T, k] masks out dropped slots."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            if kept is not None and not kept[t, j]:
                continue
            e = int(ids[t, j])
            x = hidden[t]
            out[t] += weights[t, j] * (w2[e] @ (functional.silu(w1[e] @ x) * (w3[e] @ x)))
    return out


def _kept_slots(ids: torch.Tensor, capacity: int) -> torch.Tensor:
    """The drop rule spelled out: slot index first, then token index, first come first served."""
    load = [0] * EXPERTS
    kept = torch.zeros(ids.shape, dtype=torch.bool)
    for j in range(ids.shape[1]):
        for t in range(ids.shape[0]):
            e = int(ids[t, j])
            if load[e] < capacity:
                kept[t, j] = True
                load[e] += 1
    return kept


class _Routed(torch.nn.Module):
    def __init__(self, capacity_factor: float, min_capacity: int) -> None:
        super().__init__()
        w1, w3, w2 = _weights()
        self.w1, self.w3, self.w2 = (torch.nn.Parameter(w) for w in (w1, w3, w2))
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity

    def forward(self, hidden, ids, weights):
        return routed_experts_capacity(
            hidden, ids, weights, self.w1, self.w3, self.w2, self.capacity_factor, self.min_capacity
        )


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    """One export with a dynamic token count, shared by every ONNX Runtime check."""
    module = _Routed(FACTOR, MIN_CAPACITY).eval()
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    program = torch.onnx.export(
        module,
        _routing(5, seed=1),
        dynamo=True,
        input_names=["hidden", "expert_ids", "expert_weights"],
        output_names=["routed", "dropped_count"],
        dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}),
        opset_version=20,
        verbose=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, hidden, ids, weights) -> tuple[np.ndarray, np.ndarray]:
    feeds = {"hidden": hidden.numpy(), "expert_ids": ids.numpy(), "expert_weights": weights.numpy()}
    routed, dropped = session.run(["routed", "dropped_count"], feeds)
    return routed, dropped


# A hand-checkable case with C = max(1, ceil(1.0 * 5 * 2 / 8)) = 2:
#   first choices:  t0 -> 1, t1 -> 0, t2 -> 0, t3 -> 3, t4 -> 0 (expert 0 already holds t1, t2)
#   second choices: t0 -> 0 (full), t1 -> 1, t2 -> 2, t3 -> 0 (full), t4 -> 5
# so t4's first choice and the second choices of t0 and t3 are dropped: a first choice beats an
# earlier token's second choice, and inside one slot index the lower token wins.
_HAND_IDS = torch.tensor([[1, 0], [0, 1], [0, 2], [3, 0], [0, 5]])
_HAND_KEPT = torch.tensor([[True, False], [True, True], [True, True], [True, False], [False, True]])


def test_capacity_formula() -> None:
    assert expert_capacity(5, 2, 8, 1.0, 1) == 2
    assert expert_capacity(1, 2, 8, 1.0, 1) == 1
    assert expert_capacity(1, 2, 8, 1.0, 3) == 3
    # Exact ceiling: 1.1 * 40 * 2 / 8 is 11 (floating point would say 11.000000000000002 -> 12).
    assert expert_capacity(40, 2, 8, 1.1, 1) == 11
    assert expert_capacity(41, 2, 8, 1.1, 1) == 12
    # capacity_factor = E / k gives one slot per token: nothing can drop.
    assert expert_capacity(7, 2, 8, 4.0, 1) == 7


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_eager_no_drops_matches_naive(tokens: int) -> None:
    hidden, ids, weights = _routing(tokens, seed=tokens)
    w1, w3, w2 = _weights()
    routed, dropped = routed_experts_capacity(hidden, ids, weights, w1, w3, w2, EXPERTS / TOP_K, 1)
    assert dropped.dtype == torch.int64 and dropped.shape == () and int(dropped) == 0
    torch.testing.assert_close(routed, _naive(hidden, ids, weights, w1, w3, w2), rtol=0, atol=1e-5)


def test_eager_hand_checked_drops() -> None:
    hidden, _, weights = _routing(5, seed=3)
    w1, w3, w2 = _weights()
    assert torch.equal(_kept_slots(_HAND_IDS, 2), _HAND_KEPT)
    routed, dropped = routed_experts_capacity(hidden, _HAND_IDS, weights, w1, w3, w2, FACTOR, MIN_CAPACITY)
    assert int(dropped) == 3
    expected = _naive(hidden, _HAND_IDS, weights, w1, w3, w2, kept=_HAND_KEPT)
    torch.testing.assert_close(routed, expected, rtol=0, atol=1e-5)


def test_eager_all_to_one_expert() -> None:
    # Every token's first choice is expert 0 and C = 2: only tokens 0 and 1 get through there.
    hidden, _, weights = _routing(6, seed=4)
    ids = torch.stack([torch.zeros(6, dtype=torch.int64), torch.arange(1, 7)], dim=1)
    w1, w3, w2 = _weights()
    routed, dropped = routed_experts_capacity(hidden, ids, weights, w1, w3, w2, 0.5, 2)
    assert int(dropped) == 4
    kept = torch.ones(6, 2, dtype=torch.bool)
    kept[2:, 0] = False
    torch.testing.assert_close(routed, _naive(hidden, ids, weights, w1, w3, w2, kept=kept), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_ort_matches_drop_rule(session: ort.InferenceSession, tokens: int) -> None:
    hidden, ids, weights = _routing(tokens, seed=10 + tokens)
    w1, w3, w2 = _weights()
    capacity = expert_capacity(tokens, TOP_K, EXPERTS, FACTOR, MIN_CAPACITY)
    kept = _kept_slots(ids, capacity)
    routed, dropped = _run(session, hidden, ids, weights)
    assert dropped.dtype == np.int64 and dropped.shape == ()
    assert int(dropped) == int((~kept).sum())
    expected = _naive(hidden, ids, weights, w1, w3, w2, kept=kept)
    np.testing.assert_allclose(routed, expected.numpy(), rtol=0, atol=1e-5)
    if tokens == 64:
        assert int(dropped) > 0  # the random case really exercises dropping


def test_ort_hand_checked_drops(session: ort.InferenceSession) -> None:
    hidden, _, weights = _routing(5, seed=3)
    w1, w3, w2 = _weights()
    routed, dropped = _run(session, hidden, _HAND_IDS, weights)
    assert int(dropped) == 3
    expected = _naive(hidden, _HAND_IDS, weights, w1, w3, w2, kept=_HAND_KEPT)
    np.testing.assert_allclose(routed, expected.numpy(), rtol=0, atol=1e-5)


def test_rejects_bad_arguments() -> None:
    hidden, ids, weights = _routing(2, seed=5)
    w1, w3, w2 = _weights()
    with pytest.raises(ValueError, match="capacity_factor"):
        routed_experts_capacity(hidden, ids, weights, w1, w3, w2, 0.0, 1)
    with pytest.raises(ValueError, match="min_capacity"):
        routed_experts_capacity(hidden, ids, weights, w1, w3, w2, 1.0, 0)
