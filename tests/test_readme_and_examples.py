"""README's commands and the examples run here, so they cannot rot."""

from __future__ import annotations

import os
import re
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
    result = subprocess.run(
        demo.split(), capture_output=True, text=True, cwd=tmp_path, timeout=600, env={**os.environ, "COLUMNS": "200"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.split("Conformance of", 1)[1]
    assert re.search(r"│ cpu\s+│ passed", table) and re.search(r"│ reference\s+│ passed", table)
    assert list(tmp_path.iterdir()) == []  # the demo leaves nothing behind in the working directory


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_example_runs(script, tmp_path):
    pytest.importorskip("torch", reason="the examples export, which needs torch")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
