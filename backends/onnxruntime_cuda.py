"""``cuda``: ONNX Runtime's CUDA execution provider, on an NVIDIA GPU.

Three things can stand between a user and a GPU run, and :meth:`OnnxRuntimeCudaBackend.probe`
tells them apart: the installed onnxruntime is the CPU-only wheel (no ``CUDAExecutionProvider``);
the provider is there but no driver or device answers; or all is well (the device's name is
reported). Each detection step is a plain function the backend takes as an argument, so the
decisions are tested on machines without a GPU.

Placement is strict by default: ``session.disable_cpu_ep_fallback`` makes session creation fail
if any node would land on the CPU, and the error names those nodes. ``allow_cpu_fallback=true``
lifts that. Either way the placement reported is read from ONNX Runtime's own profile of one run,
so it is what ran, not what was asked for. Runs go through one IOBinding (inputs copied to the
device, outputs allocated there, one copy back); with ``enable_cuda_graph`` the inputs and outputs
stay at fixed device addresses, as CUDA graph replay needs.
"""

from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from backends.onnxruntime_cpu import model_source, session_options, unsupported_answer
from portable_moe.backend import Backend, Capabilities, CompiledModel, ModelInput, Option, ProbeResult
from portable_moe.errors import BackendError, InputError
from portable_moe.tensors import TensorSpec

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
STRICT_PLACEMENT_KEY = "session.disable_cpu_ep_fallback"
# ORT's words when strict placement refuses a session (checked against ORT 1.2x/1.3x sources).
_STRICT_REFUSAL = "fallback to CPU EP has been explicitly disabled"

# Wheels that install the same `onnxruntime` module; two of them at once overwrite each other's files.
ONNXRUNTIME_WHEELS = ("onnxruntime", "onnxruntime-gpu")
INSTALL_HINT = (
    'pip uninstall -y onnxruntime && pip install onnxruntime-gpu (what the "portable-moe[cuda]" extra names); '
    "the two wheels install the same onnxruntime module, so keep only one"
)

# The smallest graph that must run on the GPU: one Add, which every CUDA build has a kernel for.
_DEVICE_TEST_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
device_test (float[4] x) => (float[4] y) {
    y = Add(x, x)
}
"""


class CudaDeviceError(Exception):
    """A CUDA device could not be opened; the message says why, for the probe's reason."""


# -- detection: each step a plain function, passed to the backend so tests can stand in for it --


