"""Progress of long steps: each step's time, on stderr, and the CLI's choice of display."""

from __future__ import annotations

import io
import itertools

from portable_moe import progress
from portable_moe.progress import StepPrinter


def test_each_step_is_printed_with_its_time_when_it_ends():
    stream = io.StringIO()
    ticks = itertools.count(0.0, 1.5)  # each read of the clock is 1.5 s after the previous one
    printer = StepPrinter(stream, clock=lambda: next(ticks))
    printer("exporting")
    assert stream.getvalue() == ""  # a running step has no time yet
    printer("validating")
    printer.finish()
    printer.finish()  # finishing twice prints nothing more
    assert stream.getvalue() == "· exporting (1.5 s)\n· validating (1.5 s)\n"


def test_resolve_prefers_the_callback_then_verbose():
    received = []
    assert progress.resolve(received.append, verbose=True) == received.append
    assert isinstance(progress.resolve(None, verbose=True), StepPrinter)
    assert progress.resolve(None, verbose=False) is None
    progress.finish(None)  # nothing to finish: no error
    progress.finish(received.append)  # a plain callback is left alone


def test_cli_shows_a_live_display_only_on_a_terminal(monkeypatch):
    from portable_moe.cli import console as cli

    monkeypatch.setattr(type(cli.stderr), "is_terminal", property(lambda console: True))
    assert isinstance(cli.choose_progress(verbose=False), progress.LiveSteps)
    monkeypatch.setattr(type(cli.stderr), "is_terminal", property(lambda console: False))
    assert cli.choose_progress(verbose=False) is None
    assert isinstance(cli.choose_progress(verbose=True), StepPrinter)


def test_live_steps_keep_finished_steps_on_screen_with_their_times():
    from rich.console import Console

    screen = io.StringIO()
    live = progress.LiveSteps(Console(file=screen, force_terminal=True, width=80))
    live("compiling")
    live("running")
    live.finish()
    text = screen.getvalue()
    assert "compiling" in text and "running" in text and "0:00:0" in text
