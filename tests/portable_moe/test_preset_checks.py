"""Preset model checks: each preset exported once per lowering, the task or the reason for each backend."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import exporters
from portable_moe import registry
from portable_moe.backend import Backend, Capabilities, ProbeResult
from portable_moe.config import runnable_presets
from portable_moe.conformance.ops import ModelTask
from portable_moe.errors import InputError
from portable_moe.testing import preset_checks
from portable_moe.testing.preset_checks import PresetExports, parse_presets, torch_missing


class _MysteryLoweringBackend(Backend):
    name = "mystery-npu"
    vendor = "tests"

    def probe(self) -> ProbeResult:
        return ProbeResult(True)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(moe_lowerings=("mystery", "dense"))

    def _compile(self, model, options):
        raise NotImplementedError("never compiled here")


@pytest.fixture
def exports(tmp_path, monkeypatch):
    """PresetExports whose exporter records its calls instead of running torch."""
    calls: list[tuple[str, str]] = []

    def fake_export(path, preset, seed, moe_lowering):
        calls.append((preset, moe_lowering))
        if preset == "small":
            raise RuntimeError("out of memory")
        return SimpleNamespace(path=Path(path))

    monkeypatch.setattr(preset_checks, "torch_missing", lambda: "")
    monkeypatch.setattr(exporters, "export_bundle", fake_export)
    registry.register_backend("mystery-npu", _MysteryLoweringBackend)
    progress: list[str] = []
    yield PresetExports(tmp_path, progress.append), calls, progress
    registry.unregister_backend("mystery-npu")


def test_presets_are_parsed_from_names_all_or_none():
    assert parse_presets("all") == runnable_presets() and "deepseek-v3" not in runnable_presets()
    assert parse_presets("none") == []
    assert parse_presets("tiny, small") == ["tiny", "small"]
    with pytest.raises(InputError, match=r"unknown or cost-only preset\(s\) deepseek-v3; choose from tiny"):
        parse_presets("tiny,deepseek-v3")


def test_without_torch_every_check_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch now raises ImportError
    assert "install it with: pip install 'portable-moe[export]'" in torch_missing()
    check = PresetExports(tmp_path).check("tiny", "cpu")
    assert check.task is None and check.reason.startswith("exporting a preset needs torch")


def test_each_preset_is_exported_once_per_lowering_and_checked_on_every_backend(exports, tmp_path):
    presets, calls, progress = exports
    cpu, npu = presets.check("tiny", "cpu"), presets.check("tiny", "npu-sim")
    assert (cpu.lowering, npu.lowering) == ("fused", "capacity")
    assert cpu.task == ModelTask("cpu", str(tmp_path / "tiny-fused"))
    assert npu.task == ModelTask("npu-sim", str(tmp_path / "tiny-capacity"))
    presets.check("tiny", "cpu")
    assert calls == [("tiny", "fused"), ("tiny", "capacity")]
    assert progress == ["exporting tiny with the fused lowering", "exporting tiny with the capacity lowering"]


def test_a_check_that_cannot_run_says_why(exports):
    presets, calls, _ = exports
    mystery = presets.check("tiny", "mystery-npu")
    assert mystery.task is None and mystery.lowering == "mystery"
    assert mystery.reason == "mystery-npu prefers the 'mystery' MoE lowering, which the exporter does not have"
    failed = [presets.check("small", "cpu"), presets.check("small", "cpu")]
    assert all(check.task is None and check.reason == "export failed: RuntimeError: out of memory" for check in failed)
    assert isinstance(failed[0].export_error, RuntimeError)
    assert calls == [("small", "fused")]  # a failed export is not tried again
