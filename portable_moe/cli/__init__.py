"""The command line: ``portable-moe`` (entry point ``portable_moe.cli:run``).

``app`` parses the command line and runs the core commands; each further module adds its own
subcommands (``cluster_commands``: ``worker`` and ``--cluster``). Nothing outside this package
imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading

from portable_moe.cli.app import main

__all__ = ["main", "run"]


def run() -> int:
    """The ``portable-moe`` command: :func:`main`, then a quick way out of the process.

    Once a command has run, the interpreter's shutdown collects cycles over every object alive,
    torch's included, then frees them one by one: after an export, most of a second of a command
    that has nothing left to do. Frozen (``gc.freeze``), the objects are skipped by the collector.
    Where :func:`main` returned and no other thread runs, the process then ends at once
    (:func:`_exit_now`): its exit handlers run and its streams are flushed, and the operating
    system frees the rest. :func:`main` itself stays free of this, for callers (tests, embedding
    programs) that go on running.
    """
    try:
        code = main()
    finally:
        gc.freeze()
    if threading.active_count() == 1:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process with ``code`` as the interpreter would, less the freeing of each object.

    The exit handlers (``atexit``: ``weakref.finalize``, logging's flush, multiprocessing's
    clean-up) run, the standard streams are flushed, then ``os._exit``. A stream that cannot be
    flushed any more (a pipe whose reader has gone) is left: what it held had nowhere to go.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(code)
