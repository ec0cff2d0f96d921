"""Export the reference model to a self-checking bundle.

Steps: build the seeded reference model; compute the golden outputs with the reference routed
experts; export with the chosen MoE lowering and dynamic batch and sequence axes; validate (the
ONNX checker's full check with shape inference, then ONNX Runtime against torch on the golden
inputs and on a second shape); write the bundle atomically. An export that fails validation
writes nothing.
"""

from __future__ import annotations

import functools
import gc
import importlib.metadata
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from exporters.layered import LayeredModel
from exporters.lowerings import Lowering, get_lowering
from exporters.sources import ExportSource, output_names
from exporters.torch_onnx_shortcuts import drop_trace_records, fast_tracing, quiet_exporter
from exporters.validation import Progress, validate_graph
from exporters.weight_formats import get_weight_format, plan_weights
from exporters.weight_pass import apply_weight_plan
from portable_moe.bundle import MODEL_NAME, Bundle, bundle_writer, load_bundle, write_manifest
from portable_moe.compare import with_weights
from portable_moe.config import ModelConfig, get_preset
from portable_moe.errors import BundleError, ExportError
from portable_moe.tensors import specs_from_onnx

DEFAULT_OPSET = 20
# Torch weights of at least this many bytes are collected before ONNX Runtime loads the exported graph.
_COLLECT_BEFORE_VALIDATION_BYTES = 64 * 2**20
# Weights beyond 1 GiB go to external data: protobuf refuses messages over 2 GiB, and the margin
# leaves room for the graph itself. Tensors under 1 KiB stay inline even then (shapes, small constants).
DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES = 2**30
_INLINE_TENSOR_BYTES = 1024


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ExportError(
            "exporting needs torch and onnxscript; install them with: pip install 'portable-moe[export]'"
        ) from None
    return torch


def _torch_outputs(model: Any, input_ids: Any, names: list[str]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        logits, routing, *dropped = model(input_ids)
    values = [logits, *routing, *(dropped[0] if dropped else ())]
    return dict(zip(names, [value.numpy() for value in values]))


def calibrate_capacity_factor(config: ModelConfig, routing: list[np.ndarray], headroom: float = 1.25) -> float:
    """The smallest quarter-step capacity factor that gives the busiest expert ``headroom`` x its load.

    Args:
        config: the model's sizes.
        routing: selected expert ids per MoE layer, on the inputs to calibrate on.
        headroom: margin over the busiest expert's load.
    """
    worst = 0.0
    for expert_ids in routing:
        tokens = expert_ids.size // config.num_experts_per_tok
        average = tokens * config.num_experts_per_tok / config.n_routed_experts
        loads = np.bincount(expert_ids.reshape(-1), minlength=config.n_routed_experts)
        worst = max(worst, loads.max() / average)
    return float(np.ceil(worst * headroom * 4) / 4)


def _save_onnx(
    module: Any,
    example: Any,
    input_name: str,
    output_names: list[str],
    dynamic_axes: dict[int, Any],
    opset: int,
    lowering: Lowering,
    path: Path,
    external_data_threshold_bytes: int | None = None,
) -> bool:
    """torch.onnx.export (dynamo) with the lowering's translation table and rewrite, saved to ``path``.

    Initializers go to external data beside ``path`` when they total more than
    ``external_data_threshold_bytes`` (default: :data:`DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES`).

    Returns:
        True when the weights were written as external data.
    """
    import torch

    implementation = lowering.load()
    with quiet_exporter(), fast_tracing():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[input_name],
            output_names=output_names,
            dynamic_shapes={input_name: dynamic_axes},
            opset_version=opset,
            custom_translation_table=getattr(implementation, "CUSTOM_TRANSLATION_TABLE", None),
            optimize=True,
            verbose=False,
        )
        if hasattr(implementation, "after_export"):
            implementation.after_export(program)
        return save_onnx_model(program.model, path, external_data_threshold_bytes)


