"""A Hugging Face checkpoint as an export source: the model to export and golden data from transformers.

The golden outputs come from the unmodified transformers model (eager attention, eager experts),
not from portable-moe's re-implementation, so conformance measures fidelity to the user's own
model. The golden expert ids are what transformers' routers chose, captured by forward hooks on
each MoE block's router. Only then are the MoE blocks replaced for export.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from exporters.hf.loading import LoadedCheckpoint, load_checkpoint
from exporters.hf.model import HFLayeredModel
from exporters.sources import ExportSource, output_names


def transformers_outputs(checkpoint: LoadedCheckpoint, input_ids: Any) -> dict[str, np.ndarray]:
    """Logits and routed expert ids per MoE layer from the unmodified transformers model.

    Args:
        checkpoint: the loaded checkpoint (its model must not have been wrapped yet).
        input_ids: [B, S] int64 token ids.

    Returns:
        ``{"logits": [B, S, vocab], "expert_ids_layerN": [B, S, k] int64 ...}``.
    """
    import torch

    batch, seq = input_ids.shape
    captured: dict[int, list[Any]] = {}
    hooks = _route_hooks(checkpoint, captured)
    try:
        with torch.no_grad():
            logits = checkpoint.hf_model(input_ids=input_ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    names, routing = output_names(checkpoint.config)
    outputs = {"logits": logits.float().numpy()}
    for name, layer in routing.items():
        outputs[name] = captured[layer][-1].reshape(batch, seq, -1).to(torch.int64).numpy()
    return outputs


def _route_hooks(checkpoint: LoadedCheckpoint, captured: dict[int, list[Any]]) -> list[Any]:
    """Forward hooks on every MoE block's router appending the expert ids it chose to ``captured[layer]``."""
    hooks = []
    for index in checkpoint.config.moe_layer_indices:
        router = checkpoint.hf_model.model.layers[index].mlp.gate

        def keep(module: Any, args: Any, output: Any, index: int = index) -> None:
            captured.setdefault(index, []).append(output[2])  # (logits, weights, expert ids) in every router

        hooks.append(router.register_forward_hook(keep))
    return hooks


def transformers_continuation(
    checkpoint: LoadedCheckpoint, prompt_ids: Any, new_tokens: int
) -> tuple[dict[str, Any], np.ndarray]:
    """The greedy continuation of a ``[1, S]`` prompt by transformers' own ``generate`` (with its cache).

    Generation runs exactly ``new_tokens`` steps (no end-of-sequence stop) with no logits
    processor, so the stored logits are the model's raw logits. The expert ids of each step are
    what each MoE block's router chose for the position that produced that step's token (the
    prompt's last position at step 0), captured by forward hooks.

    Returns:
        ``(record, logits [steps, vocab])``, ``record`` as :func:`exporters.decode_graph.continuation_record`.
    """
    import torch
    import transformers

    from exporters.decode_graph import continuation_record

    model = checkpoint.hf_model
    settings = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True
    )
    captured: dict[int, list[Any]] = {}
    hooks = _route_hooks(checkpoint, captured)
    saved, model.generation_config = model.generation_config, settings  # the checkpoint's own would stop at eos
    try:
        with torch.no_grad():
            result = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids))
    finally:
        model.generation_config = saved
        for hook in hooks:
            hook.remove()
    tokens = result.sequences[0, prompt_ids.shape[1] :].tolist()
    expert_ids = [
        {str(layer): calls[step][-1].tolist() for layer, calls in sorted(captured.items())}
        for step in range(len(tokens))
    ]
    logits = torch.stack([step[0] for step in result.logits]).float().numpy()
    return continuation_record(prompt_ids[0].tolist(), tokens, expert_ids, logits), logits


def hf_source(
    path: str | os.PathLike[str],
    seed: int,
    golden_batch: int,
    golden_seq: int,
    say: Callable[[str], None],
    generation: bool = False,
) -> ExportSource:
    """Load a checkpoint, compute the golden data with transformers, and wrap the model for export.

    With ``generation``, the golden data include transformers' greedy continuation of the golden
    inputs' first row (see :func:`transformers_continuation`).

    Raises:
        ExportError: see :func:`exporters.hf.loading.load_checkpoint`.
    """
    from exporters.reference_model import golden_inputs

    say(f"loading the Hugging Face checkpoint {path}")
    checkpoint = load_checkpoint(path)
    config = checkpoint.config
    say(
        f"{checkpoint.architecture.name}: {len(config.moe_layer_indices)} MoE layer(s) of {config.n_routed_experts} experts"
    )
    golden_ids = golden_inputs(config, seed, golden_batch, golden_seq)["input_ids"]
    second_ids = golden_inputs(config, seed + 100, 1, max(1, golden_seq // 2 + 1))["input_ids"]
    say("computing the golden outputs with transformers")
    golden_out = transformers_outputs(checkpoint, golden_ids)
    second_out = transformers_outputs(checkpoint, second_ids)
    continuation = None
    if generation:
        from exporters.decode_graph import GOLDEN_NEW_TOKENS, GOLDEN_PROMPT_TOKENS

        say(f"generation: greedy continuation by transformers' generate ({GOLDEN_NEW_TOKENS} tokens)")
        continuation = transformers_continuation(checkpoint, golden_ids[:1, :GOLDEN_PROMPT_TOKENS], GOLDEN_NEW_TOKENS)
    model = HFLayeredModel(checkpoint.hf_model, checkpoint.architecture, config).eval()
    manifest = {
        "preset": config.name,
        "source": {
            "kind": "huggingface",
            "architecture": checkpoint.architecture.name,
            "directory": checkpoint.directory.name,
            "transformers_version": importlib.metadata.version("transformers"),
            "config": checkpoint.source_config,
            "weight_files": checkpoint.weight_files,
        },
    }
    return ExportSource(model, config, golden_ids, second_ids, golden_out, second_out, manifest, continuation)
