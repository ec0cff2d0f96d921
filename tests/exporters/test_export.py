"""Export: one export serves every batch and sequence size; a graph that breaks parity is never written."""

import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")

from exporters import export_bundle  # noqa: E402
from exporters.lowerings import LOWERINGS, Lowering  # noqa: E402
from portable_moe import BundleError, ConfigError, ExportError, compare_outputs, get_backend  # noqa: E402
from portable_moe.model import build_model  # noqa: E402


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_one_export_runs_every_batch_and_sequence_length(tiny_bundle, batch):
    model = build_model(tiny_bundle.config, tiny_bundle.manifest["seed"])
    compiled = get_backend("cpu").compile(tiny_bundle)
    generator = torch.Generator().manual_seed(batch)
    for seq in (1, 5, 33, 64):
        ids = torch.randint(0, tiny_bundle.config.vocab_size, (batch, seq), generator=generator)
        with torch.no_grad():
            logits, routing = model(ids)
        expected = {
            "logits": logits.numpy(),
            **{name: r.numpy() for name, r in zip(tiny_bundle.routing_outputs, routing)},
        }
        results = compare_outputs(expected, compiled.run({"input_ids": ids.numpy()}), tiny_bundle.routing_outputs)
        assert all(r.passed for r in results), [r.message for r in results if not r.passed]


def test_v4_routing_exports_and_matches(bundle_factory):
    bundle = bundle_factory("tiny-v4", "dense", seed=1)
    assert bundle.config.scoring_func == "sqrtsoftplus" and bundle.config.n_group == 1
    [(inputs, outputs)] = bundle.golden_sets()
    results = compare_outputs(outputs, get_backend("cpu").compile(bundle).run(inputs), bundle.routing_outputs)
    assert all(r.passed for r in results)


def test_a_graph_that_breaks_parity_writes_no_bundle(tmp_path, monkeypatch):
    from portable_moe.model import routed_experts_dense

    module = types.ModuleType("broken_lowering")
    module.routed_experts = lambda *args: routed_experts_dense(*args) * 1.01
    monkeypatch.setitem(sys.modules, "broken_lowering", module)
    monkeypatch.setitem(LOWERINGS, "broken", Lowering("broken", "off by 1%", "broken_lowering"))
    with pytest.raises(
        ExportError,
        match=r"exported graph disagrees with torch on input shape \[2, 16\]: logits: .*"
        r"no bundle was written",
    ):
        export_bundle(tmp_path / "bad", "tiny", moe_lowering="broken")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(BundleError, match="already exists; choose another directory or pass overwrite"):
        export_bundle(tmp_path / "exists", "tiny")


def test_unknown_lowering_and_preset(tmp_path):
    with pytest.raises(ExportError, match="unknown MoE lowering 'magic'; lowerings: dense"):
        export_bundle(tmp_path / "x", "tiny", moe_lowering="magic")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        export_bundle(tmp_path / "x", "huge")
    with pytest.raises(ConfigError, match="cost estimates only"):
        export_bundle(tmp_path / "x", "deepseek-v3")


def test_exported_graph_is_valid_onnx(tiny_bundle):
    import onnx

    onnx.checker.check_model(str(tiny_bundle.model_path), full_check=True)
    proto = tiny_bundle.load_onnx()
    assert {node.op_type for node in proto.graph.node} >= {"TopK", "Sigmoid", "MatMul"}
    assert np.isfinite(tiny_bundle.golden_sets()[0][1]["logits"]).all()
