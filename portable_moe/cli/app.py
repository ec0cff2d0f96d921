"""The ``portable-moe`` command line.

Exit codes: 0 success, 1 a conformance check failed, 2 bad usage or bad input. Errors are one
line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from portable_moe import registry
from portable_moe.backend import BASE_OPTIONS
from portable_moe.bundle import Bundle, load_bundle
from portable_moe.cli.check_report import finish_check
from portable_moe.cli.cluster_commands import add_cluster_flag
from portable_moe.cli.console import (
    EXIT_OK,
    Notes,
    finish_steps,
    parse_options,
    print_result,
    show_step,
    start_steps,
    stderr,
    stdout,
)
from portable_moe.config import PRESETS, runnable_presets
from portable_moe.conformance.model_check import (
    NOT_CHECKED,
    check_bundle,
    input_sets_for,
)
from portable_moe.errors import InputError, PortableMoEError
from portable_moe.run.termination import Terminated, install_termination_handler
from portable_moe.tensors import NAN_POLICIES, check_nan_policy, load_npz

# Modules that add a subcommand: each has ``add_command(commands)``, which adds a parser to the
# subparsers and sets its ``handler`` (a function of the parsed args returning the exit code).
COMMAND_MODULES: list[str] = [
    "portable_moe.cli.ops_command",
    "portable_moe.cli.cluster_commands",
    "portable_moe.cli.generate_command",
]


def _print_backends() -> None:
    table = Table(title="Registered backends")
    table.add_column("name", no_wrap=True)
    table.add_column("available", no_wrap=True)
    table.add_column("what it is (vendor)")
    table.add_column("note", no_wrap=True)
    notes = Notes()
    for status in registry.list_backends():
        description = status.description + (" [simulated]" if status.simulated else "")
        table.add_row(
            status.name,
            "[green]yes[/green]" if status.available else "[red]no[/red]",
            f"{escape(description)} [dim]({escape(status.vendor)})[/dim]",
            notes.add(f"{status.name}: {status.reason}" if status.reason else ""),
        )
    print_result(table)
    notes.print()


def _print_options() -> None:
    """Every backend's declared options: NAME=DEFAULT, what it takes and what it does; then the base ones."""
    sections = [(name, registry.get_backend(name)) for name in registry.backend_names()]
    for title, options, defaults in [
        *((f"{name} (-O NAME=VALUE)", backend.declared_options, backend.option_defaults) for name, backend in sections),
        ("every backend", BASE_OPTIONS, {name: option.default for name, option in BASE_OPTIONS.items()}),
    ]:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column()
        for name, default in defaults.items():
            option = options.get(name)
            meaning = "; ".join(filter(None, [option.describe(), option.help])) if option else "(not declared)"
            shown = "unset" if default is None else default if isinstance(default, str) else json.dumps(default)
            grid.add_row(f"  {escape(name)}={escape(shown)}", escape(meaning))
        print_result(f"[bold]{escape(title)}[/bold]" + ("" if defaults else ": no options"))
        if defaults:
            print_result(grid)


def _load_feeds(bundle: Bundle, input_path: str | None) -> dict[str, np.ndarray]:
    if input_path is None:
        golden = bundle.golden_sets()
        if not golden:
            raise InputError(f"{bundle.path} has no golden inputs; pass --input FILE.npz")
        return golden[0][0]
    return load_npz(input_path, "--input")


def _capacity_factor(text: str) -> str:
    if text != "auto":
        try:
            if not float(text) > 0:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number or auto, got {text!r}") from None
    return text


def command_backends(args: argparse.Namespace) -> int:
    _print_backends()
    if args.options:
        _print_options()
    return EXIT_OK


