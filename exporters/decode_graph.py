"""The cache-carrying decoder graph: one step of generation with past keys and values.

``decoder.onnx`` takes ``input_ids [batch, new]`` and, per decoder layer, ``past_key_layerN`` and
``past_value_layerN`` ``[batch, heads, past, head_dim]`` (or one ``past_latent_layerN`` for
DeepSeek-V3 checkpoints: see :class:`CacheLayout`); it returns ``logits [batch, new, vocab]``,
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
# The cache is float32 whatever the weight format.
CACHE_BYTES_PER_VALUE = 4

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CacheLayout:
    """How a decoder graph's cache is laid out: per layer, one float32 tensor per part, each
    ``[batch, heads, past, width]``.

    Attributes:
        form: ``"per-head"`` (a key and a value per attention head) or ``"latent"`` (DeepSeek's
            multi-head latent attention: the compressed latent and the rotary key, one "head").
        layers: decoder layers.
        heads: the tensors' head axis (key/value heads, or 1 for the latent).
        width: the tensors' last axis (head dim, or kv_lora_rank + qk_rope_head_dim).
        parts: the tensors per layer, in input order (their names are ``past_<part>_layerN``).
        expanded_bytes_per_token: for the latent form, what per-head keys and values would take.
    """

    form: str
    layers: int
    heads: int
    width: int
    parts: tuple[str, ...] = ("key", "value")
    expanded_bytes_per_token: int | None = None

    def names(self) -> tuple[list[str], list[str]]:
        """The cache inputs and outputs, in order: (past names, present names)."""
        pairs = [(layer, part) for layer in range(self.layers) for part in self.parts]
        return (
            [f"past_{part}_layer{layer}" for layer, part in pairs],
            [f"present_{part}_layer{layer}" for layer, part in pairs],
        )

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one position takes over all layers (float32)."""
        return CACHE_BYTES_PER_VALUE * self.layers * len(self.parts) * self.heads * self.width

    def empty(self, batch: int = 1) -> list[np.ndarray]:
        """A cache of length 0, in the decoder's input order (what prefill takes)."""
        return [np.zeros((batch, self.heads, 0, self.width), dtype=np.float32) for _ in self.names()[0]]

    def bytes_record(self) -> dict[str, int]:
        """Cache bytes per token by form, for the manifest: this one, and the expanded one it replaces."""
        record = {self.form: self.bytes_per_token}
        if self.expanded_bytes_per_token is not None:
            record["expanded"] = self.expanded_bytes_per_token
        return record


def preset_layout(config: ModelConfig) -> CacheLayout:
    """The reference model's cache: a key and a value per attention head and layer."""
    return CacheLayout("per-head", config.num_hidden_layers, config.num_attention_heads, config.head_dim)


def cache_names(config: ModelConfig) -> tuple[list[str], list[str]]:
    """The reference decoder graph's cache inputs and outputs, in order: (past names, present names)."""
    return preset_layout(config).names()


def decoder_output_names(layout: CacheLayout, config: ModelConfig) -> tuple[list[str], dict[str, int]]:
    """The decoder graph's outputs in order, and which carry routing (name -> layer index)."""
    routing = {f"expert_ids_layer{layer}": layer for layer in config.moe_layer_indices}
    return ["logits", *layout.names()[1], *routing], routing


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
            self.layout = preset_layout(model.config)

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
    """A cache of length 0 for every layer of the reference decoder, in input order (what prefill takes)."""
    return preset_layout(config).empty(batch)


