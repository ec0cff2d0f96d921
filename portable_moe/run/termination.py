"""SIGTERM unwinds like Ctrl-C: staging directories and worker processes are cleaned up.

Python's default for SIGTERM is to die at once, skipping ``finally`` blocks. The command line
installs :func:`install_termination_handler` at start; a program embedding portable-moe may too.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from portable_moe.bundle import note_interruption


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (after the termination handler is installed).

    A KeyboardInterrupt, so every ``finally`` and ``except BaseException`` cleanup runs (staged
    bundles are removed) and the CLI reports "interrupted".
    """


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    note_interruption()
    raise Terminated(f"terminated by {signal.Signals(signum).name}")


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    note_interruption()
    raise KeyboardInterrupt


def _keep_lost_interrupts_quiet(previous_hook: Any) -> Any:
    """An unraisable-exception hook that drops a lost KeyboardInterrupt and passes on the rest.

    Python prints an exception raised in a finalizer ("Exception ignored in ...", with a traceback)
    and goes on. An interruption lost that way was counted by the handler, and the bundle being
    written is kept out for it, so printing it would only show a traceback to a user who pressed Ctrl-C.
    """

    if getattr(previous_hook, "keeps_lost_interrupts_quiet", False):
        return previous_hook  # installed already

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        previous_hook(unraisable)

    hook.keeps_lost_interrupts_quiet = True  # type: ignore[attr-defined]
    return hook


def install_termination_handler() -> bool:
    """Make SIGTERM raise :class:`Terminated` (a KeyboardInterrupt) in the main thread, and count
    SIGTERM and Ctrl-C for :func:`portable_moe.bundle.bundle_writer`.

    Python's default for SIGTERM is to die at once, skipping ``finally`` blocks, which would leave a
    half-written bundle's staging directory behind. Ctrl-C raises KeyboardInterrupt as Python's own
    handler does (an ignored SIGINT, as a parent may set, stays ignored); counted, a bundle being
    written is not moved into place even when that KeyboardInterrupt is lost in a finalizer. Call
    this once at program start.

    Returns:
        True if installed; False when called outside the main thread (signals cannot be set there).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupted)
    sys.unraisablehook = _keep_lost_interrupts_quiet(sys.unraisablehook)
    return True


STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stopping_signals_held() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM while a child process starts; this process gets them when the block ends.

    A child starts with its parent's signal mask, so a signal sent to it in that time waits until
    the child has set its own handlers and calls :func:`release_stopping_signals`. Without this, a
    forked child runs the parent's Python handler, and a spawned one Python's own: either raises
    KeyboardInterrupt in multiprocessing's start-up code and prints a traceback to the user's terminal.
    """
    if not hasattr(signal, "pthread_sigmask"):  # no signal masks on this platform
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def release_stopping_signals() -> None:
    """In a child started under :func:`stopping_signals_held`, once its handlers are set: let the signals in."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING_SIGNALS)