def command_export(args: argparse.Namespace) -> int:
    from exporters import export_bundle

    lowering = args.moe_lowering
    if lowering == "auto":
        lowering = registry.resolve_lowering("auto", args.for_backend)
        stderr.print(f"auto lowering for backend {args.for_backend!r}: {lowering}")
    lowering_options: dict[str, Any] = {}
    if args.capacity_factor is not None:
        lowering_options["capacity_factor"] = "auto" if args.capacity_factor == "auto" else float(args.capacity_factor)
    if args.min_capacity is not None:
        lowering_options["min_capacity"] = args.min_capacity
    if lowering_options and lowering != "capacity":
        raise InputError(f"--capacity-factor and --min-capacity apply to the capacity lowering, not {lowering!r}")
    if args.hf is not None and args.preset is not None:
        raise InputError("--hf and --preset are exclusive: export either a checkpoint or a preset")
    kernel = _weight_kernel(args)
    bundle = export_bundle(
        args.output,
        None if args.hf is not None else (args.preset or "tiny"),
        args.seed,
        hf=args.hf,
        moe_lowering=lowering,
        lowering_options=lowering_options,
        opset=args.opset,
        overwrite=args.force,
        progress=show_step,
        weights=args.weights,
        block_size=args.block_size,
        weight_kernel=kernel,
        generation=args.generation,
    )
    print_result(
        f"bundle written to {escape(str(bundle.path))} ({bundle.moe_lowering} lowering, {bundle.weight_format} "
        f"weights, {len(bundle.manifest['files'])} files)"
    )
    generation = bundle.manifest.get("generation")
    if generation:
        sizes = generation["cache_bytes_per_token"]
        expanded = f" (per-head keys and values would take {sizes['expanded']})" if "expanded" in sizes else ""
        form = generation["cache_form"]
        print_result(f"decoder graph: {form} cache, {sizes[form]} bytes per token over all layers{expanded}")
    return EXIT_OK


def _weight_kernel(args: argparse.Namespace) -> str:
    """--weight-kernel, with auto resolved for --for-backend: MatMulNBits where the backend runs
    com.microsoft operators and the format is block-wise int8/int4, else the standard form."""
    from exporters.weight_formats import get_weight_format, resolve_block_size

    if args.weight_kernel != "auto":
        return args.weight_kernel
    if not get_weight_format(args.weights).quantized or not resolve_block_size(args.weights, args.block_size):
        return "dequantize"
    domains = registry.get_backend(args.for_backend).capabilities.domains
    kernel = "matmulnbits" if "com.microsoft" in domains else "dequantize"
    show_step(f"auto weight kernel for backend {args.for_backend!r}: {kernel}")
    return kernel


def command_convert(args: argparse.Namespace) -> int:
    from exporters.weight_pass import convert_bundle

    bundle = convert_bundle(
        args.bundle,
        args.output,
        args.weights,
        args.block_size,
        _weight_kernel(args),
        overwrite=args.force,
        progress=show_step,
    )
    stdout.print(
        f"bundle written to {escape(str(bundle.path))} ({bundle.weight_format} weights, "
        f"{bundle.manifest['weights']['converted']} tensors converted, router float32)"
    )
    return EXIT_OK


def _add_weight_options(parser: argparse.ArgumentParser) -> None:
    from exporters.weight_formats import KERNELS, WEIGHT_FORMATS

    parser.add_argument(
        "--weights",
        default="float32",
        choices=list(WEIGHT_FORMATS),
        help="how weights are stored; the router stays float32 and the golden data full precision (default: float32)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        help="int8/int4: inputs per scale, a power of two >= 16, or 0 for one scale per output channel "
        "(default: 32 for int4, 0 for int8)",
    )
    parser.add_argument(
        "--weight-kernel",
        default="dequantize",
        choices=[*KERNELS, "auto"],
        help="int8/int4 with blocks: standard DequantizeLinear (any backend), ONNX Runtime's MatMulNBits, or auto "
        "(--for-backend's choice) (default: dequantize)",
    )


