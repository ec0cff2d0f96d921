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
    captured: dict[int, Any] = {}
    hooks = []
    for index in checkpoint.config.moe_layer_indices:
        router = checkpoint.hf_model.model.layers[index].mlp.gate

        def keep(module: Any, args: Any, output: Any, index: int = index) -> None:
            captured[index] = output[2]  # (router_logits, weights, expert indices) in every supported router

        hooks.append(router.register_forward_hook(keep))
    try:
        with torch.no_grad():
            logits = checkpoint.hf_model(input_ids=input_ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    names, routing = output_names(checkpoint.config)
    outputs = {"logits": logits.float().numpy()}
    for name, layer in routing.items():
        outputs[name] = captured[layer].reshape(batch, seq, -1).to(torch.int64).numpy()
    return outputs


def hf_source(
    path: str | os.PathLike[str], seed: int, golden_batch: int, golden_seq: int, say: Callable[[str], None]
) -> ExportSource:
    """Load a checkpoint, compute the golden data with transformers, and wrap the model for export.

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
    return ExportSource(model, config, golden_ids, second_ids, golden_out, second_out, manifest)
