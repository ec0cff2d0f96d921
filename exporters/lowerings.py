"""The MoE lowerings: how the routed experts become ONNX.

Each lowering is a module ``exporters/lowering_<name>.py`` whose ``routed_experts`` function
computes the routed part of the MoE block in torch in a form that exports to the wanted ONNX
pattern. Every lowering computes the same function as the reference; the exporter checks that.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from portable_moe.errors import ExportError


@dataclass(frozen=True)
class Lowering:
    """A named MoE lowering.

    Attributes:
        name: what users pass to ``--moe-lowering``.
        summary: one line for help text.
        module: the module that implements it (imported only when exporting).
        static_shapes: True when every expert buffer has a shape fixed by the input size alone.
    """

    name: str
    summary: str
    module: str
    static_shapes: bool = False

    def load(self) -> Any:
        """Import the implementing module (this imports torch)."""
        return importlib.import_module(self.module)


LOWERINGS: dict[str, Lowering] = {
    lowering.name: lowering
    for lowering in (
        Lowering(
            "dense",
            "every expert on every token, weighted by a mostly-zero gate (exact, cost grows with experts)",
            "exporters.lowering_dense",
        ),
    )
}


def get_lowering(name: str) -> Lowering:
    """Return the named lowering.

    Raises:
        ExportError: if there is none by that name (the message lists the names that exist).
    """
    try:
        return LOWERINGS[name]
    except KeyError:
        raise ExportError(f"unknown MoE lowering {name!r}; lowerings: {', '.join(LOWERINGS)}, or auto") from None