def command_run(args: argparse.Namespace) -> int:
    from portable_moe.run.fallback import run_with_fallback, spread_options

    bundle = load_bundle(args.bundle)
    feeds = _load_feeds(bundle, args.input)
    options = parse_options(args.option)
    if args.nan_policy is not None:
        if "nan_policy" in options and options["nan_policy"] != args.nan_policy:
            raise InputError(
                f"--nan-policy {args.nan_policy} and -O nan_policy={options['nan_policy']} disagree; give one of them"
            )
        options["nan_policy"] = args.nan_policy
    options["nan_policy"] = check_nan_policy(options.get("nan_policy", "reject"))
    show_step(f"compiling {bundle.name} for {args.backend} and running it")
    result = run_with_fallback(
        bundle, args.backend, feeds, spread_options(args.backend, options), isolated=args.isolated, timeout=args.timeout
    )
    finish_steps()
    for attempt in result.attempts[:-1]:  # every backend passed over, and why
        stderr.print(f"[yellow]{attempt.backend} {attempt.status}[/yellow]: {escape(attempt.reason)}")
    outputs = result.outputs
    table = Table(title=f"Outputs of {bundle.name} on {result.backend_name}")
    for column in ("output", "dtype", "shape", "min", "max", "mean"):
        table.add_column(column)
    for name, value in outputs.items():
        table.add_row(
            name,
            value.dtype.name,
            escape(str(list(value.shape))),
            f"{value.min():.4g}",
            f"{value.max():.4g}",
            f"{value.mean():.4g}",
        )
    print_result(table)
    print_result(f"ran on [bold]{result.backend_name}[/bold]; placement: {escape(str(result.placement))}")
    if result.fell_back:
        print_result(f"[yellow]fell back:[/yellow] {escape(result.describe())}")
    if args.output:
        np.savez(args.output, **outputs)
        print_result(f"outputs saved to {escape(args.output)}")
    return EXIT_OK


def _time_bundle(bundle: Bundle, backend: Any, feeds: Any, args: argparse.Namespace) -> Any:
    """Compile ``bundle`` for ``backend`` and time it on ``feeds`` with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from portable_moe.perf.bench import bench_compiled

    show_step(f"compiling {bundle.name} for {backend.name}")
    compiled = backend.compile(bundle, parse_options(args.option))
    finish_steps()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=stderr, transient=True
    ) as progress:
        task = progress.add_task(f"timing {bundle.name} on {backend.name}", total=args.runs)
        return bench_compiled(
            compiled, feeds, args.warmup, args.runs, lambda done, total: progress.update(task, completed=done)
        )


def _one_batch_size(text: str | None) -> int | None:
    """``--batch`` outside ``--decode``: one integer (None when not given; its range is checked where used)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(
            f"--batch takes one batch size here (a list like 1,4 only with --decode), got {text!r}"
        ) from None


def command_bench(args: argparse.Namespace) -> int:
    from portable_moe.perf.bench import changing_token_feeds, model_bytes

    if args.decode:
        from portable_moe.cli.decode_bench_command import command_bench_decode

        return command_bench_decode(args)
    if args.hf is not None:
        raise InputError("--hf is for --decode (the transformers baseline of a bundle exported from a checkpoint)")
    args.batch = _one_batch_size(args.batch)
    if args.cluster:
        from portable_moe.cli.cluster_commands import command_bench_on_cluster

        return command_bench_on_cluster(args)
    if args.context is not None:
        raise InputError("--context is for --decode (e.g. bench BUNDLE --decode --context 128,1024)")
    if args.preset is not None or args.bundle is None:
        return _estimate_preset(args)
    bundle = load_bundle(args.bundle)
    others = [load_bundle(path) for path in args.compare or []]
    for other in others:
        if [spec.name for spec in other.inputs] != [spec.name for spec in bundle.inputs]:
            raise InputError(
                f"--compare {other.path}: its inputs {[s.name for s in other.inputs]} differ from "
                f"{[s.name for s in bundle.inputs]}; compare bundles of one model"
            )
    backend, skipped = registry.select_backend(args.backend)
    for name, reason in skipped:
        stderr.print(f"[yellow]skipped {name}[/yellow]: {escape(reason)}")
    if (args.batch is None) != (args.seq is None):
        raise InputError("give both --batch and --seq, or neither (to use the golden inputs)")
    if args.batch is None:
        feeds: Any = _load_feeds(bundle, None)
        inputs_note = "the golden input, repeated"
    else:
        feeds = changing_token_feeds(bundle, args.batch, args.seq, args.warmup + args.runs)
        inputs_note = "new random tokens every call"
    first_feed = feeds if isinstance(feeds, dict) else feeds[0]
    shape = list(next(iter(first_feed.values())).shape)
    rows = [(candidate, _time_bundle(candidate, backend, feeds, args)) for candidate in [bundle, *others]]
    result = rows[0][1]
    table = Table(
        title=f"{bundle.name} on {backend.name}, input {shape}, {inputs_note} "
        f"({result.runs} runs after {result.warmup} warm-up)"
    )
    columns = ["bundle", "weights", "model MiB", "p50 ms", "p90 ms", "min ms", "tokens/s", "peak RSS MiB"]
    columns += ["speed vs first"] if others else []
    for column in columns:
        table.add_column(column, justify="left" if column in ("bundle", "weights") else "right")
    for candidate, timing in rows:
        cells = [
            escape(candidate.name),
            candidate.weight_format,
            f"{model_bytes(candidate) / 2**20:,.1f}",
            f"{timing.p50_ms:.3f}",
            f"{timing.p90_ms:.3f}",
            f"{timing.min_ms:.3f}",
            f"{timing.tokens_per_second:,.0f}",
            f"{timing.peak_rss_mib:,.0f}",
        ]
        if others:
            cells.append(f"{result.p50_ms / timing.p50_ms:.2f}x")
        table.add_row(*cells)
    print_result(table)
    estimates = []
    if args.estimate:
        from portable_moe.perf.costmodel import estimate_bundle

        estimates = estimate_bundle(bundle, shape[0], shape[1])
        _print_estimates(estimates, f"Roofline estimate for input {shape} (an estimate, not a measurement)")
    if args.json:
        report = {"bundle": str(bundle.path), "backend": backend.name, "input_shape": shape, **result.to_dict()}
        report["inputs"] = inputs_note
        if others:
            report["compare"] = [
                {"bundle": str(candidate.path), "weight_format": candidate.weight_format, **timing.to_dict()}
                for candidate, timing in rows
            ]
        if estimates:
            report["estimates"] = _estimates_json(estimates)
        _write_json(args.json, report)
    return EXIT_OK


