"""Model conformance of the built-in presets: each exported with a backend's preferred MoE lowering, then checked.

What the pytest plugin's model tests (``portable-moe-models::tiny[cpu]``) and
``scripts/conformance_report.py`` run. :class:`PresetExports` exports each (preset, lowering) once,
into one directory, and gives for each (preset, backend) the :class:`~portable_moe.conformance.ops.ModelTask`
that checks the bundle against its golden data, or why there is none; the caller runs the tasks on
its worker pool. Exporting needs torch (the ``export`` extra); without it every check says so.

It lives here, with the tooling, because it exports: ``portable_moe/conformance/`` sits below
``exporters/`` and never imports it (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from portable_moe import registry
from portable_moe.config import runnable_presets
from portable_moe.conformance.ops import ModelTask
from portable_moe.errors import InputError

# The seed every preset is exported with.
PRESET_SEED = 0


def parse_presets(spec: str) -> list[str]:
    """Presets from ``'all'``, ``'none'`` or comma-separated names.

    Raises:
        InputError: for a name that is unknown or for cost estimates only.
    """
    runnable = runnable_presets()
    if spec == "none":
        return []
    if spec == "all":
        return runnable
    names = [name.strip() for name in spec.split(",")]
    unknown = [name for name in names if name not in runnable]
    if unknown:
        raise InputError(
            f"unknown or cost-only preset(s) {', '.join(unknown)}; choose from {', '.join(runnable)}, 'all' or 'none'"
        )
    return names


def torch_missing() -> str:
    """Why presets cannot be exported here, or "" when torch imports."""
    try:
        import torch  # noqa: F401 (only whether it imports matters)
    except ImportError as error:
        return f"exporting a preset needs torch ({error}); install it with: pip install 'portable-moe[export]'"
    return ""


@dataclass(frozen=True)
class PresetCheck:
    """A preset's model check on one backend, ready to run, or why it cannot run.

    Attributes:
        preset: the preset's name.
        backend: the backend's registry name.
        lowering: the MoE lowering the backend prefers (what the preset is exported with).
        task: the check, for a worker pool; None when it cannot run.
        reason: why it cannot run (no torch, a lowering the exporter lacks, a failed export); "" when it can.
        export_error: the exception a failed export raised, for callers that report it as raised.
    """

    preset: str
    backend: str
    lowering: str
    task: ModelTask | None = None
    reason: str = ""
    export_error: Exception | None = None


class PresetExports:
    """Presets exported with backends' preferred MoE lowerings into ``directory``, each (preset, lowering) once.

    Args:
        directory: where the bundles go (``<preset>-<lowering>``); the caller removes it.
        progress: called with a message as each export starts.
    """

    def __init__(self, directory: Path, progress: Callable[[str], None] | None = None) -> None:
        self.directory = Path(directory)
        self.progress = progress
        self._bundles: dict[tuple[str, str], Path | Exception] = {}

    def check(self, preset: str, backend: str) -> PresetCheck:
        """The check of ``preset`` on ``backend``, exporting the preset with the backend's lowering first if needed.

        Raises:
            BackendError: for a backend name that is not registered.
        """
        lowering = registry.resolve_lowering("auto", backend)
        missing = torch_missing()
        if missing:
            return PresetCheck(preset, backend, lowering, reason=missing)
        from exporters import LOWERINGS

        if lowering not in LOWERINGS:
            reason = f"{backend} prefers the {lowering!r} MoE lowering, which the exporter does not have"
            return PresetCheck(preset, backend, lowering, reason=reason)
        bundle = self._export(preset, lowering)
        if isinstance(bundle, Exception):
            reason = f"export failed: {type(bundle).__name__}: {bundle}"
            return PresetCheck(preset, backend, lowering, reason=reason, export_error=bundle)
        return PresetCheck(preset, backend, lowering, ModelTask(backend, str(bundle)))

    def _export(self, preset: str, lowering: str) -> Path | Exception:
        key = (preset, lowering)
        if key not in self._bundles:
            from exporters import export_bundle

            if self.progress is not None:
                self.progress(f"exporting {preset} with the {lowering} lowering")
            try:
                self._bundles[key] = export_bundle(
                    self.directory / f"{preset}-{lowering}", preset, PRESET_SEED, moe_lowering=lowering
                ).path
            except Exception as error:  # recorded: each check of this bundle reports it
                self._bundles[key] = error
        return self._bundles[key]
