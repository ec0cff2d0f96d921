"""Seconds per export against the layer count, and the same model exported whole for comparison.

    python scripts/export_speed.py                 # 2, 4 and 8 layers; updates docs/benchmarks.md
    python scripts/export_speed.py --layers 4 --no-write

Every figure comes from a fresh process, as a user running ``portable-moe export`` pays it
(importing torch and the exporter's first-call set-up included):

- ``export_bundle``: the whole export of the tiny preset with N layers (first dense, the rest MoE),
  layer-wise (each kind of layer traced once), validation included;
- ``layer-wise trace``: only its ``export_model_to_onnx`` step;
- ``whole-model trace``: one ``torch.onnx.export`` of the whole model, the way every layer used
  to be traced, for comparison.

Wall-clock and CPU seconds are both shown: on a shared machine wall time depends on the load,
CPU time much less. The load average at the start and end of the run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- export-speed: begin -->", "<!-- export-speed: end -->"

# Runs in the child process: argv = method, layers, lowering, output directory.
_CHILD = """
import dataclasses, json, sys, tempfile, time
from pathlib import Path
method, layers, lowering, scratch = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
from exporters import export_bundle, get_lowering
from exporters.torch_export import export_model_to_onnx, output_names, _save_onnx
from portable_moe import get_preset
from portable_moe.model import build_model, golden_inputs
config = dataclasses.replace(get_preset("tiny"), name=f"tiny-{layers}-layers", num_hidden_layers=layers)
wall, cpu = time.perf_counter(), time.process_time()
if method == "export_bundle":
    export_bundle(scratch / "bundle", config, moe_lowering=lowering)
else:
    import torch
    model = build_model(config)
    low = get_lowering(lowering)
    model.set_routed_experts(low.routed_experts(low.option_defaults()))
    ids = golden_inputs(config)["input_ids"]
    wall, cpu = time.perf_counter(), time.process_time()
    if method == "layer-wise trace":
        export_model_to_onnx(model, scratch / "model.onnx", lowering=low, example_ids=ids)
    else:
        dims = {0: torch.export.Dim("batch", min=1, max=4096), 1: torch.export.Dim("seq", min=1, max=65536)}
        _save_onnx(model, ids, "input_ids", output_names(config)[0], dims, 20, low, scratch / "model.onnx")
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
"""
METHODS = ("export_bundle", "layer-wise trace", "whole-model trace")


def measure(method: str, layers: int, lowering: str, scratch: Path) -> dict[str, float]:
    scratch.mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, method, str(layers), lowering, str(scratch)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def render(rows: list[dict], lowering: str, load: tuple[str, str]) -> str:
    lines = [
        BEGIN,
        "## Export time against the number of layers",
        "",
        f"The tiny preset with 2, 4 and 8 layers (the first dense, the rest MoE), `{lowering}` lowering; each",
        "figure from a fresh process (torch import and the exporter's first-call set-up included). Layer-wise",
        "export traces the prologue, one layer of each kind and the head once, then stamps a copy per layer;",
        "the whole-model trace is one `torch.onnx.export` of the whole model, as export worked before.",
        f"Measured on a shared 2-core machine (load average {load[0]} at the start, {load[1]} at the end):",
        "wall-clock seconds depend on the other work on it; CPU seconds (this process) much less.",
        "",
        "| layers | export_bundle, wall (CPU) | layer-wise trace, wall (CPU) | whole-model trace, wall (CPU) |",
        "|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [f"{row[method]['wall']:.1f} s ({row[method]['cpu']:.1f} s)" for method in METHODS]
        lines.append(f"| {row['layers']} | " + " | ".join(cells) + " |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        span = last["layers"] - first["layers"]
        slopes = [(last[method]["cpu"] - first[method]["cpu"]) / span for method in METHODS]
        lines += [
            "",
            f"CPU seconds per added layer ({first['layers']} to {last['layers']} layers): export_bundle "
            f"{slopes[0]:.2f}, layer-wise trace {slopes[1]:.2f}, whole-model trace {slopes[2]:.2f}.",
        ]
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
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    import tempfile

    start_load = f"{os.getloadavg()[0]:.1f}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-speed-") as scratch:
        for layers in args.layers:
            row: dict = {"layers": layers}
            for method in METHODS:
                row[method] = measure(method, layers, args.lowering, Path(scratch) / f"{layers}-{method}")
                print(f"[{time.strftime('%H:%M:%S')}] {layers} layers, {method}: {row[method]}", file=sys.stderr)
            rows.append(row)
    block = render(rows, args.lowering, (start_load, f"{os.getloadavg()[0]:.1f}"))
    print(block)
    if not args.no_write:
        write_block(Path(args.output), block)


if __name__ == "__main__":
    main()