def _estimate_preset(args: argparse.Namespace) -> int:
    """``bench --estimate --preset NAME``: price a preset from its config, building nothing (deepseek-v3 too)."""
    from portable_moe.config import get_preset
    from portable_moe.perf.costmodel import estimate_config

    if args.bundle is not None or args.preset is None or not args.estimate:
        raise InputError(
            "give a bundle directory to time, or --estimate --preset NAME (e.g. deepseek-v3) to price a preset "
            "without building it"
        )
    batch, seq = args.batch or 1, args.seq or 1
    config = get_preset(args.preset)
    estimates = estimate_config(config, batch, seq)
    _print_estimates(
        estimates,
        f"Roofline estimate of {config.name} for input [{batch}, {seq}], sparse MoE lowering, counted from the "
        "config (an estimate, not a measurement; nothing was built)",
    )
    if args.json:
        report = {"preset": config.name, "input_shape": [batch, seq], "moe_lowering": "sparse"}
        _write_json(args.json, {**report, "estimates": _estimates_json(estimates)})
    return EXIT_OK


def _print_estimates(estimates: list[Any], title: str) -> None:
    table = Table(title=title, caption="chip figures and their sources: portable_moe/perf/data/chips.json")
    for column in ("chip", "estimated ms", "GFLOP", "MB moved"):
        table.add_column(column)
    for estimate in estimates:
        table.add_row(
            escape(estimate.chip.name),
            f"{estimate.seconds * 1000:.4f}",
            f"{estimate.flops / 1e9:.3f}",
            f"{estimate.bytes / 1e6:.1f}",
        )
    print_result(table)


def _estimates_json(estimates: list[Any]) -> list[dict[str, Any]]:
    return [{"chip": e.chip.key, "seconds": e.seconds, "flops": e.flops, "bytes": e.bytes} for e in estimates]


def _write_json(path: str, report: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(report, indent=2))
    stderr.print(f"report written to {escape(path)}")


def _checks_all(spec: str) -> bool:
    return spec.strip().casefold() == "all"


def _backend_names(spec: str) -> list[str]:
    if _checks_all(spec):
        return registry.backend_names()
    return registry.parse_backend_list(spec)


