"""The backend contract: what every adapter (built in or a vendor's own package) provides.

An adapter subclasses :class:`Backend` and :class:`CompiledModel`. The public methods here check
their arguments once (availability, MoE lowering, opset, input names, dtypes and shapes) and then
delegate to the adapter's ``_compile`` and ``_run``, so every adapter gives the same errors.

Two checks live here rather than in an adapter because every backend needs them: ``nan_policy``
(a base option every ``compile`` and ``run`` accepts: "reject" NaN/Inf in float inputs, the
default, or "pass" them through) and the vocabulary check (token ids outside the bundle config's
``vocab_size`` are refused before they reach a runtime that might read out of bounds).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from portable_moe import safety
from portable_moe.bundle import Bundle, load_bundle
from portable_moe.compare import PrecisionMode, ToleranceOverride
from portable_moe.errors import BackendError, BackendUnavailableError, PortableMoEError
from portable_moe.tensors import NAN_POLICIES, TensorSpec, check_feeds, check_nan_policy, specs_from_onnx

# Words users type for true and false (``-O strict=False`` arrives as the string "False").
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Option:
    """One compile option as a backend declares it: its type, allowed values, default and meaning.

    Values are checked (and words like "false" turned into their type) before anything compiles,
    so a bad ``-O NAME=VALUE`` is one line naming the option, the value and what it takes.

    Attributes:
        default: the value when the option is not given.
        kind: ``bool``, ``int``, ``float`` or ``str``; None for a value the backend checks itself
            with ``parse`` (or at compile, against the model).
        help: what the option does, one line.
        choices: the allowed values, when there is a fixed set.
        minimum / maximum: the allowed range of a number (inclusive).
        optional: None is allowed (it means "not set").
        parse: turns the value into its checked form; raises PortableMoEError (or ValueError/TypeError)
            for a bad one. Used when ``kind`` is None.
    """

    default: Any
    kind: type | None
    help: str = ""
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False
    parse: Callable[[Any], Any] | None = None

    def describe(self) -> str:
        """What the option takes, e.g. "an integer >= 0" or "one of f32, f16, bf16" ("" for free text)."""
        if self.choices:
            return "one of " + ", ".join(str(choice) for choice in self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind in (int, float):
            noun = "an integer" if self.kind is int else "a number"
            if self.minimum is not None and self.maximum is not None:
                return f"{noun} from {self.minimum:g} to {self.maximum:g}"
            if self.minimum is not None:
                return f"{noun} >= {self.minimum:g}"
            return f"{noun} <= {self.maximum:g}" if self.maximum is not None else noun
        return ""  # text, or a value the backend's parse checks: the help says what it takes

    def check(self, backend: str, name: str, value: Any) -> Any:
        """The value in its checked form.

        Raises:
            BackendError: naming the backend, the option, the value received and what it takes.
        """
        if value is None and (self.optional or self.default is None):
            return None
        refusal = BackendError(f"{backend} option {name} must be {self.describe() or self.help}, got {value!r}")
        if self.kind is None:
            if self.parse is None:
                return value
            try:
                return self.parse(value)
            except PortableMoEError:
                raise
            except (TypeError, ValueError):
                raise refusal from None
        if self.kind is bool:
            if isinstance(value, str) and value.strip().lower() in (*_TRUE_WORDS, *_FALSE_WORDS):
                value = value.strip().lower() in _TRUE_WORDS
            if not isinstance(value, bool):
                raise refusal
            return value
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or isinstance(value, bool):
            raise refusal
        if self.choices and value not in self.choices:
            raise refusal
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise refusal
        return self.parse(value) if self.parse is not None else value


# Options every backend's compile() takes, handled here in the base.
BASE_OPTIONS: Mapping[str, Option] = {
    "nan_policy": Option("reject", str, "NaN/Inf in float inputs: refuse them or pass them on", choices=NAN_POLICIES),
}
BASE_OPTION_DEFAULTS: Mapping[str, Any] = {name: option.default for name, option in BASE_OPTIONS.items()}
# Every weight format key a bundle can have (exporters.weight_formats.format_key); a backend that runs
# standard ONNX's Cast and DequantizeLinear (opset 21, int4 and block_size) takes them all.
WEIGHT_FORMAT_KEYS = frozenset({"float32", "float16", "bfloat16", "int8/channel", "int8/block", "int4/block"})
# Inputs that carry token ids, checked against the bundle config's vocab_size.
TOKEN_ID_INPUTS = ("input_ids",)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run, as data (tests and the registry decide on this, never on names).

    Attributes:
        min_opset / max_opset: the ai.onnx opset range it accepts.
        dtypes: numpy dtype names it computes in.
        moe_lowerings: the MoE lowerings it accepts, most preferred first.
        domains: operator domains beyond ai.onnx it runs (e.g. "com.microsoft").
        weight_formats: the bundle weight formats it takes, by format key ("float32", "float16",
            "bfloat16", "int8/channel", "int8/block", "int4/channel", "int4/block"), each with why
            it is refused where it is not. Float32 weights are always taken.
        weight_format_refusals: format key -> why this backend does not take it (shown to users).
        precision_modes: the reduced-precision modes its compiled models may report
            (``CompiledModel.precision``), each with its tolerance rows and near-tie margin. Core
            knows only "exact" (float32 throughout); conformance reads every other mode from here.
        op_tolerance_overrides: tolerances that replace an op case's own in the op suite (onnx's node
            test cases), first match wins, each with the measurement behind it; model checks use
            ``precision_modes`` instead.
        runtime_reports_unsupported: the runtime itself says what it cannot run (``compile`` or
            ``run`` raise :class:`~portable_moe.errors.UnsupportedError` with its words). The op
            suite then tries every case instead of deciding from the declared opsets, dtypes and
            domains above, which stay for checking bundles before they are compiled.
    """

    min_opset: int = 7
    max_opset: int = 23
    dtypes: frozenset[str] = frozenset({"float32", "int64"})
    moe_lowerings: tuple[str, ...] = ("dense",)
    domains: frozenset[str] = frozenset()
    weight_formats: frozenset[str] = frozenset({"float32"})
    weight_format_refusals: Mapping[str, str] = field(default_factory=dict)
    precision_modes: Mapping[str, PrecisionMode] = field(default_factory=dict)
    op_tolerance_overrides: tuple[ToleranceOverride, ...] = ()
    runtime_reports_unsupported: bool = False

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

    Every route checks the model as untrusted (see :mod:`portable_moe.safety`): a bundle through
    :func:`~portable_moe.bundle.load_bundle` and :meth:`Bundle.load_onnx`, an .onnx file the same
    way with its own directory as the limit for external data, an in-memory model without any
    external data.

    Raises:
        BundleError: if a path is neither a bundle directory nor a readable ONNX file, or the
            model fails a safety check.
    """
    if isinstance(model, onnx.ModelProto):
        source = "the in-memory model"
        safety.check_model(model, source, root=None, base=None)
        inputs, outputs = specs_from_onnx(model, source)
        return ModelInput(model, None, inputs, outputs)
    if not isinstance(model, Bundle):
        path = Path(model)
        if path.is_file():
            # The real file decides where external data may come from (and is what the runtime opens).
            real_path = Path(os.path.realpath(path))
            bundle_less = Bundle(real_path.parent, {"model_file": real_path.name}, [], [])
            proto = bundle_less.load_onnx()
            inputs, outputs = specs_from_onnx(proto, str(path))
            return ModelInput(proto, real_path, inputs, outputs)
        model = load_bundle(path)
    return ModelInput(model.load_onnx(), model.model_path, model.inputs, model.outputs, model.moe_lowering, model)


def token_id_limits(model: ModelInput) -> dict[str, int]:
    """Input name -> vocabulary size, for the token-id inputs of a model that came from a bundle with a config."""
    config = model.bundle.config if model.bundle is not None else None
    if config is None:
        return {}
    return {spec.name: config.vocab_size for spec in model.inputs if spec.name in TOKEN_ID_INPUTS}


class CompiledModel(abc.ABC):
    """A model compiled for one backend. ``run`` takes and returns numpy arrays keyed by name.

    Attributes:
        precision: the precision mode it computes in; picks the row of the tolerance table
            (``portable_moe.compare.TOLERANCES``) that conformance applies. "exact" means the
            model's own dtypes throughout.
        nan_policy: "reject" (default) or "pass" NaN/Inf in float inputs; set by ``compile``'s
            ``nan_policy`` option, overridable per ``run``.
        token_id_limits: input name -> vocab_size, set by ``compile`` for bundles with a config.
    """

    precision: str = "exact"
    nan_policy: str = "reject"
    token_id_limits: Mapping[str, int] = {}

    def __init__(self, backend: Backend, model: ModelInput) -> None:
        self.backend_name = backend.name
        self.inputs = model.inputs
        self.outputs = model.outputs

    def run(self, feeds: Mapping[str, np.ndarray], *, nan_policy: str | None = None) -> dict[str, np.ndarray]:
        """Run the model.

        The feeds are checked (see :func:`portable_moe.tensors.check_feeds`) and copied: the
        caller's arrays may be read-only, strided or byte-swapped, and are never modified.
        Safe to call from several threads at once when the adapter's runtime is (ONNX Runtime
        sessions and the reference evaluator are).

        Args:
            feeds: input name -> numpy array.
            nan_policy: override the compiled model's policy for NaN/Inf in float inputs for
                this run ("reject" or "pass").

        Raises:
            InputError: if a feed's name, dtype, rank or size does not match the model, a float
                input holds NaN/Inf under the "reject" policy, or a token id is outside the vocabulary.
            BackendError: if the backend fails while running or leaves out an output.
        """
        checked = check_feeds(
            self.inputs,
            feeds,
            nan_policy=self.nan_policy if nan_policy is None else nan_policy,
            token_id_limits=self.token_id_limits,
        )
        try:
            results = self._run(checked)
        except PortableMoEError:  # already ours (an adapter's InputError or BackendError): keep its kind
            raise
        except Exception as error:
            raise BackendError(
                f"backend {self.backend_name!r} failed while running: {type(error).__name__}: {error}"
            ) from error
        missing = [spec.name for spec in self.outputs if spec.name not in results]
        if missing:
            raise BackendError(f"backend {self.backend_name!r} returned no value for output(s) {', '.join(missing)}")
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
        declared_options: the options ``compile`` accepts, each with its type, range and default
            (:class:`Option`); checked before anything compiles.
        option_defaults: the options' defaults; derived from ``declared_options``. An adapter that
            declares only defaults gets its values unchecked (its ``_compile`` checks them).
        expected_failures_file: a TOML file of op-suite cases this backend is known to fail, each
            with its category and reason (see :mod:`portable_moe.conformance.expected_failures`); None if none.
    """

    name: str = ""
    vendor: str = ""
    description: str = ""
    simulated: bool = False
    declared_options: Mapping[str, Option] = {}
    option_defaults: Mapping[str, Any] = {}
    expected_failures_file: Path | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "declared_options" in cls.__dict__ and "option_defaults" not in cls.__dict__:
            cls.option_defaults = {name: option.default for name, option in cls.declared_options.items()}

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
        self,
        model: Bundle | onnx.ModelProto | str | os.PathLike[str],
        options: Mapping[str, Any] | None = None,
        *,
        check_declared: bool = True,
    ) -> CompiledModel:
        """Compile a model for this backend.

        Args:
            model: a Bundle, a bundle directory, an .onnx file, or a ModelProto.
            options: backend options (see ``option_defaults``), plus the base option every
                backend takes: ``nan_policy`` ("reject", the default, or "pass"). Unknown names
                are refused.
            check_declared: refuse a model outside the declared capabilities (``check_supported``)
                before compiling. The op suite passes False for a backend whose runtime reports
                what it cannot run, so that the runtime answers rather than a table.

        Raises:
            BackendUnavailableError: if ``probe()`` says the backend cannot run here.
            BackendError: if the model's MoE lowering or opset is outside the capabilities, an
                option is unknown, or the backend fails to compile (``UnsupportedError`` when its
                runtime says it cannot run the model).
            BundleError: if the model fails a safety check.
            InputError: if ``nan_policy`` is not "reject" or "pass".
        """
        probe = self.safe_probe()
        if not probe.available:
            raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {probe.reason}")
        adapter_options = dict(options or {})
        nan_policy = check_nan_policy(adapter_options.pop("nan_policy", BASE_OPTION_DEFAULTS["nan_policy"]))
        resolved = self.resolve_options(adapter_options)
        prepared = model if isinstance(model, ModelInput) else as_model_input(model)
        if check_declared:
            self.check_supported(prepared)
        try:
            compiled = self._compile(prepared, resolved)
        except PortableMoEError:
            raise
        except Exception as error:
            raise BackendError(
                f"backend {self.name!r} failed to compile the model: {type(error).__name__}: {error}"
            ) from error
        if not isinstance(compiled, CompiledModel):
            raise BackendError(f"backend {self.name!r} compiled to a {type(compiled).__name__}, not a CompiledModel")
        compiled.nan_policy = nan_policy
        compiled.token_id_limits = token_id_limits(prepared)
        return compiled

    def resolve_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check options against their declarations and merge them with the defaults.

        Raises:
            BackendError: for a name this backend does not know, or a value of the wrong type or
                outside the option's choices or range.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            known = ", ".join(sorted(self.option_defaults)) or "none"
            raise BackendError(f"backend {self.name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
        for name, value in options.items():
            if name in self.declared_options:
                options[name] = self.declared_options[name].check(self.name, name, value)
        return {**self.option_defaults, **options}

    def check_options(self, options: Mapping[str, Any] | None) -> None:
        """Check options as ``compile`` would (the base option ``nan_policy`` included), without compiling.

        Raises:
            BackendError: for an unknown option or a bad value.
            InputError: for a bad ``nan_policy``.
        """
        adapter_options = dict(options or {})
        check_nan_policy(adapter_options.pop("nan_policy", BASE_OPTION_DEFAULTS["nan_policy"]))
        self.resolve_options(adapter_options)

    def check_supported(self, model: ModelInput) -> None:
        """Refuse a model whose lowering, weight format, opset or operator domains this backend does not take."""
        capabilities = self.capabilities
        lowering = model.moe_lowering
        if lowering is not None and lowering not in capabilities.moe_lowerings:
            raise BackendError(
                f"backend {self.name!r} does not accept the {lowering!r} MoE lowering; it takes "
                f"{', '.join(capabilities.moe_lowerings)}. Re-export with --moe-lowering "
                f"{capabilities.preferred_lowering} (or --moe-lowering auto --for-backend {self.name})"
            )
        weights = model.bundle.weight_format if model.bundle is not None else "float32"
        if weights != "float32" and weights not in capabilities.weight_formats:
            reason = capabilities.weight_format_refusals.get(weights, "it does not declare that format")
            taken = ", ".join(sorted(capabilities.weight_formats | {"float32"}))
            raise BackendError(
                f"backend {self.name!r} does not take {weights} weights: {reason}. It takes {taken}; "
                "re-export with one of those (--weights, --block-size)"
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
