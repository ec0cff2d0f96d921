"""Hugging Face checkpoints exported to bundles and checked against transformers on every backend.

Exports are slow (seconds each), so full exports cover every architecture with one lowering and
the dense, sparse and capacity lowerings; the whole architecture x lowering matrix (fused included)
is checked at the level of the MoE block, against transformers' own block, in test_hf_blocks.py, and
every lowering's ONNX translation on the presets in test_lowerings.py. Each bundle is exported
once per session (fixtures in conftest.py).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")
transformers = pytest.importorskip("transformers", reason="Hugging Face export needs pip install 'portable-moe[hf]'")

from portable_moe import check_bundle, cli, get_backend, load_bundle, routing_agreement  # noqa: E402

BACKENDS = ["cpu", "reference", "openvino", "npu-sim"]
DEEPSEEK = "DeepseekV3ForCausalLM"
# (case id, architecture, lowering, export options); "fp8" reads the block-scaled FP8, sharded checkpoint.
CASES = [
    ("deepseek-dense-generation", DEEPSEEK, "dense", {"generation": True}),  # test_hf_generation.py shares it
    ("deepseek-fp8-sparse", "fp8", "sparse", {}),
    ("qwen3-sparse-32-experts", "Qwen3MoeForCausalLM", "sparse", {"golden_batch": 1, "golden_seq": 3}),
    ("qwen2-capacity-external-data", "Qwen2MoeForCausalLM", "capacity", {"external_data_threshold_bytes": 0}),
]
QWEN3_OVERRIDES = {"num_experts": 32, "num_experts_per_tok": 2}


def _checkpoint(hf_checkpoint, fp8_deepseek_checkpoint, architecture):
    if architecture == "fp8":
        return fp8_deepseek_checkpoint
    return hf_checkpoint(architecture, **(QWEN3_OVERRIDES if architecture == "Qwen3MoeForCausalLM" else {}))


@pytest.fixture(params=CASES, ids=[case[0] for case in CASES])
def case(request, hf_checkpoint, fp8_deepseek_checkpoint, hf_bundle):
    _, architecture, lowering, options = request.param
    directory = _checkpoint(hf_checkpoint, fp8_deepseek_checkpoint, architecture)
    return directory, hf_bundle(directory, lowering, **options)


def _transformers_outputs(directory, input_ids):
    """Logits and routed expert ids from transformers' own model, loaded by transformers."""
    from exporters.hf.loading import load_checkpoint
    from exporters.hf.source import transformers_outputs

    return transformers_outputs(load_checkpoint(directory), torch.from_numpy(input_ids))


