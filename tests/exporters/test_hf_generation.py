"""The cache-carrying decoder of Hugging Face bundles: against transformers' own generate, DeepSeek-V3's
latent (MLA) cache against the expanded per-head one, text prompts through the checkpoint's tokenizer,
and the export failing when the decoder disagrees with transformers.

The DeepSeek-V3 generation bundle is test_hf_export.py's "deepseek-dense-generation" case (one export
per session); the softmax-routed architecture (Mixtral) is exported with --generation and checked
token by token in test_hf_export.py's CLI test.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")
transformers = pytest.importorskip("transformers", reason="Hugging Face export needs pip install 'portable-moe[hf]'")

from portable_moe import cli  # noqa: E402
from portable_moe.compare import compare_outputs  # noqa: E402
from portable_moe.run.generation import Generator, decoder_spec  # noqa: E402

DEEPSEEK = "DeepseekV3ForCausalLM"


@pytest.fixture(scope="module")
def deepseek(hf_checkpoint, hf_bundle):
    """(checkpoint directory, its generation bundle), shared with test_hf_export.py."""
    directory = hf_checkpoint(DEEPSEEK)
    return directory, hf_bundle(directory, "dense", generation=True)


def _transformers_forward(directory, input_ids):
    from exporters.hf.loading import load_checkpoint
    from exporters.hf.source import transformers_outputs

    return transformers_outputs(load_checkpoint(directory), torch.from_numpy(input_ids))


def test_golden_continuation_is_transformers_greedy_and_cpu_reproduces_it(deepseek):
    directory, bundle = deepseek
    golden = decoder_spec(bundle).golden
    prompt, tokens = golden["prompt_ids"], golden["tokens"]
    assert len(tokens) == 32 and bundle.manifest["generation"]["golden_source"] == "transformers"
    # transformers without a cache on the whole continuation: its greedy picks and routing at every step.
    sequence = np.array([prompt + tokens[:-1]], dtype=np.int64)
    full = _transformers_forward(directory, sequence)
    steps = slice(len(prompt) - 1, None)
    assert np.argmax(full["logits"][0, steps], axis=-1).tolist() == tokens
    assert [sorted(ids) for ids in full["expert_ids_layer1"][0, steps].tolist()] == [
        sorted(step["1"]) for step in golden["expert_ids"]
    ]
    generator = Generator(bundle, "cpu")
    assert generator.writes_in_place  # the latent cache is preallocated on the CPU, as the presets' caches are
    result = generator.generate(prompt, len(tokens))
    assert result.tokens == tokens
    stored = np.stack(result.logits)
    np.testing.assert_allclose(stored, full["logits"][0, steps], rtol=1e-4, atol=1e-5)


def test_deepseek_cache_is_the_latent_and_its_size_is_reported(deepseek):
    _, bundle = deepseek
    entry = bundle.manifest["generation"]
    source = bundle.manifest["source"]["config"]
    width = source["kv_lora_rank"] + source["qk_rope_head_dim"]
    assert entry["past"] == ["past_latent_layer0", "past_latent_layer1"]
    assert entry["cache_form"] == "latent" and entry["cache_shape"] == ["batch", 1, "past", width]
    per_head = source["qk_nope_head_dim"] + source["qk_rope_head_dim"] + source["v_head_dim"]
    assert entry["cache_bytes_per_token"] == {
        "latent": 4 * 2 * width,
        "expanded": 4 * 2 * source["num_attention_heads"] * per_head,
    }
    generator = Generator(bundle, "cpu", io_binding=False)
    output = generator.step(np.array([[3, 4, 5]], dtype=np.int64), generator.empty_cache())
    assert [value.shape for value in output.cache.values] == [(1, 1, 3, width)] * 2


@pytest.mark.parametrize("backend", ["cpu", "reference", "openvino", "npu-sim"])
def test_latent_cache_decoder_conforms_token_by_token(deepseek, backend):
    from portable_moe import registry
    from portable_moe.conformance.generation_check import check_generation

    probe = registry.get_backend(backend).safe_probe()
    if not probe.available:
        pytest.skip(f"{backend} is unavailable here: {probe.reason}")
    check = check_generation(deepseek[1], backend, 8)
    assert check.status == "passed", check.reason
    assert check.token_agreement == 1.0 and min(check.routing_agreement) == 1.0


def _expanded_mla_decoder(model):
    """A second implementation of the cached decoder for DeepSeek-V3: per-head keys and values in the
    cache (what generic exporters do), computed from the attention module's projections."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mla

    from exporters.hf.model import LoweredMoEBlock

    def attend(attention, hidden, cos, sin, mask, past_key, past_value):
        batch, new = hidden.shape[:2]
        query = attention.q_b_proj(attention.q_a_layernorm(attention.q_a_proj(hidden)))
        query = query.view(batch, new, -1, attention.qk_head_dim).transpose(1, 2)
        query_pass, query_rotary = query.split([attention.qk_nope_head_dim, attention.qk_rope_head_dim], dim=-1)
        latent, key_rotary = attention.kv_a_proj_with_mqa(hidden).split(
            [attention.kv_lora_rank, attention.qk_rope_head_dim], dim=-1
        )
        latent = attention.kv_a_layernorm(latent).view(batch, 1, new, -1)
        key_rotary = key_rotary.view(batch, 1, new, -1)
        query_rotary, key_rotary = mla.apply_rotary_pos_emb_interleave(query_rotary, key_rotary, cos, sin)
        key, value = attention.expand_kv(latent, key_rotary)
        key, value = torch.cat((past_key, key), dim=2), torch.cat((past_value, value), dim=2)
        query = torch.cat((query_pass, query_rotary), dim=-1)
        out, _ = mla.eager_attention_forward(attention, query, key, value, mask, scaling=attention.scaling)
        return attention.o_proj(out.reshape(batch, new, -1)), key, value

    def step(input_ids, past):
        hidden = model.embed_tokens(input_ids)
        past_length, new = past[0].shape[2], input_ids.shape[1]
        positions = (torch.arange(new) + past_length)[None]
        cos, sin = model.rotary_emb(hidden, positions)
        future = torch.arange(past_length + new)[None, :] > positions[0][:, None]
        mask = torch.zeros(future.shape).masked_fill(future, torch.finfo(torch.float32).min)[None, None]
        present = []
        for index, layer in enumerate(model.layers):
            attended, key, value = attend(
                layer.self_attn, layer.input_layernorm(hidden), cos, sin, mask, *past[2 * index : 2 * index + 2]
            )
            hidden = hidden + attended
            normed = layer.post_attention_layernorm(hidden)
            moe = isinstance(layer.mlp, LoweredMoEBlock)
            hidden = hidden + (layer.mlp(normed)[0] if moe else layer.mlp(normed))
            present += [key, value]
        return model.head(hidden), present

    return step


