"""SIGTERM unwinds like Ctrl-C: staging directories and worker processes are cleaned up.

Python's default for SIGTERM is to die at once, skipping ``finally`` blocks. The command line
installs :func:`install_termination_handler` at start; a program embedding portable-moe may too.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

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
    return True