def available_providers() -> list[str]:
    """The execution providers the installed onnxruntime was built with."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def installed_onnxruntime_wheels() -> list[str]:
    """Which of the wheels that provide the ``onnxruntime`` module are installed (by distribution name)."""
    installed = []
    for name in ONNXRUNTIME_WHEELS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        installed.append(name)
    return installed


def _load_cuda_driver() -> Any:
    library = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        return ctypes.CDLL(library)
    except OSError as error:
        raise CudaDeviceError(
            f"no NVIDIA driver: {library} cannot be loaded ({error}); "
            "is there an NVIDIA GPU with its driver installed? (nvidia-smi should list it)"
        ) from None


def _driver_error_text(driver: Any, status: int) -> str:
    text = ctypes.c_char_p()
    if driver.cuGetErrorString(status, ctypes.byref(text)) == 0 and text.value:
        return f"error {status}: {text.value.decode(errors='replace')}"
    return f"error {status}"


def cuda_driver_device_name(device_id: int, load_driver: Callable[[], Any] = _load_cuda_driver) -> str:
    """Ask the NVIDIA driver (not ONNX Runtime) for device ``device_id``'s name.

    Talking to the driver directly gives a clear reason when there is no driver or no device,
    where ONNX Runtime would only log why its provider failed.

    Raises:
        CudaDeviceError: if the driver cannot be loaded or initialised, or has no such device.
    """
    driver = load_driver()
    status = driver.cuInit(0)
    if status != 0:
        raise CudaDeviceError(f"the NVIDIA driver could not initialise ({_driver_error_text(driver, status)})")
    count = ctypes.c_int(0)
    status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        raise CudaDeviceError(f"the NVIDIA driver could not count devices ({_driver_error_text(driver, status)})")
    if not 0 <= device_id < count.value:
        raise CudaDeviceError(f"CUDA device {device_id} requested, the driver sees {count.value} device(s)")
    device = ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    status = driver.cuDeviceGet(ctypes.byref(device), device_id)
    if status == 0:
        status = driver.cuDeviceGetName(name, len(name), device)
    if status != 0:
        raise CudaDeviceError(
            f"the NVIDIA driver could not name device {device_id} ({_driver_error_text(driver, status)})"
        )
    return name.value.decode(errors="replace")


def run_on_cuda_device(device_id: int) -> None:
    """Run one Add on CUDA device ``device_id`` through ONNX Runtime, with no CPU fallback.

    Raises:
        CudaDeviceError: with ONNX Runtime's reason, if the provider cannot be created or run.
    """
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry(STRICT_PLACEMENT_KEY, "1")
    model = onnx.parser.parse_model(_DEVICE_TEST_MODEL).SerializeToString()
    try:
        session = onnxruntime.InferenceSession(
            model, options, providers=[(CUDA_PROVIDER, {"device_id": str(device_id)})], enable_fallback=0
        )
        result = session.run(None, {"x": np.arange(4, dtype=np.float32)})[0]
    except Exception as error:
        text = str(error)
        if _STRICT_REFUSAL in text:
            text = (
                "onnxruntime could not create its CUDA provider (its log above says why; "
                "usually a CUDA or cuDNN library this onnxruntime-gpu build needs is missing)"
            )
        raise CudaDeviceError(f"onnxruntime could not run on CUDA device {device_id}: {text}") from None
    if not np.array_equal(result, np.arange(4, dtype=np.float32) * 2):
        raise CudaDeviceError(f"CUDA device {device_id} computed 2*x wrong: {result.tolist()}")


def open_cuda_device(device_id: int) -> str:
    """Check that CUDA device ``device_id`` runs ONNX Runtime; return its name.

    Raises:
        CudaDeviceError: with the reason it cannot.
    """
    name = cuda_driver_device_name(device_id)
    run_on_cuda_device(device_id)
    return name


def decide_availability(
    providers: Sequence[str],
    wheels: Sequence[str],
    open_device: Callable[[int], str],
    version: str,
    device_id: int = 0,
) -> ProbeResult:
    """Turn what was detected into the probe's answer (no detection happens here).

    Args:
        providers: onnxruntime's available execution providers.
        wheels: which of ``ONNXRUNTIME_WHEELS`` are installed.
        open_device: opens a device by id, returning its name or raising with the reason.
        version: onnxruntime's version, for the messages.
        device_id: the device to try.
    """
    both = len(wheels) > 1
    clash = (
        f"both {' and '.join(wheels)} are installed and overwrite each other's files; "
        "run: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    )
    if CUDA_PROVIDER not in providers:
        if both:
            return ProbeResult(False, f"onnxruntime {version} has no {CUDA_PROVIDER}: {clash}")
        return ProbeResult(
            False,
            f"the installed onnxruntime {version} is a build without the {CUDA_PROVIDER}; "
            f"install the GPU build: {INSTALL_HINT}",
            {"providers": list(providers), "wheels": list(wheels)},
        )
    try:
        name = open_device(device_id)
    except Exception as error:
        return ProbeResult(
            False,
            f"onnxruntime {version} has the {CUDA_PROVIDER}, but no usable CUDA device {device_id}: {error}",
            {"providers": list(providers), "wheels": list(wheels)},
        )
    note = f"; warning: {clash}" if both else ""
    return ProbeResult(
        True,
        f"CUDA device {device_id}: {name} (onnxruntime {version}){note}",
        {"device_id": device_id, "device_name": name, "version": version},
    )


# -- options --


@dataclass(frozen=True)
class CudaSettings:
    """Checked compile options, in the form ONNX Runtime takes them."""

    device_id: int = 0
    gpu_mem_limit: int = 0
    enable_cuda_graph: bool = False
    allow_cpu_fallback: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CudaSettings:
        """Settings from options whose values the backend's declarations checked; refuses combinations.

        Raises:
            BackendError: for options that exclude each other.
        """
        if options["enable_cuda_graph"] and options["allow_cpu_fallback"]:
            raise BackendError(
                "cuda options enable_cuda_graph and allow_cpu_fallback exclude each other: "
                "a CUDA graph can only capture a model whose every node runs on the GPU"
            )
        return cls(**{setting.name: options[setting.name] for setting in fields(cls)})

    def provider_options(self) -> dict[str, str]:
        options = {
            "device_id": str(self.device_id),
            # TF32 matmuls keep 10 mantissa bits; the float32 golden data needs full float32.
            "use_tf32": "0",
        }
        if self.gpu_mem_limit:
            options["gpu_mem_limit"] = str(self.gpu_mem_limit)
        if self.enable_cuda_graph:
            options["enable_cuda_graph"] = "1"
        return options


# -- sessions, placement and IOBinding: written for any provider, so they are tested with the CPU one --


class NodePlacement(NamedTuple):
    """Where one node of the optimised graph ran."""

    node: str
    op_type: str
    provider: str


def node_placements(profile: Any) -> list[NodePlacement]:
    """Read which provider ran each node from an ONNX Runtime profile (its Chrome-trace JSON).

    Args:
        profile: the parsed JSON: a list of events, or a dict with a ``traceEvents`` list.

    Returns:
        One entry per node that ran (ORT writes several events per node; only kernel events
        carry the provider), in the order they first ran.
    """
    events = profile.get("traceEvents", []) if isinstance(profile, dict) else profile
    placements: dict[str, NodePlacement] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") != "Node" or "provider" not in args:
            continue
        node = str(event.get("name", "")).removesuffix("_kernel_time")
        placements.setdefault(node, NodePlacement(node, str(args.get("op_name", "?")), str(args["provider"])))
    return list(placements.values())


def count_by_provider(placements: Sequence[NodePlacement]) -> dict[str, int]:
    """``{provider: number of nodes}``, most nodes first."""
    return dict(Counter(placement.provider for placement in placements).most_common())


def synthetic_feeds(inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Zeros for every input, symbolic dimensions set to 1 (placement does not depend on values or sizes)."""
    return {
        spec.name: np.zeros([dim if isinstance(dim, int) else 1 for dim in spec.shape], dtype=spec.dtype)
        for spec in inputs
    }


