"""The torch reference: routing semantics on hand-checkable cases, and two independent
implementations of the routed experts that must agree before anything is compared against them."""

import dataclasses

import pytest

torch = pytest.importorskip("torch", reason="the reference model needs torch (pip install 'portable-moe[export]')")

from exporters.reference_model import (  # noqa: E402
    build_model,
    golden_inputs,
    route,
    routed_experts_dense,
    routed_experts_loop,
)
from portable_moe import ConfigError, get_preset  # noqa: E402


def _router_config(**change):
    """Four experts in two groups, top-2, unscaled and unnormalised unless changed."""
    fields = dict(
        name="router-test",
        vocab_size=8,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=4,
        moe_intermediate_size=4,
        n_routed_experts=4,
        n_shared_experts=0,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        first_k_dense_replace=0,
        norm_topk_prob=False,
    )
    return dataclasses.replace(get_preset("tiny"), **{**fields, **change})


def _route(logits, bias=(0.0, 0.0, 0.0, 0.0), **change):
    # With an identity gate the router logits are the hidden values themselves.
    config = _router_config(**change)
    ids, weights = route(torch.tensor([logits]), torch.eye(4), torch.tensor(bias), config)
    return ids[0].tolist(), weights[0]


def test_bias_changes_the_selection_but_not_the_weights():
    logits = [2.0, 1.0, 0.0, -1.0]
    ids, _ = _route(logits)
    assert ids == [0, 1]
    ids, weights = _route(logits, bias=(0.0, 0.0, 0.0, 2.0))
    assert ids == [3, 0]
    # Weights are the unbiased sigmoid scores of the selected experts.
    torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([-1.0, 2.0])))


def test_group_masking_excludes_experts_of_dropped_groups():
    # Expert 0 has the best single score, but group {2, 3} has the better sum of its two best.
    ids, _ = _route([3.0, -3.0, 2.0, 2.0], n_group=2, topk_group=1)
    assert sorted(ids) == [2, 3]
    # Without group limiting, expert 0 wins.
    ids, _ = _route([3.0, -3.0, 2.0, 2.0])
    assert ids == [0, 2]


def test_normalised_weights_sum_to_the_scaling_factor():
    config = dataclasses.replace(get_preset("tiny"), norm_topk_prob=True)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(32, config.hidden_size, generator=generator)
    gate = torch.randn(config.n_routed_experts, config.hidden_size, generator=generator)
    bias = torch.randn(config.n_routed_experts, generator=generator)
    _, weights = route(hidden, gate, bias, config)
    torch.testing.assert_close(weights.sum(-1), torch.full((32,), config.routed_scaling_factor))


def test_ties_go_to_the_lower_expert_index():
    ids, _ = _route([0.5, 0.5, 0.5, 0.5])
    assert ids == [0, 1]
    ids, _ = _route([0.0, 1.0, 1.0, 1.0])
    assert ids == [1, 2]


@pytest.mark.parametrize(
    ("scoring", "formula"),
    [
        ("sigmoid", torch.sigmoid),
        ("sqrtsoftplus", lambda x: torch.sqrt(torch.nn.functional.softplus(x))),
        ("softmax", lambda x: torch.softmax(x, -1)),
    ],
)
def test_scoring_functions(scoring, formula):
    logits = [1.5, -0.5, 0.25, -2.0]
    ids, weights = _route(logits, scoring_func=scoring)
    expected = formula(torch.tensor(logits))
    assert ids == [0, 2]
    torch.testing.assert_close(weights, expected[[0, 2]])


@pytest.mark.parametrize("preset", ["tiny", "tiny-v4", "tiny-softmax"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_dense_and_loop_over_experts_agree(preset, seed, tokens):
    config = get_preset(preset)
    generator = torch.Generator().manual_seed(100 + seed)
    hidden = torch.randn(tokens, config.hidden_size, generator=generator)
    gate = torch.randn(config.n_routed_experts, config.hidden_size, generator=generator)
    bias = 0.1 * torch.randn(config.n_routed_experts, generator=generator)
    shape = (config.n_routed_experts, config.moe_intermediate_size, config.hidden_size)
    w1, w3 = torch.randn(shape, generator=generator) * 0.1, torch.randn(shape, generator=generator) * 0.1
    w2 = torch.randn(shape[0], shape[2], shape[1], generator=generator) * 0.1
    ids, weights = route(hidden, gate, bias, config)
    dense = routed_experts_dense(hidden, ids, weights, w1, w3, w2)
    loop = routed_experts_loop(hidden, ids, weights, w1, w3, w2)
    torch.testing.assert_close(dense, loop, atol=1e-5, rtol=1e-5)
    assert dense.abs().max() > 0.1  # the comparison is not between two zero tensors


def test_whole_model_agrees_under_both_implementations():
    model = build_model(get_preset("tiny"), seed=0)
    ids = golden_inputs(model.config, seed=0)["input_ids"]
    with torch.no_grad():
        dense_logits, dense_routing = model(ids)
        model.set_routed_experts(routed_experts_loop)
        loop_logits, loop_routing = model(ids)
    torch.testing.assert_close(dense_logits, loop_logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(dense_routing, loop_routing))
    assert len(dense_routing) == len(model.config.moe_layer_indices)
    assert dense_routing[0].shape == (2, 16, model.config.num_experts_per_tok)


def test_weights_are_bit_identical_for_the_same_seed():
    first, second, other = (build_model(get_preset("tiny"), seed=s) for s in (5, 5, 6))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.layers[1].mlp.w1, other.layers[1].mlp.w1)


def test_routing_is_not_degenerate():
    """The golden inputs must exercise many experts, or routing agreement proves little."""
    model = build_model(get_preset("tiny"), seed=0)
    with torch.no_grad():
        _, routing = model(golden_inputs(model.config, seed=0)["input_ids"])
    for ids in routing:
        assert len(torch.unique(ids)) >= model.config.n_routed_experts // 2


def test_cost_estimate_presets_are_never_built():
    with pytest.raises(ConfigError, match="cost estimates only"):
        build_model(get_preset("deepseek-v3"))
