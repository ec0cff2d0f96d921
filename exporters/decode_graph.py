"""The cache-carrying decoder graph: one step of generation with past keys and values.

``decoder.onnx`` takes ``input_ids [batch, new]`` and, per decoder layer, ``past_key_layerN`` and
``past_value_layerN`` ``[batch, heads, past, head_dim]``; it returns ``logits [batch, new, vocab]``,
``present_key_layerN`` / ``present_value_layerN`` (the past with the new positions appended) and
``expert_ids_layerN`` for each MoE layer. The same graph serves prefill (past of length 0, the
whole prompt as ``input_ids``) and decode (one new token per step): the past length is a dynamic
axis, and new tokens sit at positions ``past .. past + new - 1``.

Export also stores the golden greedy continuation of the torch reference with a cache: the prompt,
the generated tokens and, per step, the experts each MoE layer routed the new token to.

Imports torch when its functions run, never at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from portable_moe.config import ModelConfig
from portable_moe.errors import ExportError

DECODER_NAME = "decoder.onnx"
# The longest sequence (prompt plus generated tokens) the decoder graph is exported and declared for.
DEFAULT_MAX_POSITIONS = 4096
# Golden continuation: the first row of the golden inputs, cut to this many tokens, then greedy steps.
GOLDEN_PROMPT_TOKENS = 8
GOLDEN_NEW_TOKENS = 32
# The golden continuation's logits per step ([steps, vocab]), in ONNX's test-data layout.
GOLDEN_LOGITS_DIR = "generation_golden"

Progress = Callable[[str], None]


def cache_names(config: ModelConfig) -> tuple[list[str], list[str]]:
    """The decoder graph's cache inputs and outputs, in order: (past names, present names)."""
    past, present = [], []
    for layer in range(config.num_hidden_layers):
        past += [f"past_key_layer{layer}", f"past_value_layer{layer}"]
        present += [f"present_key_layer{layer}", f"present_value_layer{layer}"]
    return past, present


def decoder_output_names(config: ModelConfig) -> tuple[list[str], dict[str, int]]:
    """The decoder graph's outputs in order, and which carry routing (name -> layer index)."""
    routing = {f"expert_ids_layer{layer}": layer for layer in config.moe_layer_indices}
    return ["logits", *cache_names(config)[1], *routing], routing


def cached_decoder(model: Any) -> Any:
    """Wrap the reference :class:`~exporters.reference_model.MoETransformer` as a one-step decoder with a cache.

    The wrapper reuses the model's modules and weights (nothing is copied). Its
    ``forward(input_ids, *past)`` takes ``past_key/past_value`` per layer, flattened in layer order,
    and returns ``(logits, *present, *expert_ids)``.
    """
    import torch

    class CachedDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            hidden = self.model.embed_tokens(input_ids)
            present, routing = [], []
            for index, layer in enumerate(self.model.layers):
                attended, key, value = _cached_attention(
                    layer.attention,
                    self.model.inverse_frequency,
                    layer.input_norm(hidden),
                    past[2 * index],
                    past[2 * index + 1],
                )
                hidden = hidden + attended
                normed = layer.post_attention_norm(hidden)
                if hasattr(layer.mlp, "gate_weight"):  # an MoE block: output, expert ids, dropped
                    mlp_out, expert_ids, _ = layer.mlp(normed)
                    routing.append(expert_ids)
                else:
                    mlp_out = layer.mlp(normed)
                hidden = hidden + mlp_out
                present += [key, value]
            logits = self.model.lm_head(self.model.norm(hidden))
            return (logits, *present, *routing)

    return CachedDecoder().eval()


def _cached_attention(
    attention: Any, inverse_frequency: Any, hidden: Any, past_key: Any, past_value: Any
) -> tuple[Any, Any, Any]:
    """The reference attention on new positions after ``past``: (output, present key, present value).

    Rotary positions continue from the past length; a new query attends every past position and
    the new positions up to its own (causal within the new block).
    """
    import torch

    from exporters.reference_model import apply_rotary, rotary_tables

    new = hidden.shape[1]
    query, key, value = attention.project(hidden)
    past_length = past_key.shape[2]
    positions = torch.arange(new, dtype=torch.float32) + past_length
    cos, sin = rotary_tables(positions[:, None], inverse_frequency)
    query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    key = torch.cat((past_key, key), dim=2)
    value = torch.cat((past_value, value), dim=2)
    query_position = torch.arange(new)[:, None] + past_length
    future = torch.arange(key.shape[2])[None, :] > query_position
    return attention.attend(query, key, value, future), key, value