def test_bundle_conforms_on_every_backend_that_takes_its_lowering(case):
    directory, bundle = case
    names = [name for name in BACKENDS if bundle.moe_lowering in get_backend(name).capabilities.moe_lowerings]
    results = check_bundle(bundle, names)
    for result in results:
        assert result.passed, (result.backend, result.reason)
        assert result.routing_agreement() == 1.0
    source = bundle.manifest["source"]
    assert source["transformers_version"] == transformers.__version__
    assert source["architecture"] in source["config"]["architectures"]
    for name, digest in source["weight_files"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest


def test_golden_data_comes_from_transformers(hf_checkpoint, hf_bundle):
    directory = hf_checkpoint("Qwen2MoeForCausalLM")
    bundle = hf_bundle(directory, "capacity", external_data_threshold_bytes=0)
    (feeds, golden), *_ = bundle.golden_sets()
    expected = _transformers_outputs(directory, feeds["input_ids"])
    np.testing.assert_array_equal(golden["logits"], expected["logits"])
    for name in bundle.routing_outputs:
        np.testing.assert_array_equal(golden[name], expected[name])
    assert set(bundle.routing_outputs) == {"expert_ids_layer1"}  # mlp_only_layers=[0]: layer 0 is dense


def test_experts_no_token_visited_while_tracing_stay_exact_at_any_shape(hf_checkpoint, hf_bundle):
    directory = hf_checkpoint("Qwen3MoeForCausalLM", **QWEN3_OVERRIDES)
    bundle = hf_bundle(directory, "sparse", golden_batch=1, golden_seq=3)
    (feeds, golden), *_ = bundle.golden_sets()
    visited_at_trace = np.unique(golden["expert_ids_layer1"])
    assert len(visited_at_trace) <= 6  # 3 tokens x top-2 of 32 experts: most were never run while tracing
    compiled = get_backend("cpu").compile(bundle)
    generator = np.random.default_rng(7)
    visited = set()
    for shape in ((3, 21), (1, 1), (2, 9)):
        input_ids = generator.integers(0, bundle.config.vocab_size, size=shape, dtype=np.int64)
        expected = _transformers_outputs(directory, input_ids)
        actual = compiled.run({"input_ids": input_ids})
        np.testing.assert_allclose(actual["logits"], expected["logits"], rtol=1e-4, atol=1e-5)
        assert routing_agreement(expected["expert_ids_layer1"], actual["expert_ids_layer1"])[0] == 1.0
        visited |= set(np.unique(actual["expert_ids_layer1"]).tolist())
    assert len(visited - set(visited_at_trace.tolist())) >= 16


def test_external_data_is_written_hashed_and_loaded(hf_checkpoint, hf_bundle):
    bundle = hf_bundle(hf_checkpoint("Qwen2MoeForCausalLM"), "capacity", external_data_threshold_bytes=0)
    import onnx

    data_files = [name for name in bundle.manifest["files"] if name.startswith("model.onnx") and name != "model.onnx"]
    assert data_files, bundle.manifest["files"]
    graph = onnx.load(str(bundle.path / "model.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline_weights = [
        t.name for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024
    ]
    assert len(external) >= 10 and inline_weights == []
    reloaded = load_bundle(bundle.path)
    assert len(reloaded.load_onnx().graph.initializer) > 0


def test_cli_exports_a_checkpoint_with_its_decoder_graph(hf_checkpoint, tmp_path, capfd):
    output = tmp_path / "mixtral"
    directory = hf_checkpoint("MixtralForCausalLM")
    code = cli.main(["export", "--hf", str(directory), "-o", str(output), "--moe-lowering", "dense", "--generation"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    # 2 layers x (key + value) x 2 key/value heads x head dim 8 x 4 bytes
    assert "decoder graph: per-head cache, 256 bytes per token over all layers\n" in captured.out
    bundle = load_bundle(output)
    assert bundle.manifest["source"]["architecture"] == "MixtralForCausalLM"
    assert bundle.routing_outputs == {"expert_ids_layer0": 0, "expert_ids_layer1": 1}
    assert bundle.manifest["generation"]["golden_source"] == "transformers"
    assert cli.main(["check", str(output), "--backend", ",".join(BACKENDS)]) == 0
    # Token by token against transformers' own greedy generate, on each backend that takes the decoder graph.
    # npu-sim keeps the cache in static gears: the rewrite for a preallocated cache holds for
    # transformers' attention (its grouped keys are expanded to the cache's whole length).
    assert cli.main(["check", str(output), "--backend", "cpu,reference,openvino,npu-sim", "--generate", "16"]) == 0
    assert "[E:onnxruntime" not in capfd.readouterr().err
    assert cli.main(["generate", str(output), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    assert "cache through iobinding, preallocated and written in place" in capfd.readouterr().out


def test_a_graph_that_disagrees_with_transformers_fails_with_exit_code_1(hf_checkpoint, hf_bundle):
    from exporters.validation import _check_parity
    from portable_moe.errors import ExportParityError

    bundle = hf_bundle(hf_checkpoint("Qwen2MoeForCausalLM"), "capacity", external_data_threshold_bytes=0)
    (feeds, golden), *_ = bundle.golden_sets()
    wrong = {**golden, "logits": golden["logits"] + 1e-2}
    with pytest.raises(
        ExportParityError, match=r"disagrees with transformers on input shape \[2, 16\].*no bundle was written"
    ):
        _check_parity(bundle.model_path, [(feeds, wrong)], bundle.routing_outputs, reference="transformers")
    assert ExportParityError.exit_code == 1
