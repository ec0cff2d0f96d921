"""The command line: ``portable-moe`` (entry point ``portable_moe.cli:main``).

``app`` parses the command line and runs the core commands; each further module adds its own
subcommands (``cluster_commands``: ``worker`` and ``--cluster``). Nothing outside this package
imports it.
"""

from __future__ import annotations

from portable_moe.cli.app import main

__all__ = ["main"]