def command_check(args: argparse.Namespace) -> int:
    if args.cluster:
        from portable_moe.cli.cluster_commands import command_check_on_cluster

        return command_check_on_cluster(args)
    bundle = load_bundle(args.bundle)
    if args.generate is not None:
        from portable_moe.conformance.generation_check import check_generate_steps

        check_generate_steps(bundle, args.generate)  # before the slow part
    from portable_moe.run.fallback import spread_options

    names = _backend_names(args.backend)
    # Each backend gets the -O options it declares (precision=... reaches npu-sim, not cpu).
    options = spread_options(names, parse_options(args.option)) if args.option else None
    expected_from, input_sets = input_sets_for(bundle, args.inputs)
    checks_all = _checks_all(args.backend)
    results = check_bundle(
        bundle,
        names,
        options,
        progress=show_step,
        input_sets=input_sets,
        bisect=args.bisect,
        skip_unaccepted=checks_all,
    )
    generation = None
    if args.generate is not None:
        from portable_moe.conformance.generation_check import check_generation

        checked = [r.backend for r in results if r.status not in NOT_CHECKED]
        generation = [check_generation(bundle, name, args.generate, (options or {}).get(name)) for name in checked]
    return finish_check(
        bundle,
        results,
        args.json,
        require_all=not checks_all,
        expected_from=expected_from,
        junit_path=args.junit,
        html_path=args.html,
        generation=generation,
    )


