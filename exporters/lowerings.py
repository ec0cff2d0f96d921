"""The MoE lowerings: how the routed experts become ONNX.

Each lowering is a module ``exporters/lowering_<name>.py`` that provides:

- ``routed_experts(hidden, expert_ids, expert_weights, w1, w3, w2, **options)``: the routed part
  of the MoE block in torch, written so that it exports to the wanted ONNX pattern. It returns
  the routed output, or ``(output, dropped_count)`` when it can drop tokens.
- optionally ``OPTION_DEFAULTS`` (the options it takes), ``CUSTOM_TRANSLATION_TABLE`` (for
  ``torch.onnx.export``) and ``after_export(program)`` (a graph rewrite run before saving).

Every lowering computes the same function as the reference; the exporter checks that.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from portable_moe.errors import ExportError


@dataclass(frozen=True)
class Lowering:
    """A named MoE lowering.

    Attributes:
        name: what users pass to ``--moe-lowering``.
        summary: one line for help text.
        module: the module that implements it (imported only when exporting: it imports torch).
        domains: operator domains beyond ai.onnx that the exported graph uses.
    """

    name: str
    summary: str
    module: str
    domains: frozenset[str] = frozenset()

    def load(self) -> Any:
        """Import the implementing module (this imports torch)."""
        return importlib.import_module(self.module)

    def option_defaults(self) -> dict[str, Any]:
        return dict(getattr(self.load(), "OPTION_DEFAULTS", {}))

    def routed_experts(self, options: Mapping[str, Any]) -> Callable[..., Any]:
        """The torch implementation bound to ``options`` (unknown option names are refused).

        Raises:
            ExportError: naming the unknown options and the ones this lowering takes.
        """
        defaults = self.option_defaults()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            known = ", ".join(sorted(defaults)) or "none"
            raise ExportError(f"the {self.name} lowering has no option(s) {', '.join(unknown)}; its options: {known}")
        implementation = self.load().routed_experts
        bound = {**defaults, **options}
        return functools.partial(implementation, **bound) if bound else implementation


LOWERINGS: dict[str, Lowering] = {
    lowering.name: lowering
    for lowering in (
        Lowering(
            "dense",
            "every expert on every token, weighted by a mostly-zero gate (exact; cost grows with the expert count)",
            "exporters.lowering_dense",
        ),
        Lowering(
            "sparse",
            "token-slots sorted by expert; each expert runs on its own contiguous block (cost grows with tokens x top-k)",
            "exporters.lowering_sparse",
        ),
        Lowering(
            "capacity",
            "fixed slots per expert (static shapes for NPU compilers); drops what does not fit, never on the golden data",
            "exporters.lowering_capacity",
        ),
        Lowering(
            "fused",
            "ONNX Runtime's com.microsoft::MoE operator, fed DeepSeek routing computed in the graph",
            "exporters.lowering_fused",
            domains=frozenset({"com.microsoft"}),
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
