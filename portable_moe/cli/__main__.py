"""``python -m portable_moe.cli``: the same as the ``portable-moe`` command."""

import sys

from portable_moe.cli import run

sys.exit(run())