def test_latent_cache_agrees_with_the_expanded_cache_and_with_transformers(deepseek):
    from exporters.hf.loading import load_checkpoint
    from exporters.hf.model import HFLayeredModel
    from exporters.hf.source import transformers_outputs

    directory, _ = deepseek
    checkpoint = load_checkpoint(directory)
    ids = np.random.default_rng(5).integers(0, checkpoint.config.vocab_size, size=(2, 9), dtype=np.int64)
    expected = transformers_outputs(checkpoint, torch.from_numpy(ids))["logits"]
    model = HFLayeredModel(checkpoint.hf_model, checkpoint.architecture, checkpoint.config).eval()
    latent_step, expanded_step = model.cached_decoder(), _expanded_mla_decoder(model)
    layout = latent_step.layout
    attention = model.layers[0].self_attn
    latent_past = [torch.from_numpy(value) for value in layout.empty(batch=2)]
    expanded_past = [
        torch.zeros(2, attention.num_heads, 0, width)
        for _ in model.layers
        for width in (attention.qk_head_dim, attention.v_head_dim)
    ]
    latent_logits, expanded_logits = [], []
    with torch.no_grad():  # prefill 5 positions, then one position per step
        for start, stop in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9)]:
            logits, *rest = latent_step(torch.from_numpy(ids[:, start:stop]), *latent_past)
            latent_past = rest[: len(latent_past)]
            latent_logits.append(logits)
            logits, expanded_past = expanded_step(torch.from_numpy(ids[:, start:stop]), expanded_past)
            expanded_logits.append(logits)
    latent = {"logits": torch.cat(latent_logits, dim=1).numpy()}
    expanded = {"logits": torch.cat(expanded_logits, dim=1).numpy()}
    for expected_values, actual in (
        (expanded, latent),
        ({"logits": expected}, latent),
        ({"logits": expected}, expanded),
    ):
        (comparison,) = compare_outputs(expected_values, actual)
        assert comparison.passed, comparison.message
    # What each form holds per position, as the manifest reports it.
    assert sum(value[0, :, 0].numel() for value in latent_past) * 4 == layout.bytes_per_token
    assert sum(value[0, :, 0].numel() for value in expanded_past) * 4 == layout.expanded_bytes_per_token


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("token", r"disagrees with the golden one from transformers at step 3: it chose token \d+, transformers chose"),
        ("logits", r"disagrees with the golden one from transformers \(teacher-forced\): logits"),
    ],
)
def test_a_decoder_that_disagrees_with_transformers_fails_the_export(deepseek, change, match):
    from exporters.decode_graph import CacheLayout, DecoderExport, check_continuation
    from portable_moe.conformance.generation_check import golden_logits
    from portable_moe.errors import ExportParityError

    _, bundle = deepseek
    entry = bundle.manifest["generation"]
    golden = json.loads(json.dumps(entry["golden"]))
    logits = golden_logits(bundle, entry)
    if change == "token":
        golden["tokens"][3] = (golden["tokens"][3] + 1) % bundle.config.vocab_size
    else:
        logits = logits + 1e-2
    layout = CacheLayout("latent", 2, 1, entry["cache_shape"][3], ("latent",))
    export = DecoderExport(bundle.path / entry["decoder_file"], layout, [], golden, logits, 4096, "transformers")
    with pytest.raises(ExportParityError, match=match + ".*no bundle was written"):
        check_continuation(export, bundle.config, "exact")
    assert ExportParityError.exit_code == 1


