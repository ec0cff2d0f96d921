"""Generation with a cache: the decoder graph against torch and the full-sequence graph, the golden
continuation on every backend that runs here, sampling, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend
from portable_moe import load_bundle, registry
from portable_moe.errors import BackendError, InputError
from portable_moe.run.generation import Cache, Generator, check_sampling, choose_token, decoder_spec


@pytest.fixture(scope="module")
def generation_bundle(bundle_factory):
    """The tiny preset (seed 2: its own weights) with its decoder graph, from the shared factory."""
    return bundle_factory("tiny", "dense", 2, generation=True)


@pytest.fixture(scope="module")
def cpu_generator(generation_bundle):
    return Generator(generation_bundle, "cpu")


def test_cached_decode_equals_full_sequence_recomputation_in_torch():
    torch = pytest.importorskip("torch", reason="needs torch (pip install 'portable-moe[export]')")
    from exporters.decode_graph import cache_names, cached_decoder, empty_cache
    from exporters.reference_model import build_model, golden_inputs
    from portable_moe.config import get_preset

    config = get_preset("tiny")
    model = build_model(config, seed=3)
    ids = golden_inputs(config, seed=3, batch=2, seq=9)["input_ids"]
    with torch.no_grad():
        full_logits, full_routing = model(ids)
    decoder = cached_decoder(model)
    past_names, _ = cache_names(config)
    past = [torch.from_numpy(value) for value in empty_cache(config, batch=2)]
    pieces, routing_pieces = [], []
    # Prefill 4 positions, then one position per step.
    for start, stop in [(0, 4), *((position, position + 1) for position in range(4, 9))]:
        with torch.no_grad():
            logits, *rest = decoder(ids[:, start:stop], *past)
        past = rest[: len(past_names)]
        pieces.append(logits)
        routing_pieces.append(rest[len(past_names) :])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full_logits, rtol=1e-4, atol=1e-5)
    for layer_index, expected in enumerate(full_routing):
        got = torch.cat([step[layer_index] for step in routing_pieces], dim=1)
        assert torch.equal(got, expected)
    assert past[0].shape[2] == 9


def test_manifest_lists_the_decoder_and_the_golden_continuation(generation_bundle):
    spec = decoder_spec(generation_bundle)
    assert spec.file in generation_bundle.manifest["files"]
    assert len(spec.golden["tokens"]) == 32 and len(spec.golden["expert_ids"]) == 32
    assert set(spec.golden["expert_ids"][0]) == {str(layer) for layer in generation_bundle.config.moe_layer_indices}


@pytest.mark.parametrize("io_binding", [True, False], ids=["iobinding", "numpy"])
def test_greedy_on_cpu_equals_the_torch_golden(generation_bundle, io_binding):
    generator = Generator(generation_bundle, "cpu", io_binding=io_binding)
    golden = generator.spec.golden
    result = generator.generate(golden["prompt_ids"], len(golden["tokens"]))
    assert result.io == ("iobinding" if io_binding else "numpy")
    assert generator.writes_in_place == io_binding
    assert result.tokens == golden["tokens"]
    assert [{str(k): v for k, v in step.items()} for step in result.expert_ids] == golden["expert_ids"]


@pytest.mark.parametrize("backend", ["reference", "openvino"])
def test_greedy_on_other_backends_equals_the_torch_golden(generation_bundle, backend):
    probe = registry.get_backend(backend).safe_probe()
    if not probe.available:
        pytest.skip(f"{backend} is unavailable here: {probe.reason}")
    generator = Generator(generation_bundle, backend)
    golden = generator.spec.golden
    assert generator.generate(golden["prompt_ids"], len(golden["tokens"])).tokens == golden["tokens"]


def test_cached_decode_on_cpu_equals_the_full_sequence_graph(generation_bundle, cpu_generator):
    """Each step's logits equal model.onnx run on the whole sequence so far (no cache)."""
    full = registry.get_backend("cpu").compile(generation_bundle)
    prompt = [5, 17, 3, 60]
    result = cpu_generator.generate(prompt, 5)
    sequence = np.array([prompt + result.tokens[:-1]], dtype=np.int64)
    outputs = full.run({"input_ids": sequence})
    for step, logits in enumerate(result.logits):
        np.testing.assert_allclose(logits, outputs["logits"][0, len(prompt) - 1 + step], rtol=1e-4, atol=1e-5)
        for name, layer in generation_bundle.routing_outputs.items():
            assert sorted(result.expert_ids[step][layer]) == sorted(outputs[name][0, len(prompt) - 1 + step].tolist())


def test_seeded_sampling_is_reproducible(cpu_generator):
    first = cpu_generator.generate([1, 2, 3], 6, temperature=1.0, top_k=20, seed=7)
    second = cpu_generator.generate([1, 2, 3], 6, temperature=1.0, top_k=20, seed=7)
    assert first.tokens == second.tokens
    greedy = cpu_generator.generate([1, 2, 3], 6)
    top_one = cpu_generator.generate([1, 2, 3], 6, temperature=0.8, top_k=1, seed=1)
    assert top_one.tokens == greedy.tokens  # top-k 1 leaves only the greedy choice


