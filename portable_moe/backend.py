"""The backend contract: what every adapter (built in or a vendor's own package) provides.

An adapter subclasses :class:`Backend` and :class:`CompiledModel`. The public methods here check
their arguments once (availability, MoE lowering, opset, input names, dtypes and shapes) and then
delegate to the adapter's ``_compile`` and ``_run``, so every adapter gives the same errors.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from portable_moe.bundle import Bundle, load_bundle
from portable_moe.errors import BackendError, BackendUnavailableError
from portable_moe.tensors import TensorSpec, check_feeds, specs_from_onnx


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run, as data (tests and the registry decide on this, never on names).

    Attributes:
        min_opset / max_opset: the ai.onnx opset range it accepts.
        dtypes: numpy dtype names it computes in.
        dynamic_shapes: whether one compiled model takes inputs of any size.
        moe_lowerings: the MoE lowerings it accepts, most preferred first.
        domains: operator domains beyond ai.onnx it runs (e.g. "com.microsoft").
    """

    min_opset: int = 7
    max_opset: int = 23
    dtypes: frozenset[str] = frozenset({"float32", "int64"})
    dynamic_shapes: bool = True
    moe_lowerings: tuple[str, ...] = ("dense",)
    domains: frozenset[str] = frozenset()

    @property
    def preferred_lowering(self) -> str:
        return self.moe_lowerings[0]


@dataclass(frozen=True)
class ProbeResult:
    """Whether a backend can run here, and why not in words a user can act on."""

    available: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelInput:
    """A model ready for a backend: the ONNX graph, where it lies, and what the bundle says of it."""

    proto: onnx.ModelProto
    path: Path | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    moe_lowering: str | None = None
    bundle: Bundle | None = None


def as_model_input(model: Bundle | onnx.ModelProto | str | os.PathLike[str]) -> ModelInput:
    """Accept a Bundle, a bundle directory, an .onnx file or an in-memory ModelProto.

    Raises:
        BundleError: if a path is neither a bundle directory nor a readable ONNX file.
    """
    if isinstance(model, onnx.ModelProto):
        inputs, outputs = specs_from_onnx(model)
        return ModelInput(model, None, inputs, outputs)
    if not isinstance(model, Bundle):
        path = Path(model)
        if path.is_file():
            bundle_less = Bundle(path.parent, {"model_file": path.name}, [], [])
            proto = bundle_less.load_onnx()
            inputs, outputs = specs_from_onnx(proto)
            return ModelInput(proto, path, inputs, outputs)
        model = load_bundle(path)
    return ModelInput(model.load_onnx(), model.model_path, model.inputs, model.outputs, model.moe_lowering, model)


class CompiledModel(abc.ABC):
    """A model compiled for one backend. ``run`` takes and returns numpy arrays keyed by name.

    Attributes:
        precision: the precision mode it computes in; picks the row of the tolerance table
            (``portable_moe.compare.TOLERANCES``) that conformance applies. "exact" means the
            model's own dtypes throughout.
    """

    precision: str = "exact"

    def __init__(self, backend: Backend, model: ModelInput) -> None:
        self.backend_name = backend.name
        self.inputs = model.inputs
        self.outputs = model.outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model.

        Raises:
            InputError: if a feed's name, dtype, rank or size does not match the model.
            BackendError: if the backend fails while running.
        """
        checked = check_feeds(self.inputs, feeds)
        try:
            results = self._run(checked)
        except BackendError:
            raise
        except Exception as error:
            raise BackendError(
                f"backend {self.backend_name!r} failed while running: {type(error).__name__}: {error}"
            ) from error
        return {spec.name: results[spec.name] for spec in self.outputs}

    def placement(self) -> dict[str, int]:
        """How many graph nodes run where (e.g. ``{"CPUExecutionProvider": 240}``)."""
        return {}

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on already-checked feeds; return every output by name."""


