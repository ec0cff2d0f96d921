"""What every command shares: the consoles, exit codes, step progress, notes under tables, -O parsing."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape

from portable_moe import progress as step_progress
from portable_moe.errors import InputError

# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default, unless
# COLUMNS says how wide to be.
_PIPED_WIDTH = None if "COLUMNS" in os.environ else 160
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else _PIPED_WIDTH)
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else _PIPED_WIDTH)

EXIT_OK, EXIT_FAILED = 0, 1  # bad usage or input exits with the error's exit_code (2)

# How long steps show their progress (set by main from the terminal and --verbose): None is silent.
_steps: step_progress.Progress | None = None


def show_step(message: str) -> None:
    """Show ``message`` as the step now running (nothing when progress is off)."""
    if _steps is not None:
        _steps(message)


def print_result(*renderables: Any, **options: Any) -> None:
    """Print a result on stdout, ending the progress display first so the two do not interleave."""
    step_progress.finish(_steps)
    stdout.print(*renderables, **options)


def choose_progress(verbose: bool) -> step_progress.Progress | None:
    """A live display on a terminal, step lines with their times for --verbose, else nothing."""
    if stderr.is_terminal:
        return step_progress.LiveSteps(stderr)
    return step_progress.StepPrinter() if verbose else None


class Notes:
    """Long texts of a table (reasons, fix commands) printed whole below it, numbered; cells show the number."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, *texts: str) -> str:
        """Number each non-empty text; return the numbers for the table cell ("" when none)."""
        numbers = []
        for text in texts:
            if text:
                self.texts.append(text)
                numbers.append(str(len(self.texts)))
        return ",".join(numbers)

    def print(self) -> None:
        for number, text in enumerate(self.texts, 1):
            print_result(f"[{number}] {escape(text)}")


def start_steps(verbose: bool) -> None:
    """Choose how this run's steps show their progress (see :func:`choose_progress`)."""
    global _steps
    _steps = choose_progress(verbose)


def finish_steps() -> None:
    """End the progress display (idempotent)."""
    step_progress.finish(_steps)


def parse_options(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["threads=2", "optimization=basic"]`` -> ``{"threads": 2, "optimization": "basic"}``."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, separator, raw = pair.partition("=")
        if not separator or not key:
            raise InputError(f"bad option {pair!r}: write NAME=VALUE, e.g. threads=2")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def format_error(value: float) -> str:
    """An error figure for a table: two significant digits, "-" when unknown (NaN)."""
    return "-" if value != value else f"{value:.2e}"  # NaN -> "-"
