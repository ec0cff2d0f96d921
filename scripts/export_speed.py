"""Seconds per export against the layer count, where they go, and the same model exported whole.

    python scripts/export_speed.py                 # 2, 4 and 8 layers; updates docs/benchmarks.md
    python scripts/export_speed.py --layers 4 --no-write

Every figure comes from a fresh process, as a user running ``portable-moe export`` pays it
(importing torch and the exporter's first-call set-up included):

- ``export_bundle``: the whole export of the tiny preset with N layers (first dense, the rest MoE),
  layer-wise (each kind of layer traced once; the parts traced side by side in forked processes
  where the machine has two cores or more), validation included;
- ``one tracing process``: the same with ``PORTABLE_MOE_PARALLEL_TRACING=0`` (every part traced in
  the exporting process), with the seconds of each stage; the two must write the same model.onnx;
- ``re-export``: then, in the same process, the same structure with other weights (seed 1): the
  traced layers come from the in-process trace cache (``exporters.trace_cache``);
- ``whole-model trace``: one ``torch.onnx.export`` of the whole model, the way every layer used
  to be traced, for comparison;
- whole commands (``--no-commands`` skips them): ``portable-moe export --preset tiny`` (3 layers: the
  command line has no layer count) and, with ``--hf-layers N`` (default 4), ``portable-moe export
  --hf`` of a random Qwen3-MoE checkpoint with N layers (made beforehand, not timed), each timed as
  a user runs it, ``--repeat`` times (default 5: the median run, with the fastest and slowest);
- the same checkpoint's ``export_bundle`` in a process that has imported torch, transformers and the
  exporter beforehand, as a test that exports pays it (``--repeat`` times too).

Wall-clock and CPU seconds are both shown: on a shared machine wall time depends on the load,
CPU time (the process and its tracing processes) much less. The load average at the start and end of the run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- export-speed: begin -->", "<!-- export-speed: end -->"
TARGET_SECONDS = 15.0  # issue 9: a 4-layer tiny model exported in at most this, on 2 cores

# Runs in the child process: argv = method, layers, lowering, output directory.
_CHILD = """
import dataclasses, functools, json, resource, sys, time
from pathlib import Path
method, layers, lowering, scratch = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
def cpu_time():  # this process and the tracing processes it forked (reaped)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime
start = {"wall": time.perf_counter(), "cpu": cpu_time()}
import torch, onnx, onnxruntime, onnxscript.optimizer
import torch.onnx._internal.exporter._core as core
import torch.onnx._internal.exporter._registration as registration
from exporters import export_bundle, get_lowering
import exporters.layer_graphs as layer_graphs, exporters.torch_export as torch_export
from exporters.sources import output_names
from exporters.torch_export import _save_onnx
from portable_moe import get_preset
from exporters.reference_model import build_model, golden_inputs
config = dataclasses.replace(get_preset("tiny"), name=f"tiny-{layers}-layers", num_hidden_layers=layers)
stages = {}
def timed(owner, name, label):
    function = getattr(owner, name)
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), cpu_time()
        try:
            return function(*args, **kwargs)
        finally:
            stage = stages.setdefault(label, {"wall": 0.0, "cpu": 0.0})
            stage["wall"] += time.perf_counter() - wall
            stage["cpu"] += cpu_time() - cpu
    bound = isinstance(owner.__dict__.get(name), classmethod)  # already bound to its class by getattr
    setattr(owner, name, staticmethod(wrapper) if bound else wrapper)
for owner, name, label in [
    (registration.ONNXRegistry, "from_torchlib", "torch.onnx's op registry (from torchlib)"),
    (torch.export, "export", "torch.export"),
    (core, "_prepare_exported_program_for_export", "torch.onnx's passes before translation"),
    (core, "_exported_program_to_onnx_program", "translation to ONNX"),
    (onnxscript.optimizer, "optimize_ir", "onnxscript optimizer"),
    (layer_graphs, "_export_pieces", "tracing the pieces (all of torch.onnx.export)"),
    (torch_export, "_preset_source", "reference model and golden outputs"),
    (torch_export, "save_onnx_model", "saving model.onnx"),
    (torch_export, "validate_graph", "validation (checker, ONNX Runtime)"),
]:
    timed(owner, name, label)