def test_choose_token_samples_only_within_top_k():
    logits = np.array([0.0, 5.0, 4.9, -1.0, 4.8], dtype=np.float32)
    rng = np.random.default_rng(0)
    drawn = {choose_token(logits, 2.0, 2, rng) for _ in range(200)}
    assert drawn == {1, 2}
    assert choose_token(logits, 0.0, 0, None) == 1


@pytest.mark.parametrize(
    ("temperature", "top_k", "match"),
    [(-1.0, 0, "temperature must be 0"), (float("nan"), 0, "temperature must be 0"), (1.0, -2, "top-k must be 0")],
)
def test_bad_sampling_settings_are_refused(temperature, top_k, match):
    with pytest.raises(InputError, match=match):
        check_sampling(temperature, top_k)


@pytest.mark.parametrize(
    ("prompt", "new", "match"),
    [
        ([], 4, "the prompt is empty"),
        ([1, 2, 99999], 4, "token id 99999 is outside the vocabulary"),
        ([1, -1], 4, "token id -1 is outside the vocabulary"),
        ([1, 2], 0, "max new tokens must be at least 1"),
        ([1] * 4000, 200, "needs 4200 positions; this bundle's decoder takes at most 4096"),
    ],
)
def test_bad_prompts_are_refused(cpu_generator, prompt, new, match):
    with pytest.raises(InputError, match=match):
        cpu_generator.generate(prompt, new)


def test_a_cache_from_another_bundle_is_refused(cpu_generator):
    foreign = Cache(cpu_generator.empty_cache().values, 0, "0" * 64)
    with pytest.raises(InputError, match="made by another bundle's decoder graph"):
        cpu_generator.step(np.array([[1]], dtype=np.int64), foreign)


def test_a_bundle_without_a_decoder_is_refused(generation_bundle, tmp_path):
    target = tmp_path / "no-decoder"
    shutil.copytree(generation_bundle.path, target)
    manifest = json.loads((target / "manifest.json").read_text())
    decoder_file = manifest.pop("generation")["decoder_file"]
    del manifest["files"][decoder_file]
    (target / decoder_file).unlink()
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="has no generation graph; re-export it with .*--generation"):
        Generator(load_bundle(target), "cpu")


def test_cli_generate_streams_tokens_and_writes_json(generation_bundle, tmp_path, capsys):
    from portable_moe.cli import main

    golden = decoder_spec(generation_bundle).golden
    report = tmp_path / "generation.json"
    prompt = ",".join(map(str, golden["prompt_ids"]))
    code = main(
        [
            "generate",
            str(generation_bundle.path),
            "--prompt-ids",
            prompt,
            "--max-new-tokens",
            "8",
            "--json",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "generated: " + " ".join(map(str, golden["tokens"][:8])) + "\n" in out
    assert "prefill" in out and "decode" in out and "tokens/s" in out and "cache through iobinding" in out
    assert "written in place, attention fused (GroupQueryAttention)" in " ".join(out.split())
    written = json.loads(report.read_text())
    assert written["generated_ids"] == golden["tokens"][:8]
    assert written["expert_ids"] == golden["expert_ids"][:8]


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        (["--prompt-ids", "1,x"], "--prompt-ids takes comma-separated integers"),
        (["--prompt-ids", "1,5000"], "token id 5000 is outside the vocabulary"),
        (["--prompt-ids", "1", "--temperature", "-0.5"], "temperature must be 0"),
    ],
)
def test_cli_generate_bad_input_exits_2(generation_bundle, capsys, arguments, match):
    from portable_moe.cli import main

    code = main(["generate", str(generation_bundle.path), *arguments])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert match in err


def test_cli_check_generate_reports_token_agreement(generation_bundle, tmp_path, capsys):
    from portable_moe.cli import main

    report = tmp_path / "report.json"
    code = main(["check", str(generation_bundle.path), "--backend", "cpu", "--generate", "8", "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    (entry,) = json.loads(report.read_text())["generation"]
    assert entry["backend"] == "cpu" and entry["status"] == "passed"
    assert entry["token_agreement"] == 1.0 and entry["first_divergence"] is None
    assert len(entry["logit_error_per_step"]) == 8 and max(entry["logit_error_per_step"]) < 1e-4


class _RefusingBackend(OnnxRuntimeCpuBackend):
    description = "an adapter whose compiler refuses every graph"

    def _compile(self, model, options):
        raise BackendError("the simulated compiler refuses this graph")


def test_cli_check_generate_names_the_generation_check_apart_from_the_model_check(generation_bundle, capsys):
    """A backend that fails both checks is named once for each, so the summary says which check failed."""
    from portable_moe.cli import main

    registry.register_backend("refusing-npu", _RefusingBackend)
    try:
        code = main(["check", str(generation_bundle.path), "--backend", "cpu,refusing-npu", "--generate", "2"])
    finally:
        registry.unregister_backend("refusing-npu")
    assert code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "not conforming: refusing-npu (error), refusing-npu generation (error)" in err


def test_cli_check_generate_beyond_the_golden_steps_exits_2(generation_bundle, capsys):
    from portable_moe.cli import main

    code = main(["check", str(generation_bundle.path), "--generate", "99"])
    assert code == 2
    assert "--generate takes 1 to 32 steps" in capsys.readouterr().err