def _run_torch(decoder: Any, input_ids: np.ndarray, past: list[np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    names, _ = decoder_output_names(decoder.layout, decoder.model.config)
    with torch.no_grad():
        values = decoder(torch.from_numpy(input_ids), *(torch.from_numpy(p) for p in past))
    return {name: value.numpy() for name, value in zip(names, values)}


def continuation_record(
    prompt_ids: list[int], tokens: list[int], expert_ids: list[dict[str, list[int]]], logits: np.ndarray
) -> dict[str, Any]:
    """A golden continuation as the manifest stores it, with each step's logit margin (best minus
    runner-up: how near a tie the greedy choice was)."""
    margins = [float(np.diff(np.sort(step)[-2:])[0]) for step in logits]
    return {"prompt_ids": prompt_ids, "tokens": tokens, "expert_ids": expert_ids, "logit_margins": margins}


def greedy_continuation(decoder: Any, prompt_ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
    """The torch reference's greedy continuation of a ``[1, S]`` prompt, with its cache.

    Returns:
        ``({"prompt_ids", "tokens", "expert_ids", "logit_margins"}, logits [steps, vocab])``:
        ``expert_ids[step][layer]`` lists the experts the position that chose ``tokens[step]`` (the
        prompt's last position at step 0) was routed to in each MoE layer; ``logit_margins[step]``
        is its largest logit minus the runner-up (how near a tie the greedy choice was).
    """
    _, routing = decoder_output_names(decoder.layout, decoder.model.config)
    _, present_names = decoder.layout.names()
    past, feed = decoder.layout.empty(), prompt_ids
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
    stacked = np.stack(logits)
    return continuation_record(prompt_ids[0].tolist(), tokens, steps, stacked), stacked


@dataclass
class DecoderExport:
    """A decoder graph written by :func:`export_decoder`, waiting for validation.

    Attributes:
        path: the written decoder.onnx.
        layout: its cache layout.
        cases: (feeds, expected outputs) pairs from torch to validate the graph on.
        golden: the greedy continuation (see :func:`greedy_continuation`).
        golden_logits: its logits per step, ``[steps, vocab]``.
        max_positions: the longest sequence the graph is declared for.
        reference: who computed the golden continuation ("torch" or "transformers"), for messages.
    """

    path: Path
    layout: CacheLayout
    cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
    golden: dict[str, Any]
    golden_logits: np.ndarray
    max_positions: int
    reference: str = "torch"


def _validation_cases(
    decoder: Any, golden_ids: np.ndarray
) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Prefill of a batch-2 prompt, then one decode step on its cache: torch's outputs for both."""
    past_names, present_names = decoder.layout.names()
    prompt = golden_ids[:, : max(1, golden_ids.shape[1] // 2)]
    empty = decoder.layout.empty(prompt.shape[0])
    prefill_feeds = {"input_ids": prompt, **dict(zip(past_names, empty))}
    prefill = _run_torch(decoder, prompt, empty)
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
    golden: tuple[dict[str, Any], np.ndarray] | None = None,
) -> DecoderExport:
    """Export the cache-carrying decoder of a model whose MoE lowering is already set.

    Args:
        model: the reference :class:`~exporters.reference_model.MoETransformer`, or a model with a
            ``cached_decoder()`` method (the Hugging Face wrapper) returning a module with the same
            contract as :func:`cached_decoder`'s and a ``layout``.
        golden_ids: the bundle's golden inputs (``[batch, seq]`` int64 tensor).
        directory: the staged bundle; ``decoder.onnx`` goes there.
        lowering: the :class:`~exporters.lowerings.Lowering` the model uses.
        opset: the ai.onnx opset.
        say: progress callback.
        max_positions: the longest sequence the graph is declared for (its past axis allows one less).
        golden: the golden continuation and its logits from the source (transformers' own
            ``generate`` for Hugging Face checkpoints); None computes it with the torch decoder.

    Raises:
        ExportError: for a model that has no cached decoder, or when torch.onnx.export fails.
    """
    import torch

    from exporters.torch_onnx_shortcuts import drop_trace_records, shortened_export

    if hasattr(model, "cached_decoder"):
        decoder = model.cached_decoder()
    elif hasattr(model, "embed_tokens") and hasattr(model, "inverse_frequency"):
        decoder = cached_decoder(model)
    else:
        raise ExportError(
            f"{type(model).__name__} has no cache-carrying decoder; export this source without --generation"
        )
    config, layout = model.config, decoder.layout
    ids = golden_ids.numpy()
    reference = "torch"
    if golden is None:
        say(f"generation: greedy continuation of the torch reference ({GOLDEN_NEW_TOKENS} tokens, with a cache)")
        golden = greedy_continuation(decoder, ids[:1, :GOLDEN_PROMPT_TOKENS], GOLDEN_NEW_TOKENS)
    else:
        reference = "transformers"
    cases = _validation_cases(decoder, ids)

    say(f"generation: exporting the cache-carrying decoder ({DECODER_NAME}, {layout.form} cache)")
    past_names, _ = layout.names()
    names, _ = decoder_output_names(layout, config)
    batch = torch.export.Dim("batch", min=1, max=4096)
    new = torch.export.Dim("new", min=1, max=max_positions)
    past_length = torch.export.Dim("past", min=0, max=max_positions - 1)
    # Example shapes distinct from each other and from 0/1, so that no axis is specialised.
    example_past = [torch.zeros(2, layout.heads, 3, layout.width) for _ in past_names]
    example_ids = golden_ids[:2, :5]
    implementation = lowering.load()
    path = directory / DECODER_NAME
    try:
        with shortened_export():
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
            drop_trace_records(program.model)
            program.save(str(path))
    except Exception as error:
        raise ExportError(
            f"torch.onnx.export failed for the {config.name} decoder ({lowering.name} lowering): {error}"
        ) from error
    return DecoderExport(path, layout, cases, golden[0], golden[1], max_positions, reference)


def check_continuation(export: DecoderExport, config: ModelConfig, precision: str) -> None:
    """Run the written decoder graph on ONNX Runtime along the golden continuation, one step at a
    time with its own cache, and compare with the golden one.

    Each step is fed the golden token (teacher forcing), so the logits and expert ids of every
    step compare like with like. With float32 weights every step's greedy token must be the golden
    one; with a reduced-precision weight format only the tolerances of ``precision`` apply (its
    tokens may legitimately differ at near-ties).

    Raises:
        ExportParityError: a token, logits or routing that disagree with the golden continuation.
    """
    from exporters.validation import parity_session
    from portable_moe.compare import compare_outputs, split_weights
    from portable_moe.errors import ExportParityError

    session = parity_session(export.path)
    output_names = [output.name for output in session.get_outputs()]
    past_names, present_names = export.layout.names()
    _, routing = decoder_output_names(export.layout, config)
    golden = export.golden
    past, feed = export.layout.empty(), np.array([golden["prompt_ids"]], dtype=np.int64)
    steps: list[dict[str, np.ndarray]] = []
    for token in golden["tokens"]:
        outputs = dict(zip(output_names, session.run(None, {"input_ids": feed, **dict(zip(past_names, past))})))
        steps.append({name: outputs[name][0, -1] for name in ["logits", *routing]})
        past = [outputs[name] for name in present_names]
        feed = np.array([[token]], dtype=np.int64)
    where = f"the decoder graph's greedy continuation disagrees with the golden one from {export.reference}"
    if split_weights(precision)[1] == "float32":
        chosen = [int(np.argmax(step["logits"])) for step in steps]
        for step, (mine, theirs) in enumerate(zip(chosen, golden["tokens"])):
            if mine != theirs:
                raise ExportParityError(
                    f"{where} at step {step}: it chose token {mine}, {export.reference} chose {theirs} (golden logit "
                    f"margin {golden['logit_margins'][step]:.2e}); no bundle was written"
                )
    expected = {"logits": export.golden_logits[None]}
    actual = {"logits": np.stack([step["logits"] for step in steps])[None]}
    for name, layer in routing.items():
        expected[name] = np.array([[step[str(layer)] for step in golden["expert_ids"]]], dtype=np.int64)
        actual[name] = np.stack([step[name] for step in steps])[None]
    failures = [c.message for c in compare_outputs(expected, actual, routing, precision) if not c.passed]
    if failures:
        raise ExportParityError(f"{where} (teacher-forced): {failures[0]}; no bundle was written")


def finish_decoder(
    export: DecoderExport,
    config: ModelConfig,
    weight_plan: Any,
    precision: str,
    say: Progress,
    fp8_sources: Any = None,
) -> dict[str, Any]:
    """Store the decoder's weights in the bundle's format, validate it, and return its manifest entry.

    ``fp8_sources`` (an :class:`exporters.fp8_sources.FP8Sources`): the FP8 checkpoint's blocks, so
    that the decoder's weights keep their scales as the model's do.

    Raises:
        ExportError: when the graph fails the ONNX checker or disagrees with torch.
        ExportParityError: when its continuation disagrees with the golden one (see :func:`check_continuation`).
    """
    import onnx

    from exporters.validation import validate_graph
    from exporters.weight_pass import apply_weight_plan
    from portable_moe.bundle import write_tensors
    from portable_moe.tensors import specs_from_onnx

    layout = export.layout
    names, routing = decoder_output_names(layout, config)
    apply_weight_plan(export.path, weight_plan, list(routing), None, fp8_sources)
    validate_graph(export.path, export.cases, routing, precision, say, "torch (with a cache)")
    say(f"validating: the decoder's greedy continuation against the golden one from {export.reference}")
    check_continuation(export, config, precision)
    inputs, outputs = specs_from_onnx(onnx.load(str(export.path), load_external_data=False))
    past_names, present_names = layout.names()
    write_tensors(export.path.parent / GOLDEN_LOGITS_DIR, "output", {"logits": export.golden_logits})
    return {
        "decoder_file": DECODER_NAME,
        "max_positions": export.max_positions,
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": [spec.to_dict() for spec in outputs],
        "past": past_names,
        "present": present_names,
        "routing_outputs": routing,
        "cache_form": layout.form,
        "cache_shape": ["batch", layout.heads, "past", layout.width],
        "cache_bytes_per_token": layout.bytes_record(),
        "golden_source": export.reference,
        "golden": export.golden,
        "golden_logits_dir": GOLDEN_LOGITS_DIR,
    }
