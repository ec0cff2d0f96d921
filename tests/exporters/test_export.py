"""Export: one export serves every batch and sequence size; a graph that breaks parity is never written."""

import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")

from exporters import export_bundle  # noqa: E402
from exporters.lowerings import LOWERINGS, Lowering  # noqa: E402
from exporters.reference_model import build_model  # noqa: E402
from portable_moe import BundleError, ConfigError, ExportError, compare_outputs, get_backend  # noqa: E402


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
    import onnx_ir as ir

    from exporters.reference_model import routed_experts_dense

    def scale_the_logits(model: ir.Model) -> None:
        """Off by 1%: logits times 1.01 (a rewrite gone wrong, after the trace)."""
        logits = next(value for value in model.graph.outputs if value.name == "logits")
        factor = ir.Value(name="broken.factor", const_value=ir.tensor(np.array(1.01, dtype=np.float32)))
        model.graph.register_initializer(factor)
        scaled = ir.node("Mul", [logits, factor], outputs=[ir.Value(name="broken.logits")])
        model.graph.append(scaled)
        logits.name = "logits.unscaled"
        scaled.outputs[0].name = "logits"
        scaled.outputs[0].type, scaled.outputs[0].shape = logits.type, logits.shape
        model.graph.outputs[model.graph.outputs.index(logits)] = scaled.outputs[0]

    module = types.ModuleType("broken_lowering")
    module.routed_experts = routed_experts_dense  # the dense trace (often already cached), broken afterwards
    module.after_export = scale_the_logits
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


def test_export_keeps_older_objects_frozen_only_while_it_runs(tmp_path, monkeypatch):
    import gc

    import exporters.torch_export as torch_export

    frozen_before = gc.get_freeze_count() > 0
    gc.unfreeze()  # start from a process that froze nothing; frozen again at the end if it had
    frozen_during_export = []

    def stop_at_lowering(name):
        frozen_during_export.append(gc.get_freeze_count())
        raise ExportError("stopped inside the export")

    monkeypatch.setattr(torch_export, "get_lowering", stop_at_lowering)
    try:
        with pytest.raises(ExportError, match="stopped inside the export"):
            export_bundle(tmp_path / "x", "tiny")
        assert frozen_during_export[0] > 0
        assert gc.get_freeze_count() == 0
        gc.freeze()  # a caller that froze objects itself keeps them frozen (the count can fall as objects die)
        with pytest.raises(ExportError, match="stopped inside the export"):
            export_bundle(tmp_path / "x", "tiny")
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        if frozen_before:
            gc.freeze()


@pytest.mark.parametrize(
    ("threshold", "collected", "seed"), [(0, True, 3), (2**62, False, 4)], ids=["big weights", "small weights"]
)
def test_big_torch_weights_are_collected_before_onnx_runtime_loads_the_graph(
    tmp_path, monkeypatch, threshold, collected, seed
):
    """A collection walks every object the export made (about 0.4 s): it runs only where the weights
    are big enough for a second copy beside ONNX Runtime's to matter."""
    import gc

    import exporters.torch_export as torch_export
    from exporters.reference_model import MoETransformer

    collect, validate = gc.collect, torch_export.validate_graph
    collections: list[int] = []
    alive: list[bool] = []

    def counting_collect(*args):
        collections.append(len(alive))  # how many validations had run
        return collect(*args)

    def looking(*args, **kwargs):
        alive.append(any(isinstance(thing, MoETransformer) for thing in gc.get_objects()))
        return validate(*args, **kwargs)

    monkeypatch.setattr(torch_export, "_COLLECT_BEFORE_VALIDATION_BYTES", threshold)
    monkeypatch.setattr(torch_export, "validate_graph", looking)
    monkeypatch.setattr(gc, "collect", counting_collect)
    export_bundle(tmp_path / "bundle", "tiny", seed)  # a seed of its own: no other test exports it
    assert (0 in collections) == collected
    assert alive == [False]  # the reference model holds no reference cycle: freed either way


def test_a_bundle_holds_nothing_of_the_machine_that_wrote_it(bundle_factory):
    """torch.onnx records each node's Python stack (absolute paths of this checkout and its venv) and
    memory addresses; the graphs of a bundle keep none of that."""
    from pathlib import Path

    import onnx

    import exporters

    bundle = bundle_factory("tiny", "dense", 2, generation=True)  # the generation tests' bundle
    checkout = str(Path(exporters.__file__).resolve().parent.parent)
    for name in ("model.onnx", "decoder.onnx"):
        data = (bundle.path / name).read_bytes()
        graph = onnx.ModelProto.FromString(data).graph
        assert len(graph.node) > 100
        assert all(not node.metadata_props for node in graph.node), name
        assert checkout.encode() not in data and b"site-packages" not in data and b" at 0x" not in data, name


def test_exported_graph_is_valid_onnx(tiny_bundle):
    import onnx

    onnx.checker.check_model(str(tiny_bundle.model_path), full_check=True)
    proto = tiny_bundle.load_onnx()
    assert {node.op_type for node in proto.graph.node} >= {"TopK", "Sigmoid", "MatMul"}
    assert np.isfinite(tiny_bundle.golden_sets()[0][1]["logits"]).all()
