"""The pytest plugin, run as a vendor runs it: ``pytest --portable-moe-backend=NAME`` in a subprocess."""

from __future__ import annotations

import os

import pytest

from portable_moe import registry
from portable_moe.opsuite import PASSED, UNSUPPORTED, collect_cases, run_case, select_cases

pytest_plugins = ["pytester"]

SUBSET = "^test_(add|relu|cast_FLOAT_to_FLOAT8)"

WRONG_VENDOR = """
from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend


class WrongNpu(OnnxRuntimeCpuBackend):
    description = "adds 0.5 to every float output"

    def _compile(self, model, options):
        compiled = super()._compile(model, options)
        run = compiled._run

        def wrong_run(feeds):
            return {name: value + value.dtype.type(0.5) for name, value in run(feeds).items()}

        compiled._run = wrong_run
        return compiled
"""


@pytest.fixture(scope="module", autouse=True)
def case_cache(tmp_path_factory):
    """The collected cases, cached where the pytest subprocesses read them (saves each one the generation)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PORTABLE_MOE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "portable-moe-cache"))
        collect_cases()
        yield


def expected_outcomes(backend: str, include: str) -> dict[str, int]:
    """What the plugin must report, from running the same cases in this process."""
    cases = select_cases(collect_cases(), [include])
    statuses = [run_case(registry.get_backend(backend), case).status for case in cases]
    return {"passed": statuses.count(PASSED), "skipped": statuses.count(UNSUPPORTED)}


def test_without_the_flag_the_plugin_adds_nothing(pytester):
    pytester.makepyfile("def test_own():\n    assert True\n")
    result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_own PASSED*", "*1 passed*"])
    assert "portable-moe-ops" not in result.stdout.str() and "portable-moe-models" not in result.stdout.str()
    assert "--portable-moe-backend" in pytester.runpytest_subprocess("--help").stdout.str()


def test_each_case_is_a_test_and_each_unsupported_case_a_skip(pytester):
    expected = expected_outcomes("cpu", SUBSET)
    assert expected["passed"] >= 4 and expected["skipped"] >= 4
    result = pytester.runpytest_subprocess(
        "--portable-moe-backend=cpu", f"--portable-moe-include={SUBSET}", "--portable-moe-presets=none", "-v", "-rs"
    )
    result.assert_outcomes(**expected)
    output = result.stdout.str()
    assert "portable-moe-ops::test_add[cpu] PASSED" in output
    assert "portable-moe-ops::test_cast_FLOAT_to_FLOAT8E4M3FN[cpu] SKIPPED" in output
    assert "unsupported on cpu (dtype-not-carried): onnxruntime's Python binding" in output


def test_failures_carry_the_reason_and_k_selects(pytester, monkeypatch, write_vendor_package):
    write_vendor_package(pytester.path, "wrong_vendor", WRONG_VENDOR, {"wrong-npu": "wrong_vendor:WrongNpu"})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    result = pytester.runpytest_subprocess(
        "--portable-moe-backend=wrong-npu", "--portable-moe-include=^test_(relu|abs)$", "--portable-moe-presets=none",
        "-k", "relu",
    )  # fmt: skip
    result.assert_outcomes(failed=1, deselected=1)
    result.stdout.fnmatch_lines(["collected 2 items / 1 deselected / 1 selected"])
    assert (
        "failed on wrong-npu: y: 60 of 60 elements outside atol=1e-07 rtol=0.001; worst at index" in result.stdout.str()
    )


def test_model_conformance_skips_with_the_reason_when_torch_is_missing(pytester):
    # The subprocess runs in pytester.path, first on sys.path: this module hides the real torch.
    (pytester.path / "torch.py").write_text("raise ImportError('torch is hidden by this test')\n")
    result = pytester.runpytest_subprocess(
        "--portable-moe-backend=cpu", "--portable-moe-include=^test_relu$", "--portable-moe-presets=tiny", "-v", "-rs"
    )
    result.assert_outcomes(passed=1, skipped=1)
    output = result.stdout.str()
    assert "portable-moe-models::tiny[cpu] SKIPPED" in output
    assert "exporting a preset needs torch (torch is hidden by this test)" in output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--portable-moe-backend=tpu"], "--portable-moe-backend: unknown backend 'tpu'; registered backends:"),
        (
            ["--portable-moe-backend=cpu", "--portable-moe-presets=deepseek-v3"],
            "unknown or cost-only preset(s) deepseek-v3",
        ),
        (["--portable-moe-backend=cpu", "--portable-moe-include=("], "bad --include regex '('"),
    ],
)
def test_bad_options_are_usage_errors(pytester, arguments, message):
    result = pytester.runpytest_subprocess(*arguments)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