def demo_directory(preset: str) -> Path:
    """Where the demo keeps its bundle: ``$PORTABLE_MOE_CACHE/demo/PRESET``, else ``~/.cache/portable-moe/demo/PRESET``."""
    root = os.environ.get("PORTABLE_MOE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "portable-moe") / "demo" / preset


def command_demo(args: argparse.Namespace) -> int:
    from exporters import export_bundle

    # The demo's own directory is replaced on each run; a directory the user names is replaced only with --force.
    output = Path(args.output) if args.output else demo_directory(args.preset)
    bundle = export_bundle(output, args.preset, args.seed, overwrite=args.force or not args.output, progress=show_step)
    print_result(f"exported {args.preset} to {escape(str(bundle.path))}")
    _print_backends()
    results = check_bundle(bundle, registry.backend_names(), progress=show_step, skip_unaccepted=True)
    status = finish_check(bundle, results, args.json, require_all=False)
    stderr.print(
        f"the bundle stays in {escape(str(bundle.path))}; check it again with: "
        f"portable-moe check {escape(str(bundle.path))} --backend all",
        soft_wrap=True,
    )
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portable-moe",
        description="Export a DeepSeek-style MoE model to a self-checking ONNX bundle, run it on many "
        "backends, and prove that they compute the same thing.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="show the versions of portable-moe and what it runs on"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_preset_options(command: argparse.ArgumentParser, preset_default: str | None = "tiny") -> None:
        command.add_argument(
            "--preset",
            default=preset_default,
            choices=runnable_presets(),
            help="model preset (default: tiny)",
        )
        command.add_argument(
            "--seed", type=int, default=0, help="weight seed; same preset and seed, same bundle (default: 0)"
        )
        command.add_argument("--force", action="store_true", help="replace the output directory if it exists")

    def add_option_flag(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "-O",
            "--option",
            action="append",
            metavar="NAME=VALUE",
            help="backend option, repeatable (e.g. -O threads=2); see 'portable-moe backends'",
        )

    demo = commands.add_parser("demo", help="export the tiny preset, check it on every available backend")
    add_preset_options(demo)
    demo.add_argument(
        "-o", "--output", help="write the bundle here (default: ~/.cache/portable-moe/demo/PRESET, replaced each run)"
    )
    demo.add_argument("--json", metavar="FILE", help="also write the conformance report as JSON")
    demo.set_defaults(handler=command_demo)

    export = commands.add_parser("export", help="export a preset or a Hugging Face checkpoint to a bundle directory")
    add_preset_options(export, preset_default=None)
    export.add_argument(
        "--hf",
        metavar="DIR",
        help="export a local Hugging Face checkpoint directory (config.json + safetensors) instead of a preset; "
        "nothing is downloaded",
    )
    export.add_argument("-o", "--output", required=True, help="bundle directory to create")
    from exporters.lowerings import LOWERINGS

    export.add_argument(
        "--moe-lowering",
        default="dense",
        choices=[*LOWERINGS, "auto"],
        help="how routed experts become ONNX; auto takes --for-backend's preference (default: dense)",
    )
    export.add_argument("--for-backend", default="cpu", help="backend whose preference 'auto' follows (default: cpu)")
    export.add_argument(
        "--capacity-factor",
        type=_capacity_factor,
        help="capacity lowering: slots per expert as a multiple of the average load, or auto (default: auto, "
        "calibrated so the golden inputs drop nothing)",
    )
    export.add_argument(
        "--min-capacity",
        type=int,
        help="capacity lowering: fewest slots per expert (default: 8, decode stays dropless)",
    )
    export.add_argument("--opset", type=int, default=20, help="ai.onnx opset to export to (default: 20)")
    export.add_argument(
        "--generation",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also export the cache-carrying decoder graph and a golden greedy continuation, for 'generate' and "
        "'check --generate' (for --hf, the golden continuation is transformers' own generate; default: off, it "
        "about doubles the export time)",
    )
    _add_weight_options(export)
    export.set_defaults(handler=command_export)

    convert = commands.add_parser(
        "convert", help="copy a float32 bundle with its weights in another format (no torch needed)"
    )
    convert.add_argument("bundle", help="the float32 bundle directory")
    convert.add_argument("-o", "--output", required=True, help="bundle directory to create")
    convert.add_argument("--force", action="store_true", help="replace --output if it exists")
    convert.add_argument("--for-backend", default="cpu", help="backend whose choice --weight-kernel auto follows")
    _add_weight_options(convert)
    convert.set_defaults(handler=command_convert)

    backends = commands.add_parser("backends", help="list every registered backend, available or not, and why")
    backends.add_argument(
        "--options", action="store_true", help="also list each backend's -O options: what they take and their defaults"
    )
    backends.set_defaults(handler=command_backends)

    run = commands.add_parser("run", help="run a bundle on a backend and summarise the outputs")
    run.add_argument("bundle", help="bundle directory")
    run.add_argument(
        "--backend",
        default="cpu",
        help="backend name, or a fallback list 'first,second' (the first available runs; default: cpu)",
    )
    run.add_argument("--input", help=".npz file with one array per model input (default: the bundle's golden inputs)")
    run.add_argument("--output", help="save the outputs to this .npz file")
    run.add_argument(
        "--nan-policy",
        choices=NAN_POLICIES,
        help="NaN/Inf in float inputs: refuse them (default: reject) or pass them to the backend",
    )
    run.add_argument(
        "--isolated",
        action="store_true",
        help="compile and run each backend in a worker process, so a crash or hang falls back to the next",
    )
    run.add_argument("--timeout", type=float, help="with --isolated: seconds each backend may take (default: no limit)")
    add_option_flag(run)
    run.set_defaults(handler=command_run)

    check = commands.add_parser(
        "check", help="compare backends' outputs with the bundle's golden data (exit 1 on failure)"
    )
    check.add_argument("bundle", help="bundle directory")
    check.add_argument(
        "--backend",
        default="cpu",
        help="backends to check, comma-separated, each on its own; 'all' checks every available one (default: cpu)",
    )
    check.add_argument("--json", metavar="FILE", help="also write the report as JSON (docs/report-schema.md)")
    check.add_argument("--junit", metavar="FILE", help="also write the report as JUnit XML")
    check.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report with plots")
    check.add_argument(
        "--inputs",
        default="golden",
        metavar="SPEC",
        help="golden (default: the bundle's golden data), random:N (N seeded token batches of the golden shape) "
        "or FILE.npz; expected outputs for non-golden inputs come from the reference backend (cpu if it cannot run)",
    )
    check.add_argument(
        "--bisect",
        nargs="?",
        const="always",
        default="never",
        choices=["always", "failed", "never"],
        help="find the first graph node that leaves tolerance: --bisect for every backend, --bisect failed "
        "only for failing ones (default: never)",
    )
    check.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help="also compare each backend's greedy continuation with the golden one over N steps, token by token "
        "(bundles exported with --generation)",
    )
    add_option_flag(check)
    add_cluster_flag(check)
    check.set_defaults(handler=command_check)

    bench = commands.add_parser(
        "bench", help="latency and throughput of a bundle on a backend; or --estimate --preset NAME to price a preset"
    )
    bench.add_argument("bundle", nargs="?", help="bundle directory (leave out with --estimate --preset NAME)")
    bench.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="with --estimate and no bundle: estimate this preset from its config, building nothing "
        "(deepseek-v3 included; --batch/--seq default to 1)",
    )
    bench.add_argument(
        "--backend",
        default="cpu",
        help="backend name or fallback list (default: cpu); with --cluster: backends to time, each on its own, or 'all'",
    )
    bench.add_argument(
        "--batch",
        metavar="N",
        help="random token input of this batch size (with --seq); with --decode: batch sizes, e.g. 1,4 (default: 1)",
    )
    bench.add_argument("--seq", type=int, help="random token input of this sequence length (with --batch)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    bench.add_argument("--runs", type=int, default=20, help="timed runs (default: 20)")
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    bench.add_argument(
        "--compare",
        action="append",
        metavar="OTHER_BUNDLE",
        help="also time this bundle (of the same model, e.g. another weight format) on the same inputs, side by "
        "side; repeatable",
    )
    bench.add_argument(
        "--estimate",
        action="store_true",
        help="also estimate the latency on named chips (Ascend 910B/910C, H100, H200, H20, this CPU) with a roofline model",
    )
    bench.add_argument(
        "--decode",
        action="store_true",
        help="time generation with the bundle's cache-carrying decoder (--generation bundles): prefill and decode "
        "tokens/s per --context, against torch eager with a cache, and the bandwidth floor",
    )
    bench.add_argument(
        "--context", metavar="N,N", help="with --decode: context lengths, e.g. 128,1024 (default: 128,1024)"
    )
    bench.add_argument(
        "--steps", type=int, default=16, help="with --decode: decode steps timed per context (default: 16)"
    )
    bench.add_argument(
        "--hf",
        metavar="DIR",
        help="with --decode, for a bundle exported from a Hugging Face checkpoint: that checkpoint directory, "
        "timed with transformers in eager mode as the baseline (its weight files must be the ones exported)",
    )
    bench.add_argument(
        "--numpy-cache",
        action="store_true",
        help="with --decode: also time the backend with its cache copied through numpy (no IOBinding)",
    )
    add_option_flag(bench)
    add_cluster_flag(bench)
    bench.set_defaults(handler=command_bench)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_command(commands)
    _add_global_flags(parser, top_level=True)
    return parser


def _add_global_flags(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """Add --debug and --verbose to ``parser`` and every subcommand, so they work anywhere on the line.

    Below the top level their default is SUPPRESS: a subcommand that is not given the flag leaves
    the value the top level parsed.
    """
    default: Any = False if top_level else argparse.SUPPRESS
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks on errors")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="print each long step with its time even when stderr is not a terminal",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subcommand in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                _add_global_flags(subcommand)


class _VersionAction(argparse.Action):
    """Print :func:`_version_line` unwrapped (argparse's own version action wraps it) and exit."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(_version_line())
        parser.exit()


def _version_line() -> str:
    """``portable-moe X (python ..., numpy ..., onnx ..., onnxruntime ...)``: what a bug report needs."""
    from importlib.metadata import PackageNotFoundError, version

    from portable_moe import __version__

    parts = [f"python {sys.version.split()[0]}"]
    for package in ("numpy", "onnx", "onnxruntime", "torch", "openvino"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return f"portable-moe {__version__} ({', '.join(parts)})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    install_termination_handler()  # SIGTERM unwinds like Ctrl-C: no half-written bundle is left
    start_steps(args.verbose)
    try:
        return args.handler(args)
    except PortableMoEError as error:
        finish_steps()
        if args.debug:
            traceback.print_exc()
        stderr.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        return error.exit_code
    except KeyboardInterrupt as interrupt:
        finish_steps()
        stderr.print("[red]interrupted[/red]")
        return 143 if isinstance(interrupt, Terminated) else 130
    finally:
        finish_steps()