def test_tokenizer_is_copied_hashed_and_generate_takes_text(deepseek, tmp_path, capsys):
    from tokenizers import Tokenizer

    directory, bundle = deepseek
    assert bundle.manifest["tokenizer"]["files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert "tokenizer/tokenizer.json" in bundle.manifest["files"]
    report = tmp_path / "generation.json"
    code = cli.main(
        ["generate", str(bundle.path), "--prompt", "w5 w17 w3 w60", "--max-new-tokens", "6", "--json", str(report)]
    )
    out = capsys.readouterr().out
    assert code == 0
    written = json.loads(report.read_text())
    assert written["prompt_ids"] == [5, 17, 3, 60]
    expected = Generator(bundle, "cpu").generate([5, 17, 3, 60], 6).tokens
    assert written["generated_ids"] == expected
    text = Tokenizer.from_file(str(directory / "tokenizer.json")).decode(expected)
    assert written["generated_text"] == text and text.startswith("w")
    assert f"generated: {text}\n" in out


def _copy_with_tokenizer_entry(bundle, target, entry):
    """A copy of ``bundle`` whose manifest's tokenizer entry is ``entry`` (None: no tokenizer at all)."""
    shutil.copytree(bundle.path, target)
    manifest = json.loads((target / "manifest.json").read_text())
    if entry is None:
        del manifest["tokenizer"]
        manifest["files"] = {name: sha for name, sha in manifest["files"].items() if not name.startswith("tokenizer/")}
        shutil.rmtree(target / "tokenizer")
    else:
        manifest["tokenizer"] = entry
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (None, "has no tokenizer .*; give the prompt as token ids with --prompt-ids"),
        ({"directory": "../elsewhere", "files": ["tokenizer.json"]}, "tokenizer entry '../elsewhere/tokenizer.json'"),
    ],
    ids=["no-tokenizer", "tokenizer-outside-the-bundle"],
)
def test_generate_text_with_a_missing_or_misplaced_tokenizer_exits_2(deepseek, tmp_path, capsys, entry, match):
    target = _copy_with_tokenizer_entry(deepseek[1], tmp_path / "copy", entry)
    code = cli.main(["generate", str(target), "--prompt", "w5 w6"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err), err


def test_a_model_without_a_cached_decoder_is_refused(tmp_path):
    from exporters.decode_graph import export_decoder
    from portable_moe.errors import ExportError

    class PlainModel:
        config = None

    with pytest.raises(ExportError, match="PlainModel has no cache-carrying decoder; export this source without"):
        export_decoder(PlainModel(), None, tmp_path, None, 20, print)


def test_a_prompt_that_encodes_to_nothing_exits_2(deepseek, capsys):
    _, bundle = deepseek
    code = cli.main(["generate", str(bundle.path), "--prompt", "   "])
    err = capsys.readouterr().err
    assert code == 2
    assert "encodes to no tokens; give some text or --prompt-ids" in err


def test_text_without_the_tokenizers_library_says_what_to_install(deepseek, monkeypatch):
    import sys

    from portable_moe.errors import InputError
    from portable_moe.run.text import load_tokenizer

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(InputError, match=r"needs the tokenizers library: pip install 'portable-moe\[text\]'"):
        load_tokenizer(deepseek[1])


def test_bench_decode_times_transformers_on_the_checkpoint_it_was_exported_from(deepseek, hf_checkpoint, capsys):
    directory, bundle = deepseek
    arguments = ["bench", str(bundle.path), "--decode", "--context", "6", "--steps", "2"]
    assert cli.main([*arguments, "--hf", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "transformers eager" in out and "torch eager" not in out
    # Without the checkpoint nothing stands in for it (the reference model is another model).
    assert cli.main(arguments) == 0
    captured = capsys.readouterr()
    assert "eager" not in captured.out
    assert "transformers eager: not timed (give the checkpoint directory" in captured.err
    other = hf_checkpoint("MixtralForCausalLM")
    assert cli.main([*arguments, "--hf", str(other)]) == 2
    assert "differs from the file" in capsys.readouterr().err