def empty_cache(config: ModelConfig, batch: int = 1) -> list[np.ndarray]:
    """A cache of length 0 for every layer, in the decoder's input order (what prefill takes)."""
    shape = (batch, config.num_attention_heads, 0, config.head_dim)
    return [np.zeros(shape, dtype=np.float32) for _ in cache_names(config)[0]]


def _run_torch(decoder: Any, input_ids: np.ndarray, past: list[np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    names, _ = decoder_output_names(decoder.model.config)
    with torch.no_grad():
        values = decoder(torch.from_numpy(input_ids), *(torch.from_numpy(p) for p in past))
    return {name: value.numpy() for name, value in zip(names, values)}


def greedy_continuation(decoder: Any, prompt_ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
    """The torch reference's greedy continuation of a ``[1, S]`` prompt, with its cache.

    Returns:
        ``({"prompt_ids", "tokens", "expert_ids", "logit_margins"}, logits [steps, vocab])``:
        ``expert_ids[step][layer]`` lists the experts the position that chose ``tokens[step]`` (the
        prompt's last position at step 0) was routed to in each MoE layer; ``logit_margins[step]``
        is its largest logit minus the runner-up (how near a tie the greedy choice was).
    """
    config = decoder.model.config
    _, routing = decoder_output_names(config)
    past_names, present_names = cache_names(config)
    past, feed = empty_cache(config), prompt_ids
    tokens: list[int] = []
    steps: list[dict[str, list[int]]] = []
    logits: list[np.ndarray] = []
    for _ in range(new_tokens):
        outputs = _run_torch(decoder, feed, past)
        logits.append(outputs["logits"][0, -1])
        token = int(np.argmax(logits[-1]))
        tokens.append(token)
        steps.append({str(layer): outputs[name][0, -1].tolist() for name, layer in routing.items()})
        past = [outputs[name] for name in present_names]
        feed = np.array([[token]], dtype=np.int64)
    margins = [float(np.diff(np.sort(step)[-2:])[0]) for step in logits]
    record = {"prompt_ids": prompt_ids[0].tolist(), "tokens": tokens, "expert_ids": steps, "logit_margins": margins}
    return record, np.stack(logits)


@dataclass
class DecoderExport:
    """A decoder graph written by :func:`export_decoder`, waiting for validation.

    Attributes:
        path: the written decoder.onnx.
        cases: (feeds, expected outputs) pairs from torch to validate the graph on.
        golden: the greedy continuation (see :func:`greedy_continuation`).
        golden_logits: its logits per step, ``[steps, vocab]``.
        max_positions: the longest sequence the graph is declared for.
    """

    path: Path
    cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
    golden: dict[str, Any]
    golden_logits: np.ndarray
    max_positions: int


def _validation_cases(
    decoder: Any, golden_ids: np.ndarray
) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Prefill of a batch-2 prompt, then one decode step on its cache: torch's outputs for both."""
    config = decoder.model.config
    past_names, present_names = cache_names(config)
    prompt = golden_ids[:, : max(1, golden_ids.shape[1] // 2)]
    prefill_feeds = {"input_ids": prompt, **dict(zip(past_names, empty_cache(config, prompt.shape[0])))}
    prefill = _run_torch(decoder, prompt, empty_cache(config, prompt.shape[0]))
    step_ids = golden_ids[:, prompt.shape[1] : prompt.shape[1] + 1]
    past = [prefill[name] for name in present_names]
    step_feeds = {"input_ids": step_ids, **dict(zip(past_names, past))}
    return [(prefill_feeds, prefill), (step_feeds, _run_torch(decoder, step_ids, past))]


def export_decoder(
    model: Any,
    golden_ids: Any,
    directory: Path,
    lowering: Any,
    opset: int,
    say: Progress,
    max_positions: int = DEFAULT_MAX_POSITIONS,
) -> DecoderExport:
    """Export the cache-carrying decoder of the reference model (its MoE lowering already set).

    Args:
        model: the reference :class:`~exporters.reference_model.MoETransformer`.
        golden_ids: the bundle's golden inputs (``[batch, seq]`` int64 tensor).
        directory: the staged bundle; ``decoder.onnx`` goes there.
        lowering: the :class:`~exporters.lowerings.Lowering` the model uses.
        opset: the ai.onnx opset.
        say: progress callback.
        max_positions: the longest sequence the graph is declared for (its past axis allows one less).

    Raises:
        ExportError: for a model that is not the reference model, or when torch.onnx.export fails.
    """
    import torch

    from exporters.layered import quiet_exporter

    if not hasattr(model, "embed_tokens") or not hasattr(model, "layers"):
        raise ExportError(
            "the cache-carrying decoder is exported for preset models only; export this source without --generation"
        )
    config = model.config
    decoder = cached_decoder(model)
    ids = golden_ids.numpy()
    say(f"generation: greedy continuation of the torch reference ({GOLDEN_NEW_TOKENS} tokens, with a cache)")
    golden, golden_logits = greedy_continuation(decoder, ids[:1, :GOLDEN_PROMPT_TOKENS], GOLDEN_NEW_TOKENS)
    cases = _validation_cases(decoder, ids)

    say(f"generation: exporting the cache-carrying decoder ({DECODER_NAME})")
    past_names, _ = cache_names(config)
    names, _ = decoder_output_names(config)
    batch = torch.export.Dim("batch", min=1, max=4096)
    new = torch.export.Dim("new", min=1, max=max_positions)
    past_length = torch.export.Dim("past", min=0, max=max_positions - 1)
    # Example shapes distinct from each other and from 0/1, so that no axis is specialised.
    example_past = [torch.zeros(2, config.num_attention_heads, 3, config.head_dim) for _ in past_names]
    example_ids = golden_ids[:2, :5]
    implementation = lowering.load()
    path = directory / DECODER_NAME
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                decoder,
                (example_ids, *example_past),
                dynamo=True,
                input_names=["input_ids", *past_names],
                output_names=names,
                # forward(input_ids, *past): the past tensors are one varargs entry.
                dynamic_shapes=({0: batch, 1: new}, tuple({0: batch, 2: past_length} for _ in past_names)),
                opset_version=opset,
                custom_translation_table=getattr(implementation, "CUSTOM_TRANSLATION_TABLE", None),
                optimize=True,
                verbose=False,
            )
            if hasattr(implementation, "after_export"):
                implementation.after_export(program)
            program.save(str(path))
    except Exception as error:
        raise ExportError(
            f"torch.onnx.export failed for the {config.name} decoder ({lowering.name} lowering): {error}"
        ) from error
    return DecoderExport(path, cases, golden, golden_logits, max_positions)


def finish_decoder(
    export: DecoderExport,
    config: ModelConfig,
    weight_plan: Any,
    precision: str,
    say: Progress,
) -> dict[str, Any]:
    """Store the decoder's weights in the bundle's format, validate it, and return its manifest entry.

    Raises:
        ExportError: when the graph fails the ONNX checker or disagrees with torch.
    """
    import onnx

    from exporters.validation import validate_graph
    from exporters.weight_pass import apply_weight_plan
    from portable_moe.bundle import write_tensors
    from portable_moe.tensors import specs_from_onnx

    names, routing = decoder_output_names(config)
    apply_weight_plan(export.path, weight_plan, list(routing), None)
    validate_graph(export.path, export.cases, routing, precision, say, "torch (with a cache)")
    inputs, outputs = specs_from_onnx(onnx.load(str(export.path), load_external_data=False))
    past_names, present_names = cache_names(config)
    write_tensors(export.path.parent / GOLDEN_LOGITS_DIR, "output", {"logits": export.golden_logits})
    return {
        "decoder_file": DECODER_NAME,
        "max_positions": export.max_positions,
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": [spec.to_dict() for spec in outputs],
        "past": past_names,
        "present": present_names,
        "routing_outputs": routing,
        "cache_shape": ["batch", config.num_attention_heads, "past", config.head_dim],
        "golden": export.golden,
        "golden_logits_dir": GOLDEN_LOGITS_DIR,
    }
