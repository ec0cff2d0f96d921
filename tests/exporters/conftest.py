"""Fixtures for the Hugging Face export tests: tiny random MoE checkpoints written with save_pretrained
(nothing downloaded) and their bundles, each made once per session.

torch and transformers are imported inside the functions, so importing this module costs nothing.
Weights are seeded and made larger than transformers' default initialisation (std 0.02), with
perturbed norm gains and a non-zero DeepSeek correction bias, so that a wrong router detail
(bias, grouping, normalisation, scaling) changes the routing or the logits visibly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def hf_config(architecture: str, **overrides: Any) -> Any:
    """A 2-layer config (1 dense + 1 MoE where the architecture has dense layers)."""
    import transformers

    if architecture == "DeepseekV3ForCausalLM":
        fields = dict(
            _COMMON,
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=32,  # a multiple of 16, so that int8/int4 blocks of 16 fit every projection
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
        config_class = transformers.DeepseekV3Config
    elif architecture in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        fields = dict(
            _COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        )
        if architecture == "Qwen2MoeForCausalLM":
            fields.update(shared_expert_intermediate_size=24, norm_topk_prob=False)
            config_class = transformers.Qwen2MoeConfig
        else:
            config_class = transformers.Qwen3MoeConfig
    elif architecture == "MixtralForCausalLM":
        fields = dict(_COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
        config_class = transformers.MixtralConfig
    else:
        raise ValueError(architecture)
    fields.update(overrides)
    return config_class(**fields)


def random_model(config: Any, seed: int = 0) -> Any:
    """A seeded random transformers model for ``config`` (float32, eager)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("inv_freq"):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name:
                tensor.copy_(1.0 + 0.1 * noise)
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.05 * noise)
            elif tensor.dim() >= 2:
                tensor.copy_(noise / tensor.shape[-1] ** 0.5)
            else:
                tensor.copy_(0.1 * noise)
    return model.eval()


def save_tokenizer(directory: Path, vocab_size: int) -> Any:
    """Write a word-level tokenizer of ``vocab_size`` words ("[UNK]", then w1, w2, ...) as
    ``save_pretrained`` does, built with the ``tokenizers`` library (nothing downloaded)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{index}": index for index in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)
    return tokenizer


def save_checkpoint(directory: Path, architecture: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random checkpoint of ``architecture``, with a tokenizer, to ``directory`` and return it."""
    config = hf_config(architecture, **overrides)
    random_model(config, seed).save_pretrained(directory)
    save_tokenizer(directory, config.vocab_size)
    return directory


def save_fp8_checkpoint(source: Path, directory: Path, block: tuple[int, int] = (16, 16), shards: int = 2) -> Path:
    """Rewrite a checkpoint in DeepSeek-V3's published layout: block-scaled FP8 linear weights with
    ``<name>_scale_inv`` tensors and ``quantization_config.weight_block_size``, sharded with an index.

    2-D ``*proj*.weight`` tensors are quantized (attention and expert projections); embeddings,
    norms, the router and the head stay as they are, as in DeepSeek's release.
    """
    import math

    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source / "model.safetensors"))
    out: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and "proj" in name and name.endswith(".weight"):
            rows, columns = tensor.shape
            grid = (math.ceil(rows / block[0]), math.ceil(columns / block[1]))
            padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
            padded[:rows, :columns] = tensor
            blocks = padded.reshape(grid[0], block[0], grid[1], block[1])
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # float8_e4m3fn's largest value
            expanded = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :columns]
            out[name] = (tensor / expanded).to(torch.float8_e4m3fn)
            out[name + "_scale_inv"] = scale.float().contiguous()
        else:
            out[name] = tensor
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(out)
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: out[name].contiguous() for name in names[shard::shards]}
        save_file(part, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture(scope="session")
def hf_checkpoint(run_wide):
    """``make(architecture, **config_overrides) -> directory``: each distinct checkpoint written once per run."""
    pytest.importorskip("transformers", reason="Hugging Face export needs pip install 'portable-moe[hf]'")
    checkpoints = run_wide("hf-checkpoints")

    def make(architecture: str, **overrides: Any) -> Path:
        key = repr((architecture, *sorted((name, repr(value)) for name, value in overrides.items())))
        return checkpoints.get(
            key, architecture, lambda directory: save_checkpoint(directory, architecture, **overrides), Path
        )

    return make


@pytest.fixture(scope="session")
def fp8_deepseek_checkpoint(hf_checkpoint, run_wide) -> Path:
    """The tiny DeepSeek-V3 checkpoint in block-scaled FP8, in two shards with an index."""
    source = hf_checkpoint("DeepseekV3ForCausalLM")
    return run_wide("fp8-checkpoints").get(
        str(source), "deepseek-fp8", lambda directory: save_fp8_checkpoint(source, directory), Path
    )


@pytest.fixture(scope="session")
def hf_bundle(run_wide):
    """``export(directory, lowering, **options) -> Bundle``: each distinct export done once per run."""
    from exporters import export_bundle
    from portable_moe import load_bundle

    bundles = run_wide("hf-bundles")

    def export(directory: Path, lowering: str, **options: Any) -> Any:
        key = repr((str(directory), lowering, *sorted((name, repr(value)) for name, value in options.items())))
        return bundles.get(
            key,
            f"{directory.name}-{lowering}",
            lambda target: export_bundle(target, hf=directory, moe_lowering=lowering, **options),
            load_bundle,
        )

    return export


@pytest.fixture(scope="session")
def hf_random_model():
    """``make(architecture, **config_overrides) -> model``: a seeded random transformers model in memory."""
    pytest.importorskip("transformers", reason="Hugging Face export needs pip install 'portable-moe[hf]'")
    return lambda architecture, **overrides: random_model(hf_config(architecture, **overrides))
