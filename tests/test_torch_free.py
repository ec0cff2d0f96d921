"""Running and checking bundles needs no torch: every such path works where importing torch fails.

Each command runs in a fresh interpreter whose ``sitecustomize`` puts a finder first on
``sys.meta_path`` that refuses torch (and what only exporting uses: transformers, onnxscript).
``sitecustomize`` is imported at start-up by every interpreter given that PYTHONPATH, worker
processes included, so isolated runs and the op suite's workers are held to the same rule.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from portable_moe.testing.hostile import write_toy_bundle

BLOCK_TORCH = """
import importlib.abc
import sys

BLOCKED = ("torch", "transformers", "onnxscript")


class RefuseTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed here (blocked by the torch-free test)")
        return None


sys.meta_path.insert(0, RefuseTorch())
"""


@pytest.fixture(scope="module")
def torch_free(tmp_path_factory):
    """(environment whose interpreters cannot import torch, a toy bundle) for subprocesses."""
    root = tmp_path_factory.mktemp("torch_free")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(BLOCK_TORCH)
    bundle = write_toy_bundle(root / "toy")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "site"), env.get("PYTHONPATH", "")]))
    env["PORTABLE_MOE_CACHE"] = str(root / "cache")
    return env, bundle


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_the_environment_really_refuses_torch(torch_free):
    env, _ = torch_free
    result = _run(env, "-c", "import torch")
    assert result.returncode == 1
    assert "ImportError: torch is not installed here" in result.stderr


def test_importing_the_package_and_its_run_and_check_modules_imports_no_torch(torch_free):
    env, _ = torch_free
    code = (
        "import sys, portable_moe, portable_moe.cli, portable_moe.conformance.model_check, "
        "portable_moe.conformance.ops, portable_moe.cli.ops_command, portable_moe.run.fallback, portable_moe.run.isolated, "
        "portable_moe.perf.bench, portable_moe.perf.costmodel, portable_moe.testing.hostile; "
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers')))"
    )
    result = _run(env, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "command",
    [
        ["check", "{bundle}", "--backend", "cpu,reference,npu-sim", "--inputs", "random:2", "--bisect", "always"],
        ["run", "{bundle}", "--backend", "npu-sim,cpu", "--isolated"],
        ["bench", "{bundle}", "--backend", "cpu", "--warmup", "1", "--runs", "2"],
        ["conformance", "ops", "--backend", "cpu", "--include", "^test_abs$", "--jobs", "1"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_run_and_check_commands_work_without_torch(torch_free, command):
    env, bundle = torch_free
    result = _run(env, "-m", "portable_moe.cli", *(part.format(bundle=bundle) for part in command))
    assert result.returncode == 0, result.stdout + result.stderr


def test_exporting_without_torch_says_what_to_install(torch_free, tmp_path):
    env, _ = torch_free
    result = _run(env, "-m", "portable_moe.cli", "export", "--preset", "tiny", "-o", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "portable-moe[export]" in result.stderr
