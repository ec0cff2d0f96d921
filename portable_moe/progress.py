"""Progress of long steps (export, compile, check), with the time each step took.

Long steps report through a plain callback, ``progress(message)``, called as each step starts.
Two callbacks are provided here:

* :class:`StepPrinter` writes one line per finished step with its elapsed time, for logs and for
  the Python API's ``verbose=True``.
* :class:`LiveSteps` shows the running step with a ticking clock on a terminal (rich), keeping
  each finished step on screen with its time.

Both write to stderr, never stdout, so piped results stay clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

Progress = Callable[[str], None]


class StepPrinter:
    """A progress callback printing ``· step (12.3 s)`` when each step ends, and ``total`` at the end.

    A step ends when the next one starts or :meth:`finish` is called.

    Args:
        stream: where the lines go (default: stderr at the time of each write).
        clock: seconds as a float (tests give a fake clock).
    """

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self._stream = stream
        self._clock = clock
        self._current: tuple[str, float] | None = None

    def __call__(self, message: str) -> None:
        self._end_step()
        self._current = (message, self._clock())

    def finish(self) -> None:
        """End the running step (print its line); the next message starts afresh."""
        self._end_step()

    def _end_step(self) -> None:
        if self._current is None:
            return
        message, started = self._current
        self._current = None
        stream = self._stream or sys.stderr
        print(f"· {message} ({self._clock() - started:.1f} s)", file=stream, flush=True)


class LiveSteps:
    """A progress callback for a terminal: a spinner and a ticking clock on the running step.

    Finished steps stay on screen with the time they took. Call :meth:`finish` before printing
    anything else on the terminal; a later message starts a new display.

    Args:
        console: the rich Console to draw on (stderr's).
    """

    def __init__(self, console: Any) -> None:
        self._console = console
        self._display: Any = None
        self._task: Any = None

    def __call__(self, message: str) -> None:
        from rich.markup import escape
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if self._display is None:
            self._display = Progress(
                SpinnerColumn(finished_text="·"),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self._console,
            )
            self._display.start()
        elif self._task is not None:
            self._display.stop_task(self._task)
            self._display.update(self._task, completed=1)
        self._task = self._display.add_task(escape(message), total=1)

    def finish(self) -> None:
        """Stop the display, leaving every step on screen with its final time."""
        if self._display is None:
            return
        if self._task is not None:
            self._display.stop_task(self._task)
            self._display.update(self._task, completed=1)
        self._display.stop()
        self._display, self._task = None, None


def finish(progress: Progress | None) -> None:
    """End the running step of ``progress`` when it is one of this module's callbacks."""
    if isinstance(progress, (StepPrinter, LiveSteps)):
        progress.finish()


def resolve(progress: Progress | None, verbose: bool) -> Progress | None:
    """The callback to use: ``progress`` when given, a :class:`StepPrinter` for ``verbose``, else None."""
    if progress is not None:
        return progress
    return StepPrinter() if verbose else None