imports = {"wall": time.perf_counter() - start["wall"], "cpu": cpu_time() - start["cpu"]}
result = {"imports": imports}
wall, cpu = time.perf_counter(), cpu_time()
if method == "export_bundle":
    export_bundle(scratch / "bundle", config, moe_lowering=lowering)
    result["stages"] = stages
    result.update(wall=time.perf_counter() - wall, cpu=cpu_time() - cpu)
    wall, cpu = time.perf_counter(), cpu_time()
    export_bundle(scratch / "again", config, 1, moe_lowering=lowering)
    result["again"] = {"wall": time.perf_counter() - wall, "cpu": cpu_time() - cpu}
else:
    model = build_model(config)
    low = get_lowering(lowering)
    model.set_routed_experts(low.routed_experts(low.option_defaults()))
    ids = golden_inputs(config)["input_ids"]
    wall, cpu = time.perf_counter(), cpu_time()
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 1: torch.export.Dim("seq", min=1, max=65536)}
    _save_onnx(model, ids, "input_ids", output_names(config)[0], dims, 20, low, scratch / "model.onnx")
    result.update(wall=time.perf_counter() - wall, cpu=cpu_time() - cpu)
print(json.dumps(result))
"""
# Each method: the child's method and the environment it runs in. "export_bundle" traces the parts in
# parallel where the machine has the cores (its default); "one tracing process" traces them in the
# exporting process, one after the other.
METHODS = {
    "export_bundle": ("export_bundle", {}),
    "one tracing process": ("export_bundle", {"PORTABLE_MOE_PARALLEL_TRACING": "0"}),
    "whole-model trace": ("whole-model trace", {}),
}

# Writes a random Qwen3-MoE checkpoint (argv: directory, layers): the first layer dense, the rest MoE.
_HF_CHECKPOINT = """
import sys, torch, transformers
directory, layers = sys.argv[1], int(sys.argv[2])
config = transformers.Qwen3MoeConfig(
    vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
)
torch.manual_seed(0)
transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(directory)
"""


# Times export_bundle of a Hugging Face checkpoint (argv: checkpoint, output) in a process that has already
# imported torch, transformers (the checkpoint's modeling module included) and the exporter, as a test pays it.
_HF_IN_PROCESS = """
import json, resource, sys, time
import torch, transformers, onnxscript.optimizer
from transformers.models.qwen3_moe import modeling_qwen3_moe
from exporters import export_bundle
def cpu_time():
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime
wall, cpu = time.perf_counter(), cpu_time()
export_bundle(sys.argv[2], hf=sys.argv[1])
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": cpu_time() - cpu}))
"""


def measure(method: str, layers: int, lowering: str, scratch: Path) -> dict[str, float]:
    scratch.mkdir(parents=True)
    child_method, environment = METHODS[method]
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, child_method, str(layers), lowering, str(scratch)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={**os.environ, **environment},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The run of median wall time, with the fastest and slowest wall times of all the runs."""
    ordered = sorted(runs, key=lambda run: run["wall"])
    return {
        **ordered[len(ordered) // 2],
        "runs": len(runs),
        "fastest": ordered[0]["wall"],
        "slowest": ordered[-1]["wall"],
    }


def measure_command(arguments: list[str], shown: list[str], output: Path, repeat: int) -> dict[str, Any]:
    """Wall and CPU seconds (its tracing processes included) of ``portable-moe ARGUMENTS -o OUTPUT`` in a fresh
    process, run ``repeat`` times (the output removed before each): the median run."""
    command = [sys.executable, "-m", "portable_moe.cli", *arguments, "-o", str(output)]
    runs = []
    for _ in range(repeat):
        shutil.rmtree(output, ignore_errors=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        runs.append({"wall": wall, "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)})
    return {**_median(runs), "command": " ".join(["portable-moe", *shown, "-o", "OUT"])}


def hf_checkpoint(layers: int, scratch: Path) -> Path:
    """A random Qwen3-MoE checkpoint with ``layers`` layers (made here, not timed)."""
    checkpoint = scratch / "checkpoint"
    subprocess.run(
        [sys.executable, "-c", _HF_CHECKPOINT, str(checkpoint), str(layers)], check=True, cwd=ROOT, capture_output=True
    )
    return checkpoint


def measure_hf_in_process(checkpoint: Path, scratch: Path, repeat: int) -> dict[str, Any]:
    """``export_bundle(hf=checkpoint)`` in a process that has imported everything it needs: the median of ``repeat``."""
    runs = []
    for attempt in range(repeat):
        output = scratch / f"in-process-{attempt}"
        result = subprocess.run(
            [sys.executable, "-c", _HF_IN_PROCESS, str(checkpoint), str(output)],
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return _median(runs)


def _cell(figures: dict[str, float]) -> str:
    return f"{figures['wall']:.1f} s ({figures['cpu']:.1f} s)"


def _spread(figures: dict[str, Any]) -> str:
    """A median figure with the spread of its runs: ``12.3 s (15.0 s), median of 5 runs, 11.8-13.9 s``."""
    if figures.get("runs", 1) < 2:
        return _cell(figures)
    return f"{_cell(figures)}, median of {figures['runs']} runs, {figures['fastest']:.1f}-{figures['slowest']:.1f} s"


def _sum(first: dict[str, float], second: dict[str, float]) -> dict[str, float]:
    return {key: first[key] + second[key] for key in ("wall", "cpu")}


def _verdict(seconds: float) -> str:
    return f"{seconds:.1f} s, {'within' if seconds <= TARGET_SECONDS else 'over'} the {TARGET_SECONDS:.0f} s target"


def render(
    rows: list[dict],
    lowering: str,
    load: tuple[str, str],
    commands: list[tuple[str, dict]],
    cores: int,
    hf_in_process: dict[str, Any] | None = None,
) -> str:
    lines = [
        BEGIN,
        "## Export time against the number of layers",
        "",
        f"The tiny preset with {', '.join(str(row['layers']) for row in rows)} layers (the first dense, the rest MoE), "
        f"`{lowering}` lowering; each",
        "figure from a fresh process. Layer-wise export traces the prologue, one layer of each kind and the",
        "head, each its own `torch.onnx.export`, then stamps a copy per layer. Where the process may use two",
        "cores or more it traces the head itself, then the other parts side by side, the longest in processes",
        'forked from it, the shortest itself (`exporters.parallel_tracing`); "one tracing process" is the same export with',
        "`PORTABLE_MOE_PARALLEL_TRACING=0`, every part traced in the exporting process. The whole-model trace",
        "is one `torch.onnx.export` of the whole model, as export worked before layer-wise export. "
        '"re-export" is a second',
        "`export_bundle` in the same process, same structure, other weights (seed 1): the traced layers come",
        "from the trace cache (in memory; a later process finds them too when `PORTABLE_MOE_TRACE_CACHE`",
        "names a directory). "
        f"Measured on a shared {cores}-core machine (load average {load[0]} at the start, {load[1]} at the end):",
        "wall-clock seconds depend on the other work on it; CPU seconds (the process and the tracing processes",
        "it forked) much less. The last column says whether the parallel and the one-process export wrote the",
        "same model.onnx, byte for byte.",
        "",
        '"imports + export" is what a first export costs in a fresh process, as `portable-moe export` pays it.',
        "",
        "| layers | imports, wall (CPU) | export_bundle, wall (CPU) | imports + export, wall (CPU) "
        "| one tracing process, wall (CPU) | re-export, wall (CPU) | whole-model trace, wall (CPU) | same model.onnx |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        bundle = row["export_bundle"]
        cells = [
            bundle["imports"],
            bundle,
            _sum(bundle["imports"], bundle),
            row["one tracing process"],
            bundle["again"],
            row["whole-model trace"],
        ]
        same = "yes" if row["same bytes"] else "**no**"
        lines.append(f"| {row['layers']} | " + " | ".join(map(_cell, cells)) + f" | {same} |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        span = last["layers"] - first["layers"]
        slopes = {method: (last[method]["cpu"] - first[method]["cpu"]) / span for method in METHODS}
        lines += [
            "",
            f"CPU seconds per added layer ({first['layers']} to {last['layers']} layers): "
            + ", ".join(f"{method} {slope:.2f}" for method, slope in slopes.items())
            + ".",
        ]
    middle = rows[len(rows) // 2]
    stages = middle["one tracing process"]["stages"]
    lines += [
        "",
        f"Where the {middle['layers']}-layer export spends its time, measured on the one-process export (the "
        "stages of a forked tracing process are not seen by its parent; stages nest: the registry, "
        "`torch.export`, torch.onnx's passes before translation and the translation are inside \"tracing the "
        "pieces\"; the optimizer runs inside each part's `torch.onnx.export` and once over the full graph; the "
        "passes before translation are the decompositions, which run only for a graph that cannot be translated "
        "as traced, and the type promotion pass, which runs only where an op mixes dtypes, see below):",
        "",
        "| stage | wall (CPU) |",
        "|---|---:|",
        *(f"| {name} | {_cell(figures)} |" for name, figures in stages.items()),
        f"| whole export_bundle | {_cell(middle['one tracing process'])} |",
    ]
    parallel, alone = middle["export_bundle"], middle["one tracing process"]
    saved, extra = alone["wall"] - parallel["wall"], parallel["cpu"] - alone["cpu"]
    cost = (
        f"costs {extra:.1f} CPU seconds more (each tracing process warms up again what it meets first: the "
        "exporter's per-operator set-up and caches that fill on first use)"
        if extra >= 0
        else f"took {-extra:.1f} CPU seconds less in this run (on a shared machine CPU seconds vary too; parallel "
        "tracing usually costs a few more, each tracing process warming up again what it meets first)"
    )
    lines += [
        "",
        f"Reading these figures: with {cores} cores the parallel trace saved {saved:.1f} s of wall time on the "
        f"{middle['layers']}-layer export and {cost}. The head is traced in the exporting process first because it is "
        "short and it builds the op registry and warms the exporter for every child forked after it; a child "
        "runs torch with one thread, so that torch's OpenMP pool, which the golden run started in the parent, "
        "is never entered in a process where its threads do not exist. Each added layer costs only its copy, "
        "its share of the optimizer and of the golden run. A second export of the same structure (other "
        "weights, seed or weight format) skips the trace.",
    ]
    lines += [
        "",
        "What else a first export is made of: each part is its own `torch.onnx.export`, which is what lets "
        "the parts be traced apart (traced one after the other in one process, they cost about what one "
        "export of all of them side by side did); `torch.onnx.export`'s op registry, which it builds from "
        "onnxscript's torchlib on every call (importing ~550 functions, then parsing the source of each for a "
        "domain the registry never reads), is built once per process, without the parsing, and copied for each "
        "call (`exporters.torch_onnx_shortcuts.reused_op_registry`), so the parts after the "
        "first, and the forked children, do not build it again. `torch.onnx.export` traces a module twice: "
        "`torch.export`, then its decompositions, which trace the graph again to rewrite the ops torchlib has no "
        "ONNX function for. Torchlib has one for every op of these parts' traces but the dtype conversions "
        "(`aten.to`), so export rewrites those itself and has the graph translated as traced "
        "(`exporters.torch_onnx_shortcuts.translation_as_traced`): the second trace was about half of each part's time. A new tensor filled slice by "
        "slice with `copy_` (DeepSeek-V3's keys, in transformers) becomes a concatenation first; a graph that still "
        "mutates a tensor, calls a subgraph or holds another op goes through the decompositions as before. "
        "torch.onnx's type promotion pass, which runs every op on fake tensors once more to insert a cast "
        "wherever an op mixes dtypes, runs only where a cast is needed: which casts it inserts follows from the "
        "dtypes `torch.export` recorded, and the reference model and the lowerings write theirs out, so none of "
        "these exports needs the pass (it was about a quarter of a traced layer's time). "
        "A trace runs every op on "
        "fake tensors with symbolic batch and sequence sizes; torch's fake-tensor dispatch cache hardly ever hits there and making its "
        "entries costs more than it saves, so export turns it off while tracing (`exporters.torch_onnx_shortcuts.fast_tracing`), "
        "and Python's cycle collector with it: a trace makes millions of short-lived objects, and each of the "
        "collector's passes would walk every object that survived the ones before. "
        "The optimizer over the full graph runs one round instead of two: the parts were optimized inside "
        "`torch.onnx.export` already. Objects that exist before `export_bundle` is called (torch's modules, "
        "mostly) are frozen out of the garbage collector's full collections while it runs (`gc.freeze`); "
        "the torch model is collected before ONNX Runtime loads the graph only where its weights reach 64 MiB "
        "(the collection walks every object the export made). "
        "Imports are torch, its exporter and onnxscript, which export needs; nothing unneeded is imported on "
        "the path of `portable-moe export` (transformers and ray are not imported for a preset). When a "
        "command has finished, `portable-moe` runs the exit handlers, flushes its output and ends the process "
        "(`portable_moe.cli.run`), instead of the interpreter's shutdown freeing every object one by one (about "
        "0.4 s after an export).",
    ]
    if commands:
        lines += [
            "",
            "Whole commands, each in a fresh process as a user runs it, imports included (wall, CPU in brackets; "
            "the median run and the fastest and slowest):",
            "",
        ]
        lines += [f"- `{figures['command']}`: {what}: {_spread(figures)}." for what, figures in commands]
    verdicts = [f"- `{figures['command']}`: {_verdict(figures['wall'])}" for _, figures in commands]
    if hf_in_process is not None:
        lines += [
            "",
            "The Hugging Face checkpoint's `export_bundle` in a process that has imported torch, transformers (the "
            "checkpoint's modeling module included) and the exporter, as a test that exports pays it: "
            f"{_spread(hf_in_process)}.",
        ]
        verdicts.append(
            "- that `export_bundle` in a process that has imported them: " + _verdict(hf_in_process["wall"])
        )
    four = next((row for row in rows if row["layers"] == 4), None)
    if four is not None:
        bundle = four["export_bundle"]
        verdicts[:0] = [
            "- `export_bundle` of the 4-layer tiny preset in a process that has imported the exporter: "
            + _verdict(bundle["wall"]),
            "- the same in a fresh process, imports included (as `portable-moe export` pays it): "
            + _verdict(bundle["wall"] + bundle["imports"]["wall"]),
        ]
    if verdicts:
        lines += [
            "",
            f"The target, a 4-layer tiny model exported in at most {TARGET_SECONDS:.0f} s on 2 cores (wall time):",
            "",
        ]
        lines += [verdict + ";" for verdict in verdicts[:-1]] + [verdicts[-1] + "."]
    lines += ["", "Produced by `python scripts/export_speed.py`.", END]
    return "\n".join(lines) + "\n"


def write_block(path: Path, block: str) -> None:
    """Replace the export-speed block of ``path`` (or append it)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        text = before + block.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--lowering", default="dense")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--hf-layers", type=int, default=4, help="layers of the Hugging Face checkpoint (0: skip)")
    parser.add_argument("--no-commands", action="store_true", help="skip the whole portable-moe commands")
    parser.add_argument(
        "--repeat", type=int, default=5, help="runs of each whole command and of the in-process Hugging Face export"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    import tempfile

    start_load = f"{os.getloadavg()[0]:.1f}"
    rows = []
    commands: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="export-speed-") as scratch:
        for layers in args.layers:
            row: dict = {"layers": layers}
            for method in METHODS:
                row[method] = measure(method, layers, args.lowering, Path(scratch) / f"{layers}-{method}")
                print(f"[{time.strftime('%H:%M:%S')}] {layers} layers, {method}: {row[method]}", file=sys.stderr)
            written = [Path(scratch) / f"{layers}-{method}" / "bundle" / "model.onnx" for method in METHODS]
            row["same bytes"] = written[0].read_bytes() == written[1].read_bytes()
            if not row["same bytes"]:
                print(
                    f"{layers} layers: the parallel and the one-process export wrote different bytes", file=sys.stderr
                )
            rows.append(row)
        hf_in_process = None
        if not args.no_commands:
            out = Path(scratch) / "cli-tiny"
            figures = measure_command(["export", "--preset", "tiny"], ["export", "--preset", "tiny"], out, args.repeat)
            commands.append(("the tiny preset, 3 layers (the command line has no layer count)", figures))
            print(f"[{time.strftime('%H:%M:%S')}] portable-moe export --preset tiny: {figures}", file=sys.stderr)
        if args.hf_layers and not args.no_commands:
            hf = Path(scratch) / "hf"
            checkpoint = hf_checkpoint(args.hf_layers, hf)
            figures = measure_command(
                ["export", "--hf", str(checkpoint)], ["export", "--hf", "CHECKPOINT"], hf / "out", args.repeat
            )
            what = (
                f"a random Qwen3-MoE checkpoint with {args.hf_layers} layers (hidden 32, 8 experts, top-2, the first "
                "layer dense), transformers imported and its golden run included"
            )
            commands.append((what, figures))
            print(f"[{time.strftime('%H:%M:%S')}] Hugging Face, {args.hf_layers} layers: {figures}", file=sys.stderr)
            hf_in_process = measure_hf_in_process(checkpoint, hf, args.repeat)
            print(f"[{time.strftime('%H:%M:%S')}] Hugging Face in process: {hf_in_process}", file=sys.stderr)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    block = render(rows, args.lowering, (start_load, f"{os.getloadavg()[0]:.1f}"), commands, cores, hf_in_process)
    print(block)
    if not args.no_write:
        write_block(Path(args.output), block)


if __name__ == "__main__":
    main()