SessionFactory = Callable[[str | None], Any]
"""Makes an ``InferenceSession``; given a path prefix, with profiling written there."""


def profile_placement(make_session: SessionFactory, inputs: Sequence[TensorSpec]) -> list[NodePlacement]:
    """Run a profiled session once on synthetic inputs and read where each node ran."""
    with tempfile.TemporaryDirectory(prefix="portable-moe-profile-") as scratch:
        session = make_session(str(Path(scratch) / "placement"))
        session.run(None, synthetic_feeds(inputs))
        profile_path = session.end_profiling()
        return node_placements(json.loads(Path(profile_path).read_text(encoding="utf-8")))


def create_session(
    source: str | bytes,
    provider: str,
    provider_options: Mapping[str, str],
    strict: bool,
    profile_prefix: str | None = None,
) -> Any:
    """An ``InferenceSession`` on ``provider`` that never silently lands somewhere else.

    Args:
        source: model path or serialised bytes.
        provider: the execution provider wanted.
        provider_options: its options.
        strict: refuse any node on the CPU (``session.disable_cpu_ep_fallback``); else the CPU
            provider is listed after ``provider`` for what it cannot run.
        profile_prefix: when given, profiling is on and written under this prefix.

    Raises:
        BackendError: if ONNX Runtime did not create ``provider`` (its python layer drops an
            unavailable provider with only a warning).
        Exception: ONNX Runtime's own, when it refuses the session.
    """
    import onnxruntime

    options = session_options(0, "all")
    if strict:
        options.add_session_config_entry(STRICT_PLACEMENT_KEY, "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers: list[Any] = [(provider, dict(provider_options))]
    if not strict and provider != CPU_PROVIDER:
        providers.append(CPU_PROVIDER)
    # enable_fallback=0: on a provider error, ORT's python layer would otherwise retry on CPU and only print it.
    session = onnxruntime.InferenceSession(source, options, providers=providers, enable_fallback=0)
    if provider not in session.get_providers():
        raise BackendError(
            f"onnxruntime did not create the {provider} (the session has {', '.join(session.get_providers())}); "
            "its log says why"
        )
    return session


class IoBindingRunner:
    """Runs a session through one ``IOBinding`` kept across runs.

    Outputs are bound to the device, so ONNX Runtime allocates them there (from its arena, which
    keeps freed blocks for reuse) and ``copy_outputs_to_cpu`` is the one copy back. With ``fixed_addresses`` the inputs live in
    device buffers made on the first run and refreshed in place after that, and the outputs of the
    first run stay bound: every run uses the same device addresses, which CUDA graph replay needs.
    The input shapes are then those of the first run.
    """

    def __init__(self, session: Any, device_type: str, device_id: int = 0, fixed_addresses: bool = False) -> None:
        self._session = session
        self._device = (device_type, device_id)
        self._fixed = fixed_addresses
        self._binding = session.io_binding()
        self._output_names = [output.name for output in session.get_outputs()]
        self._input_values: dict[str, Any] = {}
        self._outputs_pinned = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (numpy arrays by input name) and return numpy outputs by name.

        Raises:
            InputError: with ``fixed_addresses``, if an input's shape differs from the first run's.
        """
        contiguous = {name: np.ascontiguousarray(array) for name, array in feeds.items()}
        if self._fixed:
            self._bind_fixed_inputs(contiguous)
        else:
            for name, array in contiguous.items():
                self._binding.bind_cpu_input(name, array)
        if not self._outputs_pinned:
            # Bound by device only: ORT allocates them for this run's shapes (from its arena, no new device malloc).
            for name in self._output_names:
                self._binding.bind_output(name, *self._device)
        self._session.run_with_iobinding(self._binding)
        outputs = self._binding.copy_outputs_to_cpu()
        if self._fixed and not self._outputs_pinned:
            for name, value in zip(self._output_names, self._binding.get_outputs()):
                self._binding.bind_ortvalue_output(name, value)
            self._outputs_pinned = True
        return dict(zip(self._output_names, outputs))

    def _bind_fixed_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        from onnxruntime import OrtValue

        if not self._input_values:
            for name, array in feeds.items():
                value = OrtValue.ortvalue_from_numpy(array, *self._device)
                self._binding.bind_ortvalue_input(name, value)
                self._input_values[name] = value
            return
        for name, array in feeds.items():
            value = self._input_values[name]
            if tuple(value.shape()) != array.shape:
                raise InputError(
                    f"input {name!r} has shape {list(array.shape)}, but this model was compiled with "
                    f"enable_cuda_graph, which fixes input shapes at the first run's {list(value.shape())}; "
                    "compile again for the new shape, or compile without enable_cuda_graph"
                )
            value.update_inplace(array)


# -- the backend --


class CudaCompiledModel(CompiledModel):
    """A CUDA ``InferenceSession`` run through :class:`IoBindingRunner`, with its measured placement."""

    def __init__(
        self, backend: Backend, model: ModelInput, session: Any, settings: CudaSettings, placement: dict[str, int]
    ) -> None:
        super().__init__(backend, model)
        self.session = session
        self.settings = settings
        self._placement = placement
        self._runner = IoBindingRunner(session, "cuda", settings.device_id, fixed_addresses=settings.enable_cuda_graph)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._runner.run(feeds)
        except Exception as error:
            answer = unsupported_answer(error, None)
            if answer is None:
                raise
            raise answer from error

    def placement(self) -> dict[str, int]:
        return dict(self._placement)


class OnnxRuntimeCudaBackend(Backend):
    """ONNX Runtime's CUDA provider.

    Args:
        available_providers / installed_wheels / open_device: the detection steps (see the
            module's functions of those names); tests pass stand-ins.
    """

    name = "cuda"
    vendor = "NVIDIA (ONNX Runtime CUDA execution provider)"
    description = "ONNX Runtime CUDA execution provider (needs onnxruntime-gpu and an NVIDIA GPU)"
    declared_options = {
        "device_id": Option(0, int, "CUDA device index", minimum=0),
        "gpu_mem_limit": Option(0, int, "ONNX Runtime arena limit in bytes (0: no limit)", minimum=0),
        "enable_cuda_graph": Option(False, bool, "capture a CUDA graph (every node must run on the GPU)"),
        "allow_cpu_fallback": Option(False, bool, "let nodes CUDA cannot run fall back to the CPU"),
    }

    def __init__(
        self,
        available_providers: Callable[[], Sequence[str]] = available_providers,
        installed_wheels: Callable[[], Sequence[str]] = installed_onnxruntime_wheels,
        open_device: Callable[[int], str] = open_cuda_device,
    ) -> None:
        self._available_providers = available_providers
        self._installed_wheels = installed_wheels
        self._open_device = open_device
        self._probed: ProbeResult | None = None

    def probe(self) -> ProbeResult:
        # Opening a device costs a CUDA context (a second or so); what it finds does not change within a process.
        if self._probed is None:
            try:
                import onnxruntime
            except ImportError as error:
                return ProbeResult(False, f"onnxruntime is not installed ({error}); run: pip install onnxruntime-gpu")
            self._probed = decide_availability(
                list(self._available_providers()),
                list(self._installed_wheels()),
                self._open_device,
                onnxruntime.__version__,
            )
        return self._probed

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            min_opset=7,
            max_opset=23,
            dtypes=frozenset({"float32", "float16", "int64", "int32", "bool"}),
            moe_lowerings=("fused", "sparse", "dense", "capacity"),
            domains=frozenset({"com.microsoft"}),
            # Cast and per-axis int8 DequantizeLinear are long-standing CUDA kernels; the blocked forms
            # (opset 21) have not been run on a GPU by this project yet, so they are not claimed.
            weight_formats=frozenset({"float16", "bfloat16", "int8/channel"}),
            weight_format_refusals={
                key: "block-wise DequantizeLinear (opset 21) has not been checked on ONNX Runtime's CUDA provider "
                "by this project; use int8 per-channel (--block-size 0) or run the bundle on cpu"
                for key in ("int8/block", "int4/block")
            },
            runtime_reports_unsupported=True,
        )

    def _compile(self, model: ModelInput, options: dict[str, Any]) -> CompiledModel:
        settings = CudaSettings.from_options(options)
        try:
            session = make_cuda_session(model, settings)
        except Exception as error:
            answer = unsupported_answer(error, model.proto)
            if answer is None:
                raise
            raise answer from error
        # Placement is measured on a twin session without CUDA graphs (a graph would be captured
        # for the synthetic shapes), with the same providers and placement rules.
        twin = replace(settings, enable_cuda_graph=False)
        placements = profile_placement(lambda prefix: make_cuda_session(model, twin, prefix), model.inputs)
        return CudaCompiledModel(self, model, session, settings, count_by_provider(placements))


def make_cuda_session(model: ModelInput, settings: CudaSettings, profile_prefix: str | None = None) -> Any:
    """A CUDA session for ``model``; when strict placement refuses it, say which nodes would run on the CPU.

    Raises:
        BackendError: if the session cannot be created, with the CPU-bound nodes when that is why.
    """
    source = model_source(model)
    strict = not settings.allow_cpu_fallback
    try:
        return create_session(source, CUDA_PROVIDER, settings.provider_options(), strict, profile_prefix)
    except BackendError:
        raise
    except Exception as error:
        if not strict or _STRICT_REFUSAL not in str(error):
            raise
        lenient = replace(settings, allow_cpu_fallback=True, enable_cuda_graph=False)
        found = describe_cpu_nodes(
            lambda prefix: create_session(source, CUDA_PROVIDER, lenient.provider_options(), False, prefix),
            model.inputs,
        )
        raise BackendError(
            f"strict placement refused the model: {found}; pass -O allow_cpu_fallback=true to let "
            "those nodes run on the CPU (the placement is then reported)"
        ) from error


def describe_cpu_nodes(make_session: SessionFactory, inputs: Sequence[TensorSpec]) -> str:
    """Say which nodes a session (made with CPU fallback allowed) runs on the CPU, by operator type."""
    try:
        cpu_nodes = [p for p in profile_placement(make_session, inputs) if p.provider == CPU_PROVIDER]
    except Exception as error:
        return f"some nodes would run on the CPU (which ones could not be found: {type(error).__name__}: {error})"
    op_counts = ", ".join(f"{op} x{count}" for op, count in Counter(p.op_type for p in cpu_nodes).most_common())
    return (
        f"{len(cpu_nodes)} node(s) would run on the CPU ({op_counts or 'none found'}): the CUDA provider "
        "has no kernel for them, or keeps small shape computations on the CPU"
    )