def _preset_source(config: ModelConfig, seed: int, golden_batch: int, golden_seq: int, say: Progress) -> ExportSource:
    from exporters.reference_model import build_model, golden_inputs

    say(f"building the {config.name} reference model (seed {seed})")
    model = build_model(config, seed)
    names, _ = output_names(config)
    golden_ids = golden_inputs(config, seed, golden_batch, golden_seq)["input_ids"]
    second_ids = golden_inputs(config, seed + 100, 1, max(1, golden_seq // 2 + 1))["input_ids"]
    golden_out = _torch_outputs(model, golden_ids, names)  # the reference routed experts (dense)
    return ExportSource(model, config, golden_ids, second_ids, golden_out, manifest={"preset": config.name})


def save_onnx_model(model: Any, path: Path, external_data_threshold_bytes: int | None = None) -> bool:
    """Write an ``onnx_ir`` model to ``path``; beyond ``external_data_threshold_bytes`` of initializers
    (default :data:`DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES`), the weights go to ``<path name>.data``
    beside it (ONNX external data), small tensors stay inline.

    Protobuf cannot hold a message over 2 GiB, so a model near that size must keep its weights
    outside ``model.onnx``; below the threshold one self-contained file is simpler to handle. After
    saving, the in-memory model lets go of its weights (they may wrap the torch model's tensors), so
    that memory is freed before ONNX Runtime loads the saved copy.

    Returns:
        True when the weights were written as external data.
    """
    import onnx_ir

    drop_trace_records(model)
    threshold = (
        DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES
        if external_data_threshold_bytes is None
        else external_data_threshold_bytes
    )
    weights = sum(
        value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None
    )
    external = weights > threshold
    if external:
        onnx_ir.save(model, path, external_data=f"{path.name}.data", size_threshold_bytes=_INLINE_TENSOR_BYTES)
    else:
        onnx_ir.save(model, path)
    for value in model.graph.initializers.values():
        value.const_value = None
    return external


def export_model_to_onnx(
    model: LayeredModel,
    path: str | os.PathLike[str],
    *,
    lowering: Lowering | str = "dense",
    opset: int = DEFAULT_OPSET,
    progress: Progress | None = None,
    example_ids: Any = None,
    external_data_threshold_bytes: int | None = None,
) -> bool:
    """Export a layered model to one ONNX file, exporting each kind of decoder layer once.

    The graph's input is ``input_ids [batch, seq]`` int64; its outputs are ``logits``, then
    ``expert_ids_layer{N}`` for each MoE layer N, then ``dropped_slots_layer{N}`` when the lowering
    reports drops (see :func:`output_names`). Nothing is validated here: :func:`export_bundle`
    checks the graph and compares it with torch.

    Args:
        model: a :class:`~exporters.layered.LayeredModel` (a ``torch.nn.Module``) whose MoE blocks
            already run ``lowering``'s routed experts.
        path: the .onnx file to write.
        lowering: the lowering (or its name) whose translation table and graph rewrite to apply.
        opset: the ai.onnx opset.
        progress: called with a short message at each step.
        example_ids: ``input_ids [batch, seq]`` to trace with (seq >= 2); seeded random ids if None.
        external_data_threshold_bytes: bytes of weights above which they are written as external data.

    Returns:
        True when the weights were written as external data.

    Raises:
        ExportError: torch missing, an unknown lowering, the export failed, or the layers that
            route are not ``model.config.moe_layer_indices``.
    """
    torch = _import_torch()
    from exporters.layer_graphs import export_layered

    lowering = get_lowering(lowering) if isinstance(lowering, str) else lowering
    if example_ids is None:
        generator = torch.Generator().manual_seed(0)
        example_ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator, dtype=torch.int64)
    try:
        onnx_model = export_layered(model, example_ids, lowering=lowering, opset=opset, progress=progress)
    except ExportError:
        raise
    except Exception as error:
        name = getattr(model.config, "name", type(model).__name__)
        raise ExportError(f"torch.onnx.export failed for {name} ({lowering.name} lowering): {error}") from error
    return save_onnx_model(onnx_model, Path(path), external_data_threshold_bytes)


def _with_older_objects_frozen(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``function`` with the objects that exist before it outside the garbage collector's view.

    Tracing makes millions of short-lived Python objects, so the collector runs often, and each
    full collection walks every object in the process: with torch imported, a few hundred thousand.
    Frozen (``gc.freeze``), those are skipped until the call returns; what the call makes (the model
    included, which export frees before ONNX Runtime loads the graph) is collected as before. A
    caller that has frozen objects itself keeps them frozen: then nothing is frozen or unfrozen here.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if gc.get_freeze_count():
            return function(*args, **kwargs)
        gc.freeze()
        try:
            return function(*args, **kwargs)
        finally:
            gc.unfreeze()

    return wrapper


@_with_older_objects_frozen
def export_bundle(
    output_dir: str | os.PathLike[str],
    preset: str | ModelConfig | None = None,
    seed: int = 0,
    *,
    hf: str | os.PathLike[str] | None = None,
    moe_lowering: str = "dense",
    lowering_options: Mapping[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    golden_batch: int = 2,
    golden_seq: int = 16,
    overwrite: bool = False,
    progress: Progress | None = None,
    external_data_threshold_bytes: int | None = None,
    weights: str = "float32",
    block_size: int | None = None,
    weight_kernel: str = "dequantize",
    generation: bool = False,
) -> Bundle:
    """Export a preset (or config), or a local Hugging Face checkpoint, to a bundle directory.

    Args:
        output_dir: where the bundle goes; must not exist unless ``overwrite``.
        preset: a preset name ("tiny", "small", ...) or a ModelConfig; default "tiny" (exclusive
            with ``hf``).
        seed: weight seed (presets) and golden-input seed; the same preset and seed give the same
            weights and golden data.
        hf: a local checkpoint directory as transformers' ``save_pretrained`` writes it; its golden
            data comes from transformers itself (see docs/hugging-face.md). Nothing is downloaded.
        moe_lowering: how the routed experts become ONNX (see ``exporters.LOWERINGS``).
        lowering_options: options of the lowering (e.g. ``capacity_factor`` for capacity).
        opset: the ai.onnx opset to export to.
        golden_batch / golden_seq: the shape of the golden inputs.
        overwrite: replace an existing bundle (atomically).
        progress: called with a short message at each step.
        external_data_threshold_bytes: initializers totalling more than this go to external data
            files beside model.onnx (default 1 GiB; protobuf cannot hold more than 2 GiB).
        weights: the weight format (see ``exporters.weight_formats``): float32, float16,
            bfloat16, int8 or int4; applied as a pass over the exported graph before validation.
            The golden data stay the float32 torch outputs.
        block_size: int8/int4 inputs per scale (0: per output channel); None: the format's default.
        weight_kernel: "dequantize" (standard ONNX) or "matmulnbits" (ONNX Runtime's fused node).
        generation: also export the cache-carrying decoder graph and the golden greedy
            continuation (``exporters.decode_graph``; for a checkpoint, ``exporters.hf.decoder`` and
            transformers' own ``generate``). Off by default: it roughly doubles the export time.

    Returns:
        The written, verified bundle.

    Raises:
        ConfigError: unknown preset, or a preset that is for cost estimates only.
        ExportError: torch missing, both ``preset`` and ``hf`` given, an unknown lowering or option,
            an unusable checkpoint, the export failed, the graph disagrees with torch (or
            transformers), or a capacity-limited lowering drops tokens on the golden inputs.
        BundleError: ``output_dir`` exists and ``overwrite`` is false.
    """
    say = progress or (lambda message: None)
    if hf is not None and preset is not None:
        raise ExportError("pass either a preset or an hf checkpoint directory, not both")
    config = None
    if hf is None:
        config = preset if isinstance(preset, ModelConfig) else get_preset(preset or "tiny")
    else:
        from exporters.hf.checkpoint import checkpoint_directory

        checkpoint_directory(hf)  # a missing directory or a hub id fails before anything else
    lowering = get_lowering(moe_lowering)
    weight_plan = plan_weights(weights, block_size, weight_kernel)  # refuse bad formats before the slow part
    if Path(output_dir).exists() and not overwrite:  # fail before the slow part (importing torch included)
        raise BundleError(f"{output_dir} already exists; choose another directory or pass overwrite (--force)")
    torch = _import_torch()

    if hf is not None:
        from exporters.hf.source import hf_source

        source = hf_source(hf, seed, golden_batch, golden_seq, say, generation)
    else:
        source = _preset_source(config, seed, golden_batch, golden_seq, say)
    model, config, source_manifest = source.model, source.config, source.manifest
    golden_ids, second_ids, golden_out = source.golden_ids, source.second_ids, dict(source.golden_out)
    names, routing = output_names(config)

    options = {**lowering.option_defaults(), **(lowering_options or {})}
    if options.get("capacity_factor") == "auto":
        options["capacity_factor"] = calibrate_capacity_factor(config, [golden_out[name] for name in routing])
        say(f"capacity factor calibrated on the golden inputs: {options['capacity_factor']}")
    model.set_routed_experts(lowering.routed_experts(options))
    with torch.no_grad():
        reports_drops = len(model(golden_ids)) == 3
    if reports_drops:
        names, routing = output_names(config, reports_drops=True)
        lowered_golden = _torch_outputs(model, golden_ids, names)
        dropped = {name: int(lowered_golden[name]) for name in names if name.startswith("dropped_slots")}
        if any(dropped.values()):
            raise ExportError(
                f"the {lowering.name} lowering drops token-slots on the golden inputs ({dropped}) with options "
                f"{options}; DeepSeek's routing is dropless: raise capacity_factor (or leave it at auto)"
            )
        golden_out.update({name: np.array(0, dtype=np.int64) for name in dropped})
    second_out = _torch_outputs(model, second_ids, names)
    if source.second_out is not None:  # expected values from the source; drop counts from the lowered model
        second_out = {**second_out, **source.second_out}

    with bundle_writer(output_dir, overwrite=overwrite) as staging:
        say(f"exporting to ONNX opset {opset} with the {lowering.name} MoE lowering")
        model_path = staging / MODEL_NAME
        external = export_model_to_onnx(
            model,
            model_path,
            lowering=lowering,
            opset=opset,
            progress=say,
            example_ids=golden_ids,
            external_data_threshold_bytes=external_data_threshold_bytes,
        )
        if external:
            say("weights written as ONNX external data beside model.onnx")
        decoder = None
        if generation:
            from exporters.decode_graph import export_decoder

            decoder = export_decoder(model, golden_ids, staging, lowering, opset, say, golden=source.continuation)
        # The torch model is no longer needed: free its weights before ONNX Runtime loads its own copy,
        # where they are big enough to matter (the collection walks every object made since the export
        # began: about 0.4 s after a 4-layer Hugging Face export).
        weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
        source = model = None
        if weight_bytes >= _COLLECT_BEFORE_VALIDATION_BYTES:
            gc.collect()

        import onnx

        fp8_sources = None
        if hf is not None and get_weight_format(weight_plan.weights).quantized:
            from exporters.fp8_sources import fp8_sources_of_checkpoint

            fp8_sources = fp8_sources_of_checkpoint(hf)
        weights_record = apply_weight_plan(model_path, weight_plan, list(routing), say, fp8_sources)
        golden_feeds = {"input_ids": golden_ids.numpy()}
        validate_graph(
            model_path,
            [(golden_feeds, golden_out), ({"input_ids": second_ids.numpy()}, second_out)],
            routing,
            with_weights("exact", weights_record["key"]),
            say,
            "transformers" if hf is not None else "torch",
        )

        if decoder is not None:
            from exporters.decode_graph import finish_decoder

            precision = with_weights("exact", weights_record["key"])
            extra_generation = {"generation": finish_decoder(decoder, config, weight_plan, precision, say, fp8_sources)}
        proto = onnx.load(str(model_path), load_external_data=False)
        inputs, outputs = specs_from_onnx(proto)
        extra: dict[str, Any] = {
            **source_manifest,
            "seed": seed,
            # A weight format may raise it (block-wise and int4 DequantizeLinear need opset 21).
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "ir_version": proto.ir_version,
            "moe_lowering": lowering.name,
            "moe_lowering_options": options,
            "routing_outputs": routing,
            "weights": weights_record,
        }
        if reports_drops:
            extra["dropless_on_golden"] = True
        if decoder is not None:
            extra.update(extra_generation)
        if hf is not None:
            from exporters.hf.tokenizer import copy_tokenizer

            extra.update(copy_tokenizer(hf, staging, say))
        extra["versions"] = {
            package: _version(package)
            for package in ("portable-moe", "torch", "onnx", "onnxscript", "onnxruntime", "numpy", "transformers")
        }
        write_manifest(
            staging, inputs=inputs, outputs=outputs, golden=[(golden_feeds, golden_out)], config=config, extra=extra
        )
    say(f"wrote {output_dir}")
    return load_bundle(output_dir)


def _moe_layer_module(block: Any) -> Any:
    """A module that runs one MoE block on ``[tokens, hidden]`` (torch is imported only when exporting)."""
    import torch

    class MoELayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return self.block(hidden.unsqueeze(0))[0].squeeze(0)

    return MoELayer().eval()


def export_moe_layer(
    path: str | os.PathLike[str],
    config: ModelConfig,
    seed: int = 0,
    moe_lowering: str = "dense",
    lowering_options: Mapping[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
) -> tuple[Any, dict[str, Any]]:
    """Export the first MoE block of a model alone: ``hidden [tokens, hidden_size] -> output``.

    For benchmarks of the MoE layer in isolation. Unlike :func:`export_bundle` this writes a bare
    .onnx file, not a bundle, and only checks that ONNX Runtime can load it.

    Returns:
        ``(torch_module, resolved_lowering_options)``: the eager module with the lowering applied,
        for side-by-side timing.
    """
    torch = _import_torch()
    from exporters.reference_model import build_model

    lowering = get_lowering(moe_lowering)
    model = build_model(config, seed)
    block = model.moe_blocks[0]
    options = {**lowering.option_defaults(), **(lowering_options or {})}
    if options.get("capacity_factor") == "auto":
        raise ExportError(
            "export_moe_layer needs an explicit capacity_factor (there is no golden data to calibrate on)"
        )
    block.routed_experts = lowering.routed_experts(options)
    layer = _moe_layer_module(block)
    example = torch.randn(4, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    tokens = torch.export.Dim("tokens", min=1, max=65536)
    _save_onnx(layer, example, "hidden", ["output"], {0: tokens}, opset, lowering, Path(path))
    return layer, options
