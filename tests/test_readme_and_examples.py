"""README's commands and the examples run here, so they cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    demo, tests = _quick_start_commands()
    assert demo.endswith("&& portable-moe demo")
    test_command = tests.rsplit("&& ", 1)[1]
    assert test_command == "python -m pytest"
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == test_command
    # Both set up the same way, from the project's own files.
    assert demo.rsplit("&& ", 1)[0] == tests.rsplit("&& ", 1)[0]
    assert 'pip install -e ".[dev]"' in (ROOT / ".ci" / "run").read_text()


def test_readme_demo_command_succeeds(tmp_path):
    pytest.importorskip("torch", reason="the demo exports, which needs torch")
    demo = _quick_start_commands()[0].rsplit("&& ", 1)[1]
    cache = tmp_path / "cache"
    environment = {**os.environ, "COLUMNS": "200", "PORTABLE_MOE_CACHE": str(cache)}
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(demo.split(), capture_output=True, text=True, cwd=work, timeout=600, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.split("Conformance of", 1)[1]
    assert re.search(r"│ cpu\s+│ passed", table) and re.search(r"│ reference\s+│ passed", table)
    assert list(work.iterdir()) == []  # the demo leaves nothing behind in the working directory
    # ... and keeps its bundle where it says, with the command to check it again.
    kept = cache / "demo" / "tiny"
    assert f"the bundle stays in {kept}; check it again with: portable-moe check {kept} --backend all" in result.stderr
    assert (kept / "manifest.json").is_file()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_example_runs(script, tmp_path):
    pytest.importorskip("torch", reason="the examples export, which needs torch")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Long steps are not silent: each one is reported on stderr with its time.
    assert re.search(r"^· .+ \(\d+\.\d s\)$", result.stderr, re.MULTILINE), result.stderr


def test_readme_python_snippet_runs_as_written_after_the_cli_commands(tmp_path, tiny_bundle):
    pytest.importorskip("torch", reason="the snippet exports, which needs torch")
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## From Python\n\n```python\n(.+?)\n```", readme, re.DOTALL).group(1)
    shutil.copytree(tiny_bundle.path, tmp_path / "build" / "tiny")  # what `portable-moe export ... -o build/tiny` left
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["cpu passed 1.0", "reference passed 1.0"]
    assert "· checking tiny on reference (" in result.stderr
