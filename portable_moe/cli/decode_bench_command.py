"""``portable-moe bench BUNDLE --decode``: prefill and decode tokens/s with a cache, against torch eager."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from portable_moe.errors import InputError


class _GeneratorEngine:
    """A backend's compiled decoder graph as a decode engine."""

    def __init__(self, generator: Any, name: str) -> None:
        self.generator = generator
        self.name = name

    def empty_cache(self, batch: int, positions: int) -> Any:
        return self.generator.empty_cache(batch, positions)

    def step(self, input_ids: Any, cache: Any) -> Any:
        return self.generator.step(input_ids, cache).cache


def _eager_baseline(bundle: Any, threads: int, checkpoint: str | None) -> tuple[Any | None, str]:
    """The eager baseline as an engine, or None and why not: transformers on its checkpoint for a
    bundle exported from one, else the torch reference model.

    Raises:
        InputError: ``checkpoint`` (``--hf``) given for a preset bundle, or not the checkpoint the
            bundle was exported from.
    """
    from_checkpoint = (bundle.manifest.get("source") or {}).get("kind") == "huggingface"
    name = "transformers eager" if from_checkpoint else "torch eager"
    if checkpoint is not None and not from_checkpoint:
        raise InputError(
            f"--hf is for bundles exported from a Hugging Face checkpoint; {bundle.path} was exported from a "
            "preset (its baseline is the torch reference model): leave out --hf"
        )
    if importlib.util.find_spec("torch") is None:
        return None, f"{name}: not timed (torch is not installed; pip install 'portable-moe[export]')"
    if from_checkpoint:
        if checkpoint is None:
            return None, f"{name}: not timed (give the checkpoint directory {bundle.path} was exported from: --hf DIR)"
        if importlib.util.find_spec("transformers") is None:
            return None, f"{name}: not timed (transformers is not installed; pip install 'portable-moe[hf]')"
        from exporters.hf.eager_decoding import TransformersEagerDecoder, check_checkpoint_matches

        return TransformersEagerDecoder(check_checkpoint_matches(bundle, checkpoint), threads), ""
    if not bundle.manifest.get("preset"):
        return None, f"{name}: not timed (the reference model is built for preset bundles only)"
    from exporters.reference_decoding import TorchEagerDecoder

    return TorchEagerDecoder(bundle.config, int(bundle.manifest.get("seed", 0)), threads), ""


def command_bench_decode(args: argparse.Namespace) -> int:
    """Run ``bench --decode``; returns the exit code."""
    from rich.markup import escape
    from rich.table import Table

    from portable_moe.bundle import load_bundle
    from portable_moe.cli.console import EXIT_OK, finish_steps, parse_options, print_result, show_step, stderr
    from portable_moe.perf.decode_bench import (
        bench_decode,
        cache_read_bytes,
        check_decode_request,
        decode_weight_bytes,
        measure_matvec_bandwidth,
        parse_batches,
        parse_contexts,
    )
    from portable_moe.run.generation import Generator, decoder_spec

    if args.bundle is None or args.seq is not None or args.compare or args.estimate or args.cluster:
        raise InputError(
            "--decode times one bundle with --context, --batch and --steps; leave out --seq, --compare, --estimate "
            "and --cluster"
        )
    contexts = parse_contexts(args.context or "128,1024")
    batches = parse_batches(args.batch or "1")
    bundle = load_bundle(args.bundle)
    spec = decoder_spec(bundle)
    check_decode_request(contexts, batches, args.steps, spec.max_positions)
    options = parse_options(args.option)
    show_step(f"compiling the decoder graph for {args.backend}")
    generator = Generator(bundle, args.backend, options)
    engines: list[Any] = [_GeneratorEngine(generator, f"{generator.backend.name} ({generator.io})")]
    if args.numpy_cache:
        plain = Generator(bundle, args.backend, options, io_binding=False)
        engines.append(_GeneratorEngine(plain, f"{plain.backend.name} ({plain.io})"))
    threads = int(options.get("threads", 0) or 0)
    torch_engine, torch_note = _eager_baseline(bundle, threads, args.hf)
    if torch_engine is not None:
        engines.append(torch_engine)
    show_step("measuring this machine's matrix-vector bandwidth")
    bandwidth = measure_matvec_bandwidth(threads=threads)
    config = bundle.config
    weights = {batch: decode_weight_bytes(config, batch, bundle.weight_format) for batch in batches}
    floors_ms = {batch: weights[batch] / bandwidth * 1000.0 for batch in batches}
    timings = bench_decode(engines, config.vocab_size, contexts, batches, args.steps, show_step)
    finish_steps()

    table = Table(
        title=f"{bundle.name}: prefill context - {args.steps} random tokens, then {args.steps} decode steps of new "
        "random tokens"
    )
    columns = (
        "batch",
        "context",
        "engine",
        "prefill tok/s",
        "decode ms/step",
        "CPU ms/step",
        "decode tok/s",
        "vs torch",
        "vs floor",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "engine" else "right")
    torch_name = torch_engine.name if torch_engine is not None else None
    torch_ms = {(t.batch, t.context): t.decode_step_ms for t in timings if t.engine == torch_name}
    for timing in timings:
        versus_torch = torch_ms.get((timing.batch, timing.context))
        table.add_row(
            str(timing.batch),
            str(timing.context),
            escape(timing.engine),
            f"{timing.prefill_tokens_per_second:,.0f}",
            f"{timing.decode_step_ms:.2f}",
            f"{timing.decode_step_cpu_ms:.2f}",
            f"{timing.decode_tokens_per_second:,.1f}",
            "-" if versus_torch is None else f"{versus_torch / timing.decode_step_ms:.2f}x",
            f"{timing.decode_step_ms / floors_ms[timing.batch]:.2f}x",
        )
    print_result(table)
    print_result(
        f"bandwidth floor: the weights a decode step reads / {bandwidth / 1e9:.1f} GB/s matrix-vector bandwidth "
        f"(ONNX Runtime MatMul over 128 MiB, {threads or 'default'} threads); 'vs torch' is torch's time over this "
        "engine's, 'vs floor' this engine's time over the floor; 'CPU ms/step' is the process's CPU time per step "
        "(all threads): with one thread, a step that took longer than that waited for a core"
    )
    for batch in batches:
        print_result(
            f"  batch {batch}: {weights[batch] / 2**20:.1f} MiB of weights per step = {floors_ms[batch]:.2f} ms/step"
        )
        for context in contexts:
            read = cache_read_bytes(config, context, batch)
            print_result(
                f"    at context {context} a step also reads {read / 2**20:.1f} MiB of cache: floor with it "
                f"{(weights[batch] + read) / bandwidth * 1000.0:.2f} ms/step"
            )
    if torch_note:
        stderr.print(torch_note)
    if args.json:
        report = {
            "bundle": str(bundle.path),
            "batches": batches,
            "contexts": contexts,
            "steps": args.steps,
            "matvec_bandwidth_bytes_per_second": bandwidth,
            "floors": {
                str(batch): {
                    "weight_bytes_per_step": weights[batch],
                    "floor_ms_per_step": floors_ms[batch],
                    "cache_bytes_per_step": {
                        str(context): cache_read_bytes(config, context, batch) for context in contexts
                    },
                }
                for batch in batches
            },
            "timings": [timing.to_dict() for timing in timings],
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
        stderr.print(f"report written to {escape(args.json)}")
    return EXIT_OK
