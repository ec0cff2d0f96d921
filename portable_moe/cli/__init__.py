"""The command line: ``portable-moe`` (entry point ``portable_moe.cli:run``).

``app`` parses the command line and runs the core commands; each further module adds its own
subcommands (``cluster_commands``: ``worker`` and ``--cluster``). Nothing outside this package
imports it.
"""

from __future__ import annotations

import gc

from portable_moe.cli.app import main

__all__ = ["main", "run"]


def run() -> int:
    """The ``portable-moe`` command: :func:`main`, then a quick way out of the process.

    Once a command has run, the interpreter's shutdown still collects cycles over every object
    alive, torch's included: after an export, seconds of a command that has nothing left to do.
    Frozen (``gc.freeze``), those objects are left to the operating system, which frees the whole
    process at once; exit handlers (``atexit``, ``weakref.finalize``) still run. :func:`main` itself stays free of
    this, for callers (tests, embedding programs) that go on running.
    """
    try:
        return main()
    finally:
        gc.freeze()
