"""The command line end to end, through a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WRONG_VENDOR = """
import numpy as np
from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, OrtCompiledModel


class WrongCompiled(OrtCompiledModel):
    def _run(self, feeds):
        outputs = super()._run(feeds)
        outputs["logits"] = outputs["logits"] + np.float32(0.01)
        return outputs


class WrongNpu(OnnxRuntimeCpuBackend):
    description = "an adapter with a bug: adds 0.01 to the logits"

    def _compile(self, model, options):
        compiled = super()._compile(model, options)
        compiled.__class__ = WrongCompiled
        return compiled
"""


def portable_moe(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    executable = shutil.which("portable-moe")
    command = [executable] if executable else [sys.executable, "-m", "portable_moe.cli"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting needs torch")
    output = tmp_path_factory.mktemp("cli") / "tiny"
    result = portable_moe("export", "--preset", "tiny", "--seed", "0", "-o", str(output), "--verbose")
    assert result.returncode == 0, result.stderr
    assert "bundle written to" in result.stdout
    # Piped stderr shows no live display; --verbose (anywhere on the line) prints each step with its time.
    assert re.search(r"^· validating: ONNX Runtime against torch .* \(\d+\.\d s\)$", result.stderr, re.MULTILINE)
    return output


def test_export_is_reproducible(exported, tiny_bundle):
    manifest = json.loads((exported / "manifest.json").read_text())
    # Same preset and seed: the same golden data and the same graph, byte for byte.
    assert manifest["files"] == tiny_bundle.manifest["files"]


def test_backends_lists_every_backend_with_its_state():
    result = portable_moe("backends")
    assert result.returncode == 0
    assert "cpu" in result.stdout and "reference" in result.stdout and "onnxruntime" in result.stdout


def test_run_prints_output_summaries(exported, tmp_path):
    saved = tmp_path / "out.npz"
    result = portable_moe("run", str(exported), "--backend", "cpu", "--output", str(saved))
    assert result.returncode == 0, result.stderr
    assert "logits" in result.stdout and "[2, 16, 256]" in result.stdout and "ran on cpu" in result.stdout
    with np.load(saved) as data:
        assert data["logits"].shape == (2, 16, 256)


def test_run_with_an_input_file(exported, tmp_path):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, input_ids=np.arange(12, dtype=np.int64).reshape(3, 4))
    result = portable_moe("run", str(exported), "--input", str(inputs), "-O", "threads=1", "--backend", "CPU")
    assert result.returncode == 0, result.stderr
    assert "[3, 4, 256]" in result.stdout


def test_run_with_wrong_input_dtype_is_one_clear_line(exported, tmp_path):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, input_ids=np.zeros((1, 4), np.float32))
    result = portable_moe("run", str(exported), "--input", str(inputs))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: input 'input_ids' has dtype float32, expected int64 [batch, seq]"


def test_check_passes_on_cpu_and_reference(exported, tmp_path):
    report = tmp_path / "report.json"
    result = portable_moe("check", str(exported), "--backend", "cpu,reference", "--json", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 2
    data = json.loads(report.read_text())
    assert [r["status"] for r in data["results"]] == ["passed", "passed"]
    routing = [c for c in data["results"][0]["comparisons"] if c["kind"] == "routing"]
    assert [c["routing_agreement"] for c in routing] == [1.0, 1.0]


def test_check_fails_with_exit_1_on_a_nonconforming_backend(exported, tmp_path, write_vendor_package):
    write_vendor_package(tmp_path, "wrong_vendor", WRONG_VENDOR, {"wrong-npu": "wrong_vendor:WrongNpu"})
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    result = portable_moe("check", str(exported), "--backend", "cpu,wrong-npu", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed" in result.stdout and "logits:" in result.stdout
    assert "not conforming: wrong-npu (failed)" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "no/such/bundle"], "error: no/such/bundle: no such bundle directory"),
        (["run", "{bundle}", "--backend", "tpu"], "error: unknown backend 'tpu'; registered backends:"),
        (["run", "{bundle}", "-O", "threads"], "error: bad option 'threads': write NAME=VALUE"),
        (["run", "{bundle}", "--input", "missing.npz"], "error: --input missing.npz: no such file"),
        (["run", "{bundle}", "--input", "{bundle}/manifest.json"], "manifest.json: not an .npz file (an .npz is a zip"),
        (["run", "{bundle}", "--backend", "gpu"], "; did you mean 'cuda', 'openvino' or 'cpu'?"),
        (["run", "{bundle}", "-O", "threads=abc"], "error: cpu option threads must be an integer >= 0, got 'abc'"),
        (
            ["run", "{bundle}", "-O", "nan_policy=maybe"],
            "error: nan_policy must be one of 'reject', 'pass', got 'maybe'",
        ),
        (["run", "{bundle}", "-O", "nan_policy=pass", "--nan-policy", "reject"], "disagree; give one of them"),
        (["check", "{bundle}", "--backend", "npu-sim", "-O", "threads=-1"], "npu-sim option threads must be an"),
        (["export", "--preset", "tiny", "-o", "{bundle}"], "already exists; choose another directory"),
    ],
)
def test_bad_usage_exits_2_with_one_line_and_no_traceback(exported, args, message):
    result = portable_moe(*[arg.format(bundle=exported) for arg in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_wherever_it_is_given(where):
    args = ["--debug", "check", "no/such/bundle"] if where == "before" else ["check", "no/such/bundle", "--debug"]
    result = portable_moe(*args)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_version_names_what_a_bug_report_needs():
    result = portable_moe("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"portable-moe \S+ \(python [\d.]+, numpy \S+, onnx \S+, onnxruntime \S+.*\)\n", result.stdout)


def test_the_command_freezes_what_is_left_then_leaves_at_once(monkeypatch):
    """``portable-moe`` is cli.run: main's exit code, gc.freeze (also when main raises), then a quick exit
    where main returned and no other thread runs."""
    import gc
    import threading
    from importlib.metadata import entry_points

    from portable_moe import cli

    [script] = [entry for entry in entry_points(group="console_scripts") if entry.name == "portable-moe"]
    assert script.value == "portable_moe.cli:run"
    frozen: list[bool] = []
    exits: list[int] = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    monkeypatch.setattr(cli, "_exit_now", exits.append)
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert cli.run() == 3
    assert frozen == [True] and exits == [3]

    monkeypatch.setattr(threading, "active_count", lambda: 2)  # a thread still runs: the interpreter's own exit
    assert cli.run() == 3
    assert frozen == [True, True] and exits == [3]

    def refuse() -> int:
        raise SystemExit(2)

    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(cli, "main", refuse)
    with pytest.raises(SystemExit):
        cli.run()
    assert frozen == [True, True, True] and exits == [3]


def test_the_quick_exit_runs_the_exit_handlers_and_flushes_the_streams():
    program = (
        "import atexit, sys\n"
        "from portable_moe import cli\n"
        "atexit.register(lambda: sys.stdout.write('the exit handler ran\\n'))\n"
        "sys.stdout.write('written, not flushed; ')\n"
        "sys.stderr.write('to stderr')\n"
        "cli._exit_now(5)\n"
        "print('never reached')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 5
    assert result.stdout == "written, not flushed; the exit handler ran\n"
    assert result.stderr == "to stderr"


def test_help_explains_each_command():
    result = portable_moe("--help")
    assert result.returncode == 0
    for command in ("demo", "export", "backends", "run", "check"):
        assert command in result.stdout
    result = portable_moe("export", "--help")
    assert "--moe-lowering" in result.stdout and "--seed" in result.stdout


def test_bench_prints_latency_and_throughput(exported, tmp_path):
    report = tmp_path / "bench.json"
    result = portable_moe(
        "bench",
        str(exported),
        "--batch",
        "2",
        "--seq",
        "4",
        "--runs",
        "5",
        "--warmup",
        "1",
        "--json",
        str(report),
        "--estimate",
    )
    assert result.returncode == 0, result.stderr
    assert "p50 ms" in result.stdout and "tokens/s" in result.stdout and "input [2, 4]" in result.stdout
    data = json.loads(report.read_text())
    assert data["runs"] == 5 and data["tokens"] == 8 and 0 < data["p50_ms"] <= data["p90_ms"]
    assert data["tokens_per_second"] == pytest.approx(8 / (data["p50_ms"] / 1000))
    assert "an estimate, not a measurement" in result.stdout
    chips = {estimate["chip"]: estimate for estimate in data["estimates"]}
    assert set(chips) == {"ascend-910b", "ascend-910c", "h100-sxm", "h200-sxm", "h20", "cpu"}
    # The same work is priced on every chip; the H200 (more bandwidth, same FLOP/s) is never slower than the H100.
    assert len({e["flops"] for e in data["estimates"]}) == 1
    assert chips["h200-sxm"]["seconds"] <= chips["h100-sxm"]["seconds"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "2"], "give both --batch and --seq"),
        (["--runs", "0"], "runs must be >= 1"),
        (["--batch", "0", "--seq", "1"], "batch and sequence must be >= 1"),
        (["--estimate", "--preset", "tiny"], "give a bundle directory to time, or --estimate --preset NAME"),
    ],
)
def test_bench_bad_arguments(exported, args, message):
    result = portable_moe("bench", str(exported), *args)
    assert result.returncode == 2 and message in result.stderr


def test_capacity_options_only_apply_to_the_capacity_lowering(tmp_path):
    result = portable_moe("export", "-o", str(tmp_path / "x"), "--capacity-factor", "2")
    assert result.returncode == 2
    assert "--capacity-factor and --min-capacity apply to the capacity lowering, not 'dense'" in result.stderr
    result = portable_moe("export", "-o", str(tmp_path / "x"), "--moe-lowering", "capacity", "--capacity-factor", "-1")
    assert result.returncode == 2 and "expected a positive number or auto" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def relabelled_sparse(exported, tmp_path_factory) -> Path:
    """The dense bundle with its manifest saying "sparse": backends decide on the label, not the graph."""
    target = tmp_path_factory.mktemp("relabelled") / "sparse"
    shutil.copytree(exported, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["moe_lowering"] = "sparse"
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_check_all_skips_backends_that_do_not_take_the_bundle_in_80_columns(relabelled_sparse, tmp_path):
    junit = tmp_path / "report.xml"
    result = portable_moe(
        "check", str(relabelled_sparse), "--backend", "all", "--junit", str(junit), env={"COLUMNS": "80"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    assert re.search(r"│ npu-sim\s+│ skipped\s+│ -", result.stdout)
    assert re.search(r"│ cpu\s+│ passed", result.stdout)
    assert "…" not in result.stdout  # nothing cut: long reasons are numbered notes below the table, whole
    notes = " ".join(" ".join(line for line in lines if not line.startswith(("┃", "│", "┏", "┡", "└"))).split())
    assert "npu-sim: backend 'npu-sim' does not accept the 'sparse' MoE lowering; it takes capacity, dense." in notes
    # CI reads skips as skips: the backends that were not checked are <skipped> with the reason, never passes.
    import xml.etree.ElementTree as ElementTree

    suites = {suite.get("name").rsplit(" ", 1)[1]: suite for suite in ElementTree.parse(junit).getroot()}
    skipped = suites["npu-sim"].find("testcase/skipped")
    assert skipped is not None and "does not accept the 'sparse' MoE lowering" in skipped.get("message")
    assert suites["npu-sim"].get("skipped") == "1" and suites["cpu"].get("skipped") == "0"
    for suite in suites.values():  # every backend either ran its comparisons or was skipped (cuda without a GPU)
        case = suite.find("testcase")
        assert case.get("name") != "compile and run" or case.find("skipped") is not None


def test_naming_a_backend_that_does_not_take_the_bundle_is_an_error(relabelled_sparse):
    result = portable_moe("check", str(relabelled_sparse), "--backend", "npu-sim")
    assert result.returncode == 1
    assert "it takes capacity, dense. Re-export with --moe-lowering capacity" in result.stdout
    assert "not conforming: npu-sim (error)" in result.stderr


def test_backends_fit_80_columns_and_list_their_options():
    result = portable_moe("backends", "--options", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert max(map(len, result.stdout.splitlines())) <= 80 and "…" not in result.stdout
    assert re.search(r"^  threads=0\s+an integer >= 0; intra-op threads", result.stdout, re.MULTILINE)
    assert re.search(r"^  precision=f32\s+one of f32, f16, bf16;", result.stdout, re.MULTILINE)
    assert re.search(r"^  nan_policy=reject\s+one of reject, pass;", result.stdout, re.MULTILINE)


def test_bench_prices_deepseek_v3_without_building_it(tmp_path):
    report = tmp_path / "estimate.json"
    result = portable_moe("bench", "--estimate", "--preset", "deepseek-v3", "--seq", "8", "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "nothing was built" in result.stdout and "an estimate, not a measurement" in result.stdout
    data = json.loads(report.read_text())
    assert data["preset"] == "deepseek-v3" and data["input_shape"] == [1, 8]
    assert {estimate["chip"] for estimate in data["estimates"]} >= {"ascend-910b", "h100-sxm"}
    assert len({estimate["flops"] for estimate in data["estimates"]}) == 1
