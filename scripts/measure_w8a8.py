"""Measure npu-sim's W8A8 (activations=int8) against the float32 golden, next to W8A16, on tiny and small.

    python scripts/measure_w8a8.py            # tiny (golden + 24 random sets) and small (golden + 6)
    python scripts/measure_w8a8.py --quick    # tiny only, golden + 4 sets

Each preset is exported once in float32 (dense lowering) and converted to int8 weights with one scale
per output channel (exporters.convert_bundle). The input sets are scripts/benchmark_weights.py's: the
golden inputs (expected: torch) and seeded random token batches of the golden shape (expected: the
float32 bundle on ONNX Runtime CPU). For npu-sim under force_fp16 with activations=float (W8A16) and under
every precision mode with activations=int8 (W8A8) it prints, per set and over all sets: the atol logits need at rtol 1e-2 over the
tokens before the first routing flip of their sequence, the lowest per-layer routing agreement and expert
overlap, then the verdict of ``check`` (the tolerance rows npu-sim declares). These are the figures the
"+w8a8" rows of backends/npu_sim/precision.py cite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_weights import input_sets, log, set_figures  # noqa: E402

from backends.npu_sim.backend import NpuSimBackend  # noqa: E402
from backends.npu_sim.precision import PRECISION_MODES  # noqa: E402
from exporters import convert_bundle, export_bundle  # noqa: E402
from portable_moe.conformance.model_check import check_backend  # noqa: E402


def measure(bundle, sets, options) -> dict:
    """atol needed before the first flip, lowest per-set agreement and overlap, and check's verdict."""
    compiled = NpuSimBackend().compile(bundle, options)
    routing = list(bundle.routing_outputs)
    atols, agreements, overlaps = [], [], []
    for feeds, expected in sets:
        actual = compiled.run(feeds)
        atol, agreement, overlap = set_figures(expected, actual, routing)
        agreements.append(agreement)
        overlaps.append(overlap)
        if atol is not None:
            atols.append(atol)
    result = check_backend(bundle, NpuSimBackend(), options, input_sets=sets)
    return {
        "precision": compiled.precision,
        "atol_needed": max(atols),
        "min_set_agreement": min(agreements),
        "mean_set_agreement": float(np.mean(agreements)),
        "min_set_overlap": min(overlaps),
        "mean_set_overlap": float(np.mean(overlaps)),
        "check": result.status,
        "check_reason": result.reason[:200],
        "sets": len(sets),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset only, golden + 4 sets")
    args = parser.parse_args()
    presets = [("tiny", 4)] if args.quick else [("tiny", 24), ("small", 6)]
    report = {}
    with tempfile.TemporaryDirectory() as workdir:
        for preset, count in presets:
            log(f"exporting {preset} (dense lowering), float32, and converting to int8 per channel")
            base = export_bundle(Path(workdir) / f"{preset}-float32", preset, 0, moe_lowering="dense")
            bundle = convert_bundle(base, Path(workdir) / f"{preset}-int8", "int8", 0, "dequantize")
            sets = input_sets(base, count)
            batch, seq = sets[0][0]["input_ids"].shape
            for precision, activations in [("force_fp16", "float")] + [(mode, "int8") for mode in PRECISION_MODES]:
                log(f"{preset}: npu-sim {precision}, activations={activations}")
                options = {
                    "precision": precision,
                    "activations": activations,
                    "batch_sizes": (batch,),
                    "seq_lengths": (seq,),
                    "cache_dir": str(Path(workdir) / "cache"),
                }
                report[f"{preset} {precision} activations={activations}"] = measure(bundle, sets, options)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
