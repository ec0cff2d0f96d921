"""Every architecture x every lowering, at the level of the MoE block: the module that replaces a
transformers MoE block for export (``LoweredMoEBlock`` running the lowering's routed experts) against
transformers' own block on the same hidden states, outputs and routed expert ids.

Full ONNX exports (tests/exporters/test_hf_export.py) cover each architecture with one lowering and
DeepSeek-V3 with every lowering; this matrix covers every pair in torch, in about a second each.
Blocks have 64 experts; the first two inputs (4 and 3 tokens) leave most of them unvisited, the
third (40 tokens) reaches many. That unvisited experts stay exact after *tracing* is a property of
the exported graph, checked by a full export in test_hf_export.py.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")
pytest.importorskip("transformers", reason="Hugging Face export needs pip install 'portable-moe[hf]'")

from exporters.hf.architectures import ARCHITECTURES  # noqa: E402
from exporters.hf.model import LoweredMoEBlock  # noqa: E402
from exporters.lowerings import LOWERINGS, get_lowering  # noqa: E402

EXPERTS = 64
# Many experts, each architecture's own routing knobs (DeepSeek: 8 groups, 3 eligible, top-6).
OVERRIDES = {
    "DeepseekV3ForCausalLM": dict(n_routed_experts=EXPERTS, n_group=8, topk_group=3, num_experts_per_tok=6),
    "Qwen3MoeForCausalLM": dict(num_experts=EXPERTS, num_experts_per_tok=4),
    "Qwen2MoeForCausalLM": dict(num_experts=EXPERTS, num_experts_per_tok=4),
    "MixtralForCausalLM": dict(num_local_experts=EXPERTS, num_experts_per_tok=2),
}
# Two short inputs [batch, seq] (4 and 3 tokens: most experts unvisited), then 40 tokens.
SHAPES = ((2, 2), (1, 3), (2, 20))


def test_the_matrix_names_every_architecture_and_lowering():
    assert set(OVERRIDES) == set(ARCHITECTURES)
    assert set(LOWERINGS) == {"dense", "sparse", "capacity", "fused"}


@pytest.fixture(scope="module", params=sorted(OVERRIDES))
def transformers_block(request, hf_random_model):
    """(architecture, the last layer's MoE block, [(hidden, transformers' output, its expert ids)])."""
    name = request.param
    model = hf_random_model(name, **OVERRIDES[name])
    model.set_experts_implementation("eager")  # transformers' loop over experts: the plainest reference
    block = model.model.layers[-1].mlp
    captured = []
    hook = block.gate.register_forward_hook(lambda module, args, output: captured.append(output[2]))
    generator = torch.Generator().manual_seed(11)
    cases = []
    with torch.no_grad():
        for shape in SHAPES:
            hidden = torch.randn(*shape, model.config.hidden_size, generator=generator)
            output = block(hidden)
            cases.append((hidden, output, captured.pop().reshape(*shape, -1)))
    hook.remove()
    visited = set(torch.cat([ids.reshape(-1) for _, _, ids in cases[:2]]).tolist())
    assert len(visited) < EXPERTS // 2  # most experts see no token in the short inputs
    # Built last: it takes over the block's expert weights (transformers' block cannot run after).
    return ARCHITECTURES[name], LoweredMoEBlock(block, ARCHITECTURES[name]).eval(), cases


@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
def test_lowered_block_matches_transformers(transformers_block, lowering):
    architecture, lowered, cases = transformers_block
    top_k = cases[0][2].shape[-1]
    # Capacity: one slot per token for every expert, so that nothing can be dropped.
    options = {"capacity_factor": EXPERTS / top_k} if lowering == "capacity" else {}
    lowered.routed_experts = get_lowering(lowering).routed_experts(options)
    for hidden, expected, expected_ids in cases:
        with torch.no_grad():
            output, expert_ids, dropped = lowered(hidden)
        # The same experts per token (order within a token's top-k is not part of the contract).
        assert torch.equal(expert_ids.sort(dim=-1).values, expected_ids.sort(dim=-1).values), architecture.name
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        if lowering == "capacity":
            assert int(dropped) == 0
        else:
            assert dropped is None
