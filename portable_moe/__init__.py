"""portable-moe: export a DeepSeek-style MoE model once, run it on many backends, prove they agree.

The public API::

    import portable_moe
    bundle = portable_moe.export("build/tiny", preset="tiny", seed=0, overwrite=True, verbose=True)  # [export] extra
    bundle = portable_moe.load_bundle("build/tiny")                     # needs no torch
    compiled = portable_moe.get_backend("cpu").compile(bundle)
    outputs = compiled.run({"input_ids": ids})
    results = portable_moe.check_bundle(bundle, ["cpu", "reference"])

Importing this package imports neither torch nor any backend.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from portable_moe.backend import Backend, Capabilities, CompiledModel, ModelInput, Option, ProbeResult
from portable_moe.bundle import Bundle, load_bundle
from portable_moe.compare import TOLERANCES, OutputComparison, Tolerance, compare_outputs, routing_agreement
from portable_moe.config import PRESETS, ModelConfig, get_preset
from portable_moe.conformance import BackendResult, check_backend, check_bundle
from portable_moe.errors import (
    BackendError,
    BackendUnavailableError,
    BundleError,
    ConfigError,
    ConformanceError,
    ExportError,
    InputError,
    PortableMoEError,
    UnsupportedError,
    UnsupportedReason,
)
from portable_moe.fallback import FallbackResult, compile_with_fallback, run_with_fallback
from portable_moe.registry import (
    BackendStatus,
    backend_names,
    get_backend,
    list_backends,
    register_backend,
    select_backend,
    unregister_backend,
)
from portable_moe.tensors import TensorSpec

try:
    __version__ = version("portable-moe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"


def export(
    output_dir: str | os.PathLike[str],
    preset: str | ModelConfig | None = None,
    seed: int = 0,
    *,
    verbose: bool = False,
    **options: Any,
) -> Bundle:
    """Export a preset (default "tiny"), or a local Hugging Face checkpoint with ``hf=DIR``, to a bundle.

    Imports torch (and transformers for ``hf``); see ``exporters.export_bundle`` for the options.

    Args:
        output_dir: the bundle directory to create (``overwrite=True`` replaces an existing one).
        preset: a preset name or a ModelConfig.
        seed: weight seed.
        verbose: print each step with its time on stderr (exporting takes tens of seconds);
            ``progress=callback`` receives the step messages instead.
        options: passed to ``exporters.export_bundle``.
    """
    from exporters import export_bundle
    from portable_moe import progress as step_progress

    reporter = step_progress.resolve(options.pop("progress", None), verbose)
    try:
        return export_bundle(output_dir, preset, seed, progress=reporter, **options)
    finally:
        step_progress.finish(reporter)


__all__ = [
    "PRESETS",
    "TOLERANCES",
    "Backend",
    "BackendError",
    "BackendResult",
    "BackendStatus",
    "BackendUnavailableError",
    "Bundle",
    "BundleError",
    "Capabilities",
    "CompiledModel",
    "ConfigError",
    "ConformanceError",
    "ExportError",
    "FallbackResult",
    "InputError",
    "ModelConfig",
    "ModelInput",
    "Option",
    "OutputComparison",
    "PortableMoEError",
    "ProbeResult",
    "TensorSpec",
    "Tolerance",
    "UnsupportedError",
    "UnsupportedReason",
    "__version__",
    "backend_names",
    "check_backend",
    "check_bundle",
    "compare_outputs",
    "compile_with_fallback",
    "export",
    "get_backend",
    "get_preset",
    "list_backends",
    "load_bundle",
    "register_backend",
    "routing_agreement",
    "run_with_fallback",
    "select_backend",
    "unregister_backend",
]
