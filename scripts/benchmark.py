"""Measure every MoE lowering side by side in one process and write docs/benchmarks.md (+ .json).

    python scripts/benchmark.py                # the full comparison (~10-15 minutes on 2 cores)
    python scripts/benchmark.py --quick        # fewer sizes, for a smoke run

What it measures, all on ONNX Runtime's CPU provider with the same thread count as torch:
- memory bandwidth of this machine (array copy, and ORT matrix-vector product over 256 MiB);
- the `small` preset's MoE layer alone (routing + routed + shared experts), each lowering, against
  torch eager (loop over routed experts, and dense), for decode (1 and 8 tokens) and prefill (512);
- a sweep of the routed-expert count (8..128) at fixed top-k and expert size: time per decoded
  token, so the cost curve of each lowering is visible;
- the whole `small` model exported as a bundle with each lowering, against torch eager;
- decode bandwidth: bytes of expert weights a token touches divided by its time, against the
  measured bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import helper, numpy_helper

from exporters import LOWERINGS, export_bundle
from exporters.reference_model import build_model, routed_experts_dense, routed_experts_loop
from exporters.torch_export import export_moe_layer
from portable_moe import get_backend, get_preset
from portable_moe.perf.bench import BenchResult, time_callable, token_feeds

ROOT = Path(__file__).resolve().parent.parent
FLOAT_BYTES = 4


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info(threads: int) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # no /proc/cpuinfo (not Linux): the model stays "unknown"
        model = "unknown"
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "threads_used": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def session(path: str | bytes, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def measure_bandwidth(threads: int) -> dict[str, float]:
    """GB/s of a 256 MiB array copy (read + write) and of an ORT fp32 matrix-vector product."""
    source = np.ones(64 * 1024 * 1024, dtype=np.float32)
    target = np.empty_like(source)
    copy = time_callable(lambda: np.copyto(target, source), 1, warmup=2, runs=10)
    rows, cols = 4096, 16384
    weight = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matvec",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, cols])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    matvec_session = session(model.SerializeToString(), threads)
    x = np.ones((1, rows), dtype=np.float32)
    matvec = time_callable(lambda: matvec_session.run(None, {"x": x}), 1, warmup=3, runs=20)
    return {
        "copy_gb_per_s": 2 * source.nbytes / (copy.p50_ms / 1000) / 1e9,
        "ort_matvec_gb_per_s": weight.nbytes / (matvec.p50_ms / 1000) / 1e9,
    }


def figures(result: BenchResult) -> dict[str, float]:
    return {"p50_ms": result.p50_ms, "p90_ms": result.p90_ms, "min_ms": result.min_ms, "runs": result.runs}


def time_tokens(function: Any, tokens: int) -> BenchResult:
    """Adaptive repetition: many runs for fast calls, a few for slow ones."""
    started = time.perf_counter()
    function()
    first = time.perf_counter() - started
    runs = 30 if first < 0.01 else 10 if first < 0.2 else 3
    return time_callable(function, tokens, warmup=2 if first < 0.2 else 1, runs=runs, min_seconds=min(2.0, 30 * first))


def lowering_options(name: str) -> dict[str, Any]:
    # A fixed factor for layer benchmarks (no golden data to calibrate on): room for 3x the average load.
    return {"capacity_factor": 3.0} if "capacity_factor" in LOWERINGS[name].option_defaults() else {}


def bench_layer(config: Any, token_counts: list[int], threads: int, scratch: Path, eager: bool) -> dict[str, Any]:
    """Time one MoE layer per lowering (ORT) and in torch eager, for each token count."""
    generator = torch.Generator().manual_seed(1)
    inputs = {tokens: torch.randn(tokens, config.hidden_size, generator=generator) for tokens in token_counts}
    results: dict[str, Any] = {}
    for name in LOWERINGS:
        path = scratch / f"layer-{config.n_routed_experts}-{name}.onnx"
        log(f"  export layer E={config.n_routed_experts} lowering={name}")
        module, _ = export_moe_layer(path, config, moe_lowering=name, lowering_options=lowering_options(name))
        layer_session = session(str(path), threads)
        results[name] = {}
        for tokens, hidden in inputs.items():
            feed = {"hidden": hidden.numpy()}
            results[name][tokens] = figures(time_tokens(lambda s=layer_session, f=feed: s.run(None, f), tokens))
            log(f"    {name} T={tokens}: {results[name][tokens]['p50_ms']:.3f} ms")
        path.unlink()
    if eager:
        for label, implementation in (
            ("torch eager (loop)", routed_experts_loop),
            ("torch eager (dense)", routed_experts_dense),
        ):
            module.block.routed_experts = implementation
            results[label] = {}
            with torch.inference_mode():
                for tokens, hidden in inputs.items():
                    results[label][tokens] = figures(time_tokens(lambda m=module, h=hidden: m(h), tokens))
                    log(f"    {label} T={tokens}: {results[label][tokens]['p50_ms']:.3f} ms")
    return results


def bench_whole_model(shapes: list[tuple[int, int]], threads: int, scratch: Path) -> dict[str, Any]:
    config = get_preset("small")
    results: dict[str, Any] = {}
    bundle = None
    for name in LOWERINGS:
        log(f"  export whole small model, lowering={name}")
        bundle = export_bundle(scratch / f"small-{name}", config, moe_lowering=name)
        compiled = get_backend("cpu").compile(bundle, {"threads": threads})
        results[name] = {}
        for batch, seq in shapes:
            feeds = token_feeds(bundle, batch, seq)
            results[name][f"{batch}x{seq}"] = figures(time_tokens(lambda c=compiled, f=feeds: c.run(f), batch * seq))
            log(f"    {name} {batch}x{seq}: {results[name][f'{batch}x{seq}']['p50_ms']:.3f} ms")
        del compiled
    model = build_model(config, 0)
    model.set_routed_experts(routed_experts_loop)
    results["torch eager (loop)"] = {}
    with torch.inference_mode():
        for batch, seq in shapes:
            ids = torch.tensor(token_feeds(bundle, batch, seq)["input_ids"])
            results["torch eager (loop)"][f"{batch}x{seq}"] = figures(time_tokens(lambda i=ids: model(i), batch * seq))
    return results


def decode_bytes_per_token(config: Any) -> int:
    """Weights one decoded token reads in an MoE layer: router, k routed experts, shared experts."""
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    return FLOAT_BYTES * (
        config.n_routed_experts * config.hidden_size + (config.num_experts_per_tok + config.n_shared_experts) * expert
    )


def render(report: dict[str, Any]) -> str:
    lines = ["# Benchmarks", ""]
    lines.append(
        "Generated by `python scripts/benchmark.py` (the JSON beside this file holds every figure). All "
        "figures come from one run on one machine; compare them with each other, not with other machines."
    )
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in report["machine"].items()]
    bandwidth = report["bandwidth"]
    lines += [
        f"- memory bandwidth: {bandwidth['copy_gb_per_s']:.1f} GB/s (256 MiB array copy, read + write); "
        f"{bandwidth['ort_matvec_gb_per_s']:.1f} GB/s (ORT fp32 matrix-vector product over 256 MiB of weights)",
        "",
    ]
    layer = report["moe_layer"]
    lines += ["## The small preset's MoE layer", "", report["moe_layer_description"], ""]
    tokens = list(next(iter(layer.values())))
    lines.append(
        "| implementation | " + " | ".join(f"{t} token{'s' if int(t) > 1 else ''} (ms)" for t in tokens) + " |"
    )
    lines.append("|---|" + "---|" * len(tokens))
    for name, row in layer.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[t]['p50_ms']:.3f}" for t in tokens) + " |")
    sweep = report["expert_sweep"]
    lines += ["", "## Cost per decoded token against the number of routed experts", "", report["sweep_description"], ""]
    counts = list(sweep)
    names = list(sweep[counts[0]])
    lines.append("| implementation | " + " | ".join(f"E={e}" for e in counts) + f" | E={counts[-1]} / E={counts[0]} |")
    lines.append("|---|" + "---|" * (len(counts) + 1))
    for name in names:
        values = [sweep[e][name]["1"]["p50_ms"] for e in counts]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {values[-1] / values[0]:.2f}x |")
    if "whole_model" in report:
        whole = report["whole_model"]
        shapes = list(next(iter(whole.values())))
        lines += [
            "",
            "## The whole small model (bundle on `cpu`)",
            "",
            "Latency per call (ms), input [batch x sequence].",
            "",
        ]
        lines.append("| implementation | " + " | ".join(shapes) + " |")
        lines.append("|---|" + "---|" * len(shapes))
        for name, row in whole.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[s]['p50_ms']:.3f}" for s in shapes) + " |")
    lines += ["", "## Decode against the memory bandwidth", "", report["bandwidth_description"], ""]
    lines.append("| lowering | ms per token | GB/s of touched weights | share of the matvec bandwidth |")
    lines.append("|---|---|---|---|")
    for name, row in report["decode_bandwidth"].items():
        lines.append(f"| {name} | {row['ms']:.3f} | {row['gb_per_s']:.1f} | {row['share']:.0%} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {target['measured']} | {'yes' if target['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    sweep, layer, bandwidth = report["expert_sweep"], report["moe_layer"], report["decode_bandwidth"]
    counts = list(sweep)
    found = []
    if "sparse" in LOWERINGS:
        growth = sweep[counts[-1]]["sparse"]["1"]["p50_ms"] / sweep[counts[0]]["sparse"]["1"]["p50_ms"]
        found.append(
            {
                "target": f"sparse at E={counts[-1]} costs <= 1.3x E={counts[0]} per decoded token",
                "measured": f"{growth:.2f}x",
                "met": growth <= 1.3,
            }
        )
        sparse = layer["sparse"]["1"]["p50_ms"]
        versus_dense = layer["dense"]["1"]["p50_ms"] / sparse
        found.append(
            {
                "target": "sparse decode at E=64 >= 4x faster than dense",
                "measured": f"{versus_dense:.1f}x",
                "met": versus_dense >= 4,
            }
        )
        if "torch eager (loop)" in layer:
            versus_eager = layer["torch eager (loop)"]["1"]["p50_ms"] / sparse
            found.append(
                {
                    "target": "sparse decode at E=64 >= 2x faster than torch eager",
                    "measured": f"{versus_eager:.1f}x",
                    "met": versus_eager >= 2,
                }
            )
        if "fused" in layer:
            versus_fused = sparse / layer["fused"]["1"]["p50_ms"]
            found.append(
                {
                    "target": "sparse decode within 1.25x of ORT's fused MoE",
                    "measured": f"{versus_fused:.2f}x",
                    "met": versus_fused <= 1.25,
                }
            )
        share = bandwidth["sparse"]["share"]
        found.append(
            {
                "target": "sparse decode reaches >= 70% of the measured bandwidth",
                "measured": f"{share:.0%}",
                "met": share >= 0.7,
            }
        )
    return found


# Sections below this line in the markdown are measured by other commands (each says which) and
# are carried over when the report is rewritten.
SEPARATELY_MEASURED = "<!-- measured separately: scripts/benchmark.py keeps what follows -->"


def write_report(path: Path, text: str) -> None:
    """Write the rendered report, keeping the separately measured sections of the existing file."""
    kept = path.read_text().partition(SEPARATELY_MEASURED)[2] if path.exists() else ""
    path.write_text(text + (f"\n{SEPARATELY_MEASURED}{kept}" if kept else ""))


def rerender(json_path: Path) -> None:
    """Rewrite the markdown from a saved JSON report (after a change to the text, not the figures)."""
    report = json.loads(json_path.read_text())
    write_report(json_path.with_suffix(".md"), render(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads for ORT and torch (default: 2)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and no whole-model runs")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown report path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    report: dict[str, Any] = {"machine": machine_info(args.threads)}
    log("measuring memory bandwidth")
    report["bandwidth"] = measure_bandwidth(args.threads)
    small = get_preset("small")
    report["moe_layer_description"] = (
        f"hidden {small.hidden_size}, {small.n_routed_experts} routed experts of width {small.moe_intermediate_size}, "
        f"top-{small.num_experts_per_tok}, {small.n_shared_experts} shared expert, group-limited routing "
        f"({small.n_group} groups, top {small.topk_group}), float32, {args.threads} threads. Median latency per call in "
        "ms. The capacity lowering uses capacity factor 3 here."
    )
    with tempfile.TemporaryDirectory(prefix="portable-moe-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        log("MoE layer of the small preset")
        token_counts = [1, 8] if args.quick else [1, 8, 512]
        report["moe_layer"] = {
            name: {str(t): value for t, value in row.items()}
            for name, row in bench_layer(small, token_counts, args.threads, scratch, eager=True).items()
        }
        counts = [8, 32, 128] if args.quick else [8, 16, 32, 64, 128]
        report["sweep_description"] = (
            f"One MoE layer, hidden {small.hidden_size}, expert width {small.moe_intermediate_size}, top-"
            f"{small.num_experts_per_tok}, no group limit; median ms for one decoded token (T=1)."
        )
        report["expert_sweep"] = {}
        for experts in counts:
            log(f"expert sweep E={experts}")
            config = dataclasses.replace(small, n_routed_experts=experts, n_group=1, topk_group=1)
            rows = bench_layer(config, [1], args.threads, scratch, eager=True)
            report["expert_sweep"][str(experts)] = {
                name: {str(t): v for t, v in row.items()} for name, row in rows.items()
            }
        if not args.quick:
            log("whole small model")
            report["whole_model"] = bench_whole_model([(1, 1), (8, 1), (1, 512)], args.threads, scratch)
    touched = decode_bytes_per_token(small)
    matvec = report["bandwidth"]["ort_matvec_gb_per_s"]
    report["bandwidth_description"] = (
        f"One decoded token reads the router, {small.num_experts_per_tok} routed and {small.n_shared_experts} shared "
        f"experts' weights: {touched / 2**20:.1f} MiB in float32. Dividing by the layer's decode time gives the rate "
        f"at which it streams the weights it needs, against the {matvec:.1f} GB/s an ORT matrix-vector product reaches "
        "over 256 MiB. Each timing repeats the same input, so the same experts run every call and their weights can "
        "stay in the CPU's last-level cache: a share above 100% means the working set was (partly) cache-resident, "
        "which a real decode over changing tokens and experts would not enjoy. Read these rows as an upper bound."
    )
    report["decode_bandwidth"] = {}
    for name, row in report["moe_layer"].items():
        milliseconds = row["1"]["p50_ms"]
        rate = touched / (milliseconds / 1000) / 1e9
        report["decode_bandwidth"][name] = {"ms": milliseconds, "gb_per_s": rate, "share": rate / matvec}
    report["targets"] = targets(report)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_report(output, render(report))
    output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {output} and {output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