class Backend(abc.ABC):
    """A backend adapter. Subclasses set ``name``, ``vendor``, ``description`` and implement the hooks.

    Attributes:
        name: registry name users type ("cpu").
        vendor: who makes the silicon or runtime.
        description: one line for ``portable-moe backends``.
        simulated: True for a backend that simulates hardware it does not have.
        option_defaults: the options ``compile`` accepts, with their defaults.
    """

    name: str = ""
    vendor: str = ""
    description: str = ""
    simulated: bool = False
    option_defaults: Mapping[str, Any] = {}

    @abc.abstractmethod
    def probe(self) -> ProbeResult:
        """Say whether this backend can run on this machine, and if not, why."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend can run."""

    def safe_probe(self) -> ProbeResult:
        """Probe, turning an exception inside the adapter's probe into 'unavailable' with its reason."""
        try:
            result = self.probe()
        except Exception as error:
            return ProbeResult(False, f"probe failed: {type(error).__name__}: {error}")
        if not isinstance(result, ProbeResult):
            return ProbeResult(False, f"probe returned {type(result).__name__}, not a ProbeResult")
        return result

    def compile(
        self, model: Bundle | onnx.ModelProto | str | os.PathLike[str], options: Mapping[str, Any] | None = None
    ) -> CompiledModel:
        """Compile a model for this backend.

        Args:
            model: a Bundle, a bundle directory, an .onnx file, or a ModelProto.
            options: backend options (see ``option_defaults``); unknown names are refused.

        Raises:
            BackendUnavailableError: if ``probe()`` says the backend cannot run here.
            BackendError: if the model's MoE lowering or opset is outside the capabilities, an
                option is unknown, or the backend fails to compile.
        """
        probe = self.safe_probe()
        if not probe.available:
            raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {probe.reason}")
        resolved = self.resolve_options(options)
        prepared = model if isinstance(model, ModelInput) else as_model_input(model)
        self.check_supported(prepared)
        try:
            return self._compile(prepared, resolved)
        except BackendError:
            raise
        except Exception as error:
            raise BackendError(
                f"backend {self.name!r} failed to compile the model: {type(error).__name__}: {error}"
            ) from error

    def resolve_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Merge options with the defaults, refusing names this backend does not know."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            known = ", ".join(sorted(self.option_defaults)) or "none"
            raise BackendError(f"backend {self.name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
        return {**self.option_defaults, **options}

    def check_supported(self, model: ModelInput) -> None:
        """Refuse a model whose lowering, opset or operator domains this backend does not take."""
        capabilities = self.capabilities
        lowering = model.moe_lowering
        if lowering is not None and lowering not in capabilities.moe_lowerings:
            raise BackendError(
                f"backend {self.name!r} does not accept the {lowering!r} MoE lowering; it takes "
                f"{', '.join(capabilities.moe_lowerings)}. Re-export with --moe-lowering "
                f"{capabilities.preferred_lowering} (or auto)"
            )
        for opset in model.proto.opset_import:
            if opset.domain in ("", "ai.onnx"):
                if not capabilities.min_opset <= opset.version <= capabilities.max_opset:
                    raise BackendError(
                        f"backend {self.name!r} runs ai.onnx opsets {capabilities.min_opset}-{capabilities.max_opset}, "
                        f"the model uses opset {opset.version}"
                    )
        used_domains = {node.domain for node in model.proto.graph.node} - {"", "ai.onnx"}
        local_functions = {function.domain for function in model.proto.functions}
        foreign = sorted(used_domains - local_functions - capabilities.domains)
        if foreign:
            raise BackendError(
                f"backend {self.name!r} cannot run operators of domain(s) {', '.join(foreign)}; "
                f"it runs ai.onnx{''.join(', ' + d for d in sorted(capabilities.domains))}"
            )

    @abc.abstractmethod
    def _compile(self, model: ModelInput, options: dict[str, Any]) -> CompiledModel:
        """Build the backend's executable form of ``model`` with resolved ``options``."""
