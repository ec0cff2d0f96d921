"""Every MoE lowering of the same model and seed agrees with the torch reference, case by case.

One export per lowering serves every case (dynamic batch and sequence), run on ONNX Runtime CPU,
which accepts every lowering.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")

from exporters import LOWERINGS  # noqa: E402
from portable_moe import compare_outputs, get_backend  # noqa: E402
from portable_moe.model import build_model  # noqa: E402


def _ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, seq), dtype=np.int64)


CASES = {
    "decode-batch-1": _ids(1, 1),
    "decode-batch-3": _ids(3, 1, 1),
    "decode-batch-8": _ids(8, 1, 2),
    "prefill-seq-64": _ids(1, 64, 3),
    "prefill-seq-256": _ids(1, 256, 4),
    # One token: k experts get it, every other expert receives no token at all.
    "some-experts-idle": _ids(1, 1, 5),
    # The same token everywhere: attention over identical values gives identical states, so every
    # token is routed to the same experts (8 tokens: within the capacity lowering's floor of 8 slots).
    "all-tokens-same-experts": np.full((2, 4), 17, dtype=np.int64),
}


@pytest.fixture(scope="module", params=sorted(LOWERINGS))
def lowered(request, bundle_factory):
    bundle = bundle_factory("tiny", request.param)
    reference = build_model(bundle.config, bundle.manifest["seed"])  # dense routed experts
    return bundle, reference, get_backend("cpu").compile(bundle)


def _reference_outputs(bundle, reference, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        logits, routing = reference(torch.tensor(input_ids))
    expected = {"logits": logits.numpy(), **{name: r.numpy() for name, r in zip(bundle.routing_outputs, routing)}}
    for spec in bundle.outputs:
        if spec.name.startswith("dropped_slots"):
            expected[spec.name] = np.array(0, dtype=np.int64)  # dropless on every case here
    return expected


@pytest.mark.parametrize("case", list(CASES))
def test_lowering_agrees_with_the_reference(lowered, case):
    bundle, reference, compiled = lowered
    input_ids = CASES[case]
    expected = _reference_outputs(bundle, reference, input_ids)
    actual = compiled.run({"input_ids": input_ids})
    results = compare_outputs(expected, actual, bundle.routing_outputs)
    assert all(r.passed for r in results), [r.message for r in results if not r.passed]
    routing = expected[next(iter(bundle.routing_outputs))].reshape(-1, bundle.config.num_experts_per_tok)
    if case == "some-experts-idle":
        assert len(np.unique(routing)) < bundle.config.n_routed_experts
    if case == "all-tokens-same-experts":
        assert (np.sort(routing, axis=1) == np.sort(routing[0])).all()


def test_lowering_is_recorded_and_checks_on_the_backends_that_take_it(lowered):
    from portable_moe import check_bundle

    bundle, _, _ = lowered
    assert bundle.manifest["moe_lowering"] == bundle.moe_lowering
    takers = [
        name for name in ("cpu", "reference") if bundle.moe_lowering in get_backend(name).capabilities.moe_lowerings
    ]
    assert "cpu" in takers
    assert all(result.passed for result in check_bundle(bundle, takers))
