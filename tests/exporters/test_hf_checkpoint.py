"""Hugging Face checkpoints: routers and MoE blocks against transformers, loading, FP8, error paths.

Nothing here exports ONNX (see test_hf_export.py); every test runs in well under a second or two.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")
transformers = pytest.importorskip("transformers", reason="Hugging Face export needs pip install 'portable-moe[hf]'")

from exporters import export_bundle  # noqa: E402
from exporters.hf.architectures import ARCHITECTURES  # noqa: E402
from exporters.hf.checkpoint import dequantize_fp8_blocks  # noqa: E402
from exporters.hf.loading import load_checkpoint  # noqa: E402
from portable_moe import cli  # noqa: E402
from portable_moe.errors import ExportError  # noqa: E402

ARCHITECTURE_NAMES = list(ARCHITECTURES)


def _moe_block(model):
    return next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))


def _hidden(tokens: int, size: int, seed: int = 1):
    return torch.randn(tokens, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_router_matches_transformers(hf_random_model, architecture):
    model = hf_random_model(architecture)
    gate = _moe_block(model).gate
    hidden = _hidden(64, model.config.hidden_size)
    with torch.no_grad():
        _, hf_weights, hf_ids = gate(hidden)
        ids, weights = ARCHITECTURES[architecture].router(gate, hidden)
    # transformers' top-k order is unspecified (DeepSeek asks for sorted=False): compare per token by expert id.
    hf_order, order = hf_ids.argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(hf_ids.gather(1, hf_order), ids.gather(1, order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order), rtol=1e-6, atol=0)


def test_deepseek_router_uses_group_limit_bias_and_scaling(hf_random_model):
    """The tiny DeepSeek config must exercise what makes its router special, or the test above proves little."""
    model = hf_random_model("DeepseekV3ForCausalLM")
    gate = _moe_block(model).gate
    hidden = _hidden(64, model.config.hidden_size)
    with torch.no_grad():
        ids, weights = ARCHITECTURES["DeepseekV3ForCausalLM"].router(gate, hidden)
        scores = torch.sigmoid(hidden @ gate.weight.t())
    group_size = gate.num_experts // gate.num_group
    assert len((ids // group_size).unique()) > gate.topk_group  # different tokens keep different groups
    assert max(len(set((row // group_size).tolist())) for row in ids) <= gate.topk_group
    unbiased_top = scores.topk(2, dim=-1).indices.sort(dim=-1).values
    assert not torch.equal(unbiased_top, ids.sort(dim=-1).values)  # the bias (or the group limit) changed choices
    torch.testing.assert_close(weights.sum(dim=-1), torch.full((64,), 2.5))


@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_lazy_loading_matches_from_pretrained(hf_checkpoint, architecture):
    directory = hf_checkpoint(architecture)
    loaded = load_checkpoint(directory)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    ours, theirs = loaded.hf_model.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    input_ids = torch.randint(0, loaded.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # equal weights; kernels may still round differently with other memory alignment
        torch.testing.assert_close(loaded.hf_model(input_ids).logits, reference(input_ids).logits, rtol=1e-6, atol=1e-6)
    assert loaded.config.n_routed_experts == 8 and loaded.config.num_experts_per_tok == 2
    assert list(loaded.weight_files) == ["model.safetensors"]


def test_fp8_block_checkpoint_is_dequantized_at_load(hf_checkpoint, fp8_deepseek_checkpoint):
    from safetensors import safe_open

    original = load_checkpoint(hf_checkpoint("DeepseekV3ForCausalLM")).hf_model
    loaded = load_checkpoint(fp8_deepseek_checkpoint)
    assert sorted(loaded.weight_files) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((fp8_deepseek_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(str(fp8_deepseek_checkpoint / index[name]), "pt") as shard:
        stored = shard.get_tensor(name)
    with safe_open(str(fp8_deepseek_checkpoint / index[name + "_scale_inv"]), "pt") as shard:
        scale = shard.get_tensor(name + "_scale_inv")
    assert stored.dtype == torch.float8_e4m3fn and scale.shape == (2, 1)  # [32, 16] in 16x16 blocks
    expected = stored.float() * scale.repeat_interleave(16, 0)
    assert torch.equal(loaded.hf_model.model.layers[1].mlp.experts.down_proj[3], expected)
    attention = loaded.hf_model.model.layers[0].self_attn.kv_b_proj.weight
    assert not torch.equal(attention, original.model.layers[0].self_attn.kv_b_proj.weight)  # it was quantized
    torch.testing.assert_close(attention, original.model.layers[0].self_attn.kv_b_proj.weight, rtol=0.07, atol=1e-3)


def test_dequantize_handles_partial_edge_blocks():
    weight = torch.ones(20, 33).to(torch.float8_e4m3fn)
    scale = torch.arange(1, 7, dtype=torch.float32).reshape(2, 3)
    out = dequantize_fp8_blocks(weight, scale, (16, 16))
    assert out.shape == (20, 33)
    assert out[0, 0] == 1 and out[0, 16] == 2 and out[0, 32] == 3 and out[19, 0] == 4 and out[19, 32] == 6
    with pytest.raises(ExportError, match=r"FP8 scale of shape \[2, 2\] does not fit a \[20, 33\] weight"):
        dequantize_fp8_blocks(weight, scale[:, :2], (16, 16))


def _copy(directory, target):
    shutil.copytree(directory, target)
    return target


def test_missing_directory_and_hub_ids_are_refused_without_downloading(tmp_path):
    with pytest.raises(ExportError, match=r"no such directory"):
        load_checkpoint(tmp_path / "absent")
    with pytest.raises(ExportError, match=r"no such local directory; portable-moe downloads nothing"):
        load_checkpoint("deepseek-ai/DeepSeek-V3")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=r"not a directory"):
        load_checkpoint(tmp_path / "file")
    with pytest.raises(ExportError, match=r"no config.json"):
        load_checkpoint(tmp_path)


def test_unsupported_architecture_lists_the_supported_ones(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("MixtralForCausalLM"), tmp_path / "llama")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    supported = ", ".join(ARCHITECTURES)
    with pytest.raises(
        ExportError, match=f"architecture LlamaForCausalLM is not supported; supported architectures: {supported}"
    ):
        load_checkpoint(directory)


def test_corrupt_safetensors_is_refused(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("MixtralForCausalLM"), tmp_path / "corrupt")
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(
        ExportError, match=r"model.safetensors: not a readable safetensors file .* corrupt or truncated"
    ):
        load_checkpoint(directory)


def test_missing_shard_is_named(fp8_deepseek_checkpoint, tmp_path):
    directory = _copy(fp8_deepseek_checkpoint, tmp_path / "partial")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ExportError, match=r"shard\(s\) model-00002-of-00002.safetensors named in .* are missing"):
        load_checkpoint(directory)


def test_fp8_without_block_size_is_refused(fp8_deepseek_checkpoint, tmp_path):
    directory = _copy(fp8_deepseek_checkpoint, tmp_path / "no-block")
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"is FP8 but .* only block-scaled FP8 is supported"):
        load_checkpoint(directory)


def test_tensor_missing_from_checkpoint_is_named(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _copy(hf_checkpoint("Qwen3MoeForCausalLM"), tmp_path / "missing-tensor")
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["model.layers.1.mlp.gate.weight"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(ExportError, match=r"no tensor for 'model.layers.1.mlp.gate.weight'"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"use_sliding_window": True, "sliding_window": 8}, r"sliding-window attention is not supported"),
        ({"mlp_only_layers": [1]}, r"MoE layers \[0\] are not a contiguous run ending at the last layer"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ],
)
def test_layouts_the_export_cannot_reproduce_are_refused(hf_checkpoint, overrides, message):
    with pytest.raises(ExportError, match=message):
        load_checkpoint(hf_checkpoint("Qwen3MoeForCausalLM", **overrides))


def test_preset_and_hf_are_exclusive(tmp_path, capsys):
    with pytest.raises(ExportError, match=r"either a preset or an hf checkpoint directory, not both"):
        export_bundle(tmp_path / "out", "tiny", hf=tmp_path)
    assert cli.main(["export", "--hf", str(tmp_path), "--preset", "tiny", "-o", str(tmp_path / "out")]) == 2
    assert "--hf and --preset are exclusive" in capsys.readouterr().err


def test_cli_refuses_a_hub_id_in_one_line(tmp_path, capsys):
    assert cli.main(["export", "--hf", "Qwen/Qwen3-30B-A3B", "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --hf Qwen/Qwen3-30B-A3B: no such local directory") and len(error.splitlines()) == 1
    assert "downloads nothing" in error
    assert not (tmp_path / "out").exists()


def test_index_pointing_at_the_wrong_shard_is_named(fp8_deepseek_checkpoint, tmp_path):
    directory = _copy(fp8_deepseek_checkpoint, tmp_path / "wrong-index")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.embed_tokens.weight"
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(shard for shard in shards if shard != index["weight_map"][name])
    index_path.write_text(json.dumps(index))
    with pytest.raises(ExportError, match=r"has no tensor 'model.embed_tokens.weight', which .* places there"):
        load_checkpoint(directory)


def _sentencepiece_checkpoint(directory, model_bytes: bytes):
    """A checkpoint directory whose tokenizer is a sentencepiece tokenizer.model alone (no tokenizer.json)."""
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(model_bytes)
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
            }
        )
    )
    return directory


def test_a_sentencepiece_tokenizer_gets_a_tokenizer_json_that_encodes_as_sentencepiece_does(tmp_path):
    import io

    spm = pytest.importorskip("sentencepiece", reason="the hf extra brings sentencepiece")
    from tokenizers import Tokenizer

    from exporters.hf.tokenizer import copy_tokenizer

    corpus = ["a mixture of experts routes every token", "the quick brown fox jumps over the lazy dog"] * 40
    trained = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=trained, vocab_size=60, model_type="bpe", minloglevel=2
    )
    source = _sentencepiece_checkpoint(tmp_path / "checkpoint", trained.getvalue())
    staging = tmp_path / "staging"
    staging.mkdir()
    messages: list[str] = []

    entry = copy_tokenizer(source, staging, messages.append)["tokenizer"]

    assert entry["files"] == ["tokenizer_config.json", "tokenizer.model", "tokenizer.json"]
    assert "tokenizer.json" in entry["made"]
    tokenizer = Tokenizer.from_file(str(staging / "tokenizer" / "tokenizer.json"))
    processor = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    for text in ("the lazy fox routes a token", "experts jump over every dog"):
        expected = processor.encode(text)
        ids = tokenizer.encode(text).ids
        assert ids[-len(expected) :] == expected and ids[: len(ids) - len(expected)] == [processor.bos_id()]
        assert tokenizer.decode(ids) == text


def test_an_unreadable_sentencepiece_tokenizer_leaves_token_ids_only_and_says_why(tmp_path):
    from exporters.hf.tokenizer import copy_tokenizer

    source = _sentencepiece_checkpoint(tmp_path / "checkpoint", b"not a sentencepiece model")
    staging = tmp_path / "staging"
    staging.mkdir()
    messages: list[str] = []

    entry = copy_tokenizer(source, staging, messages.append)["tokenizer"]

    assert entry["files"] == ["tokenizer_config.json", "tokenizer.model"] and "made" not in entry
    assert not (staging / "tokenizer" / "tokenizer.json").exists()
    assert any(
        message.startswith("warning: tokenizer.json could not be made from tokenizer.model")
        and "takes token ids only" in message
        for message in messages
    ), messages
