"""The ``cuda`` backend: its availability decisions, options, placement and IOBinding.

Most tests run anywhere: detection steps are passed in as stand-ins, and the session, profiling
and IOBinding helpers are written for any provider, so they run here with the CPU one. The tests
at the end need a real NVIDIA GPU with onnxruntime-gpu and are skipped, with the probe's reason,
where there is none.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
import onnx
import onnxruntime
import pytest

from backends.onnxruntime_cuda import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    CudaDeviceError,
    CudaSettings,
    IoBindingRunner,
    NodePlacement,
    OnnxRuntimeCudaBackend,
    count_by_provider,
    create_session,
    cuda_driver_device_name,
    decide_availability,
    describe_cpu_nodes,
    make_cuda_session,
    node_placements,
    profile_placement,
    run_on_cuda_device,
    synthetic_feeds,
)
from portable_moe.backend import as_model_input
from portable_moe.errors import BackendError, BackendUnavailableError, InputError
from portable_moe.registry import get_backend
from portable_moe.tensors import TensorSpec

HAS_CUDA_PROVIDER = CUDA_PROVIDER in onnxruntime.get_available_providers()
needs_cpu_only_onnxruntime = pytest.mark.skipif(
    HAS_CUDA_PROVIDER, reason="this onnxruntime has the CUDA provider, so the CPU-only wheel's behaviour cannot be seen"
)
# ORT's python layer warns when asked for a provider its build lacks; these tests ask on purpose.
ignore_missing_provider_warning = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")

# y = x @ w + b with dynamic rows: small, but with a MatMul, an Add and an initializer.
LINEAR_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
linear (float[rows, 3] x) => (float[rows, 2] y) <float[3, 2] w = {1, 2, 3, 4, 5, 6}, float[2] b = {0.5, -1}> {
    xw = MatMul(x, w)
    y = Add(xw, b)
}
"""
LINEAR_W = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
LINEAR_B = np.array([0.5, -1], dtype=np.float32)


def linear_model_bytes() -> bytes:
    return onnx.parser.parse_model(LINEAR_MODEL).SerializeToString()


def cpu_session(source: str | bytes, profile_prefix: str | None = None):
    return create_session(source, CPU_PROVIDER, {}, strict=False, profile_prefix=profile_prefix)


# -- availability: the decision logic, with every detection step stood in for --


class DeviceOpener:
    """Stands in for open_cuda_device: returns a name or raises, and counts calls."""

    def __init__(self, name: str | None = None, error: str | None = None) -> None:
        self.name, self.error, self.calls = name, error, 0

    def __call__(self, device_id: int) -> str:
        self.calls += 1
        if self.error is not None:
            raise CudaDeviceError(self.error)
        return f"{self.name} (id {device_id})"


def test_cpu_only_wheel_says_how_to_install_the_gpu_build():
    opener = DeviceOpener(name="unused")
    result = decide_availability([CPU_PROVIDER], ["onnxruntime"], opener, "1.32.0")
    assert not result.available
    assert "onnxruntime 1.32.0 is a build without the CUDAExecutionProvider" in result.reason
    assert "pip uninstall -y onnxruntime && pip install onnxruntime-gpu" in result.reason
    assert '"portable-moe[cuda]"' in result.reason
    assert "keep only one" in result.reason
    assert opener.calls == 0, "no device should be opened without the provider"


def test_both_wheels_installed_is_named_as_the_problem():
    result = decide_availability([CPU_PROVIDER], ["onnxruntime", "onnxruntime-gpu"], DeviceOpener("x"), "1.31.1")
    assert not result.available
    assert "both onnxruntime and onnxruntime-gpu are installed" in result.reason
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in result.reason


def test_provider_without_device_reports_the_device_error():
    opener = DeviceOpener(error="no NVIDIA driver: libcuda.so.1 cannot be loaded")
    result = decide_availability([CUDA_PROVIDER, CPU_PROVIDER], ["onnxruntime-gpu"], opener, "1.31.1", device_id=0)
    assert not result.available
    assert result.reason == (
        "onnxruntime 1.31.1 has the CUDAExecutionProvider, but no usable CUDA device 0: "
        "no NVIDIA driver: libcuda.so.1 cannot be loaded"
    )
    assert opener.calls == 1


def test_device_present_is_available_with_its_name():
    result = decide_availability(
        [CUDA_PROVIDER, CPU_PROVIDER], ["onnxruntime-gpu"], DeviceOpener("NVIDIA H200"), "1.31.1"
    )
    assert result.available
    assert result.reason == "CUDA device 0: NVIDIA H200 (id 0) (onnxruntime 1.31.1)"
    assert result.details["device_name"] == "NVIDIA H200 (id 0)"


def test_device_present_with_both_wheels_still_warns():
    result = decide_availability(
        [CUDA_PROVIDER, CPU_PROVIDER], ["onnxruntime", "onnxruntime-gpu"], DeviceOpener("GPU"), "1.31.1"
    )
    assert result.available
    assert "warning: both onnxruntime and onnxruntime-gpu are installed" in result.reason


def test_backend_probe_uses_its_detection_steps_and_opens_the_device_once():
    opener = DeviceOpener(name="NVIDIA H200")
    backend = OnnxRuntimeCudaBackend(
        available_providers=lambda: [CUDA_PROVIDER, CPU_PROVIDER],
        installed_wheels=lambda: ["onnxruntime-gpu"],
        open_device=opener,
    )
    assert backend.probe().available
    assert backend.safe_probe().available
    assert opener.calls == 1


def test_backend_probe_reports_a_failing_device():
    backend = OnnxRuntimeCudaBackend(
        available_providers=lambda: [CUDA_PROVIDER, CPU_PROVIDER],
        installed_wheels=lambda: ["onnxruntime-gpu"],
        open_device=DeviceOpener(error="CUDA failure 100: no CUDA-capable device is detected"),
    )
    probe = backend.probe()
    assert not probe.available
    assert "no usable CUDA device 0: CUDA failure 100" in probe.reason


@needs_cpu_only_onnxruntime
def test_real_probe_here_says_the_gpu_build_is_missing():
    probe = get_backend("cuda").probe()
    assert not probe.available
    assert "is a build without the CUDAExecutionProvider" in probe.reason
    assert "pip install onnxruntime-gpu" in probe.reason


@needs_cpu_only_onnxruntime
def test_compile_refuses_when_unavailable(tiny_bundle):
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' is unavailable: .*pip install onnxruntime-gpu"):
        get_backend("cuda").compile(tiny_bundle)


def test_registered_with_its_capabilities():
    backend = get_backend("cuda")
    assert isinstance(backend, OnnxRuntimeCudaBackend)
    assert backend.capabilities.moe_lowerings == ("fused", "sparse", "dense", "capacity")
    assert backend.capabilities.domains == frozenset({"com.microsoft"})


# -- device detection pieces --


class FakeDriver:
    """Stands in for libcuda: each entry point writes through its ctypes pointer as the driver does."""

    def __init__(self, init_status: int = 0, count: int = 1, name: bytes = b"Fake GPU") -> None:
        self.init_status, self.count, self.name = init_status, count, name

    def cuInit(self, flags: int) -> int:
        return self.init_status

    def cuGetErrorString(self, status: int, text: ctypes._CArgObject) -> int:
        text._obj.value = b"no CUDA-capable device is detected"
        return 0

    def cuDeviceGetCount(self, count: ctypes._CArgObject) -> int:
        count._obj.value = self.count
        return 0

    def cuDeviceGet(self, device: ctypes._CArgObject, ordinal: int) -> int:
        device._obj.value = ordinal
        return 0

    def cuDeviceGetName(self, buffer: ctypes.Array, length: int, device: ctypes.c_int) -> int:
        buffer.value = self.name
        return 0


def test_driver_name_of_a_present_device():
    assert cuda_driver_device_name(0, load_driver=FakeDriver) == "Fake GPU"


def test_driver_without_device_gives_the_driver_error():
    with pytest.raises(
        CudaDeviceError, match=r"could not initialise \(error 100: no CUDA-capable device is detected\)"
    ):
        cuda_driver_device_name(0, load_driver=lambda: FakeDriver(init_status=100))


def test_driver_with_too_few_devices():
    with pytest.raises(CudaDeviceError, match=r"CUDA device 3 requested, the driver sees 1 device"):
        cuda_driver_device_name(3, load_driver=lambda: FakeDriver(count=1))


def test_real_driver_query_names_a_device_or_says_why_not():
    try:
        name = cuda_driver_device_name(0)
    except CudaDeviceError as error:
        assert "NVIDIA driver" in str(error) or "CUDA device 0" in str(error)
    else:
        assert name.strip()


@needs_cpu_only_onnxruntime
@ignore_missing_provider_warning
def test_real_device_test_without_the_gpu_build_fails_with_a_reason():
    with pytest.raises(
        CudaDeviceError, match=r"could not run on CUDA device 0: onnxruntime could not create its CUDA provider"
    ):
        run_on_cuda_device(0)


# -- options --


def test_default_options_are_strict_and_full_float32():
    settings = CudaSettings.from_options(OnnxRuntimeCudaBackend.option_defaults)
    assert settings == CudaSettings()
    assert settings.provider_options() == {"device_id": "0", "use_tf32": "0"}


def test_options_reach_the_provider():
    settings = CudaSettings.from_options(
        {"device_id": 1, "gpu_mem_limit": 2 << 30, "enable_cuda_graph": True, "allow_cpu_fallback": False}
    )
    assert settings.provider_options() == {
        "device_id": "1",
        "use_tf32": "0",
        "gpu_mem_limit": str(2 << 30),
        "enable_cuda_graph": "1",
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"device_id": -1}, r"cuda option device_id must be an integer >= 0, got -1"),
        ({"device_id": True}, r"cuda option device_id must be an integer >= 0, got True"),
        ({"gpu_mem_limit": "2GB"}, r"cuda option gpu_mem_limit must be an integer >= 0, got '2GB'"),
        ({"enable_cuda_graph": "maybe"}, r"cuda option enable_cuda_graph must be true or false, got 'maybe'"),
        ({"allow_cpu_fallback": 1}, r"cuda option allow_cpu_fallback must be true or false, got 1"),
    ],
)
def test_bad_options_are_refused_before_compiling(override, message):
    # Declared options are checked whether or not this machine has a GPU.
    with pytest.raises(BackendError, match=message):
        OnnxRuntimeCudaBackend().check_options(override)


def test_options_that_exclude_each_other_are_refused():
    options = OnnxRuntimeCudaBackend().resolve_options({"enable_cuda_graph": "yes", "allow_cpu_fallback": True})
    with pytest.raises(BackendError, match=r"exclude each other"):
        CudaSettings.from_options(options)


# -- placement from ORT's profile --


def kernel_event(node: str, op: str, provider: str) -> dict:
    return {"cat": "Node", "name": f"{node}_kernel_time", "args": {"op_name": op, "provider": provider}}


def test_placement_parsed_from_a_synthetic_profile():
    events = [
        {"cat": "Session", "name": "model_loading_uri", "args": {}},
        {"cat": "Node", "name": "shape_fence_before", "args": {"op_name": "Shape"}},
        kernel_event("shape", "Shape", CPU_PROVIDER),
        kernel_event("matmul", "MatMul", CUDA_PROVIDER),
        kernel_event("memcpy", "MemcpyToHost", CUDA_PROVIDER),
        kernel_event("matmul", "MatMul", CUDA_PROVIDER),  # a second run of the same node
        {"cat": "Node", "name": "matmul_fence_after", "args": {}},
    ]
    expected = [
        NodePlacement("shape", "Shape", CPU_PROVIDER),
        NodePlacement("matmul", "MatMul", CUDA_PROVIDER),
        NodePlacement("memcpy", "MemcpyToHost", CUDA_PROVIDER),
    ]
    assert node_placements(events) == expected
    assert node_placements({"traceEvents": events}) == expected
    assert count_by_provider(expected) == {CUDA_PROVIDER: 2, CPU_PROVIDER: 1}
    assert node_placements([]) == []


def test_placement_measured_on_a_real_cpu_session(tiny_bundle, tmp_path):
    model = as_model_input(tiny_bundle)
    placements = profile_placement(lambda prefix: cpu_session(str(model.path), prefix), model.inputs)
    counts = count_by_provider(placements)
    assert list(counts) == [CPU_PROVIDER]
    # ORT folds, fuses and splits nodes, so the count is of its optimised graph, not the file's.
    assert counts[CPU_PROVIDER] > len(model.proto.graph.node) // 2
    assert sum(p.op_type == "MatMul" for p in placements) >= 3


def test_synthetic_feeds_fill_symbolic_dimensions():
    feeds = synthetic_feeds([TensorSpec("ids", "int64", ("batch", 5, None))])
    assert feeds["ids"].shape == (1, 5, 1)
    assert feeds["ids"].dtype == np.int64


def test_cpu_nodes_described_by_operator_type():
    described = describe_cpu_nodes(
        lambda prefix: cpu_session(linear_model_bytes(), prefix), [TensorSpec("x", "float32", ("rows", 3))]
    )
    # ORT may fuse the MatMul and Add into one Gemm first; either way every node is on the CPU.
    assert re.fullmatch(
        r"[12] node\(s\) would run on the CPU \((MatMul|Add|Gemm) x1(, (MatMul|Add) x1)?\): .*", described
    )


def test_cpu_nodes_description_survives_a_failing_session():
    def broken(prefix):
        raise BackendError("no session today")

    assert "which ones could not be found: BackendError: no session today" in describe_cpu_nodes(broken, [])


# -- sessions on this machine's onnxruntime --


@needs_cpu_only_onnxruntime
@ignore_missing_provider_warning
def test_session_without_the_cuda_provider_is_refused_not_swapped():
    with pytest.raises(
        BackendError, match=r"did not create the CUDAExecutionProvider \(the session has CPUExecutionProvider\)"
    ):
        create_session(linear_model_bytes(), CUDA_PROVIDER, {}, strict=False)


@needs_cpu_only_onnxruntime
@ignore_missing_provider_warning
def test_strict_placement_refusal_is_explained(tiny_bundle):
    with pytest.raises(BackendError, match=r"strict placement refused the model: .*allow_cpu_fallback=true"):
        make_cuda_session(as_model_input(tiny_bundle), CudaSettings())


# -- IOBinding, on the CPU provider --


def test_iobinding_runs_match_plain_runs_across_shapes():
    session = cpu_session(linear_model_bytes())
    runner = IoBindingRunner(session, "cpu")
    rng = np.random.default_rng(0)
    first_x = rng.standard_normal((2, 3)).astype(np.float32)
    first = runner.run({"x": first_x})
    for rows in (5, 1):
        x = rng.standard_normal((rows, 3)).astype(np.float32)
        np.testing.assert_allclose(runner.run({"x": x})["y"], x @ LINEAR_W + LINEAR_B, rtol=1e-6)
    # Outputs are copies: later runs did not write into the first one.
    np.testing.assert_allclose(first["y"], first_x @ LINEAR_W + LINEAR_B, rtol=1e-6)


def test_iobinding_with_fixed_addresses_updates_inputs_in_place():
    session = cpu_session(linear_model_bytes())
    runner = IoBindingRunner(session, "cpu", fixed_addresses=True)
    for seed in (1, 2, 3):
        x = np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32)
        np.testing.assert_allclose(runner.run({"x": x})["y"], x @ LINEAR_W + LINEAR_B, rtol=1e-6)
    with pytest.raises(
        InputError, match=r"input 'x' has shape \[2, 3\].*fixes input shapes at the first run's \[4, 3\]"
    ):
        runner.run({"x": np.zeros((2, 3), np.float32)})


def test_iobinding_gives_the_tiny_model_exactly_what_a_plain_run_gives(tiny_bundle):
    session = cpu_session(str(tiny_bundle.model_path))
    feeds, _ = tiny_bundle.golden_sets()[0]
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for fixed in (False, True):
        outputs = IoBindingRunner(session, "cpu", fixed_addresses=fixed).run(feeds)
        assert outputs.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(outputs[name], value, err_msg=f"{name}, fixed_addresses={fixed}")


# -- on a real GPU (skipped without one) --


def _cuda_or_skip():
    backend = get_backend("cuda")
    probe = backend.probe()
    if not probe.available:
        pytest.skip(f"no CUDA device: {probe.reason}")
    return backend


def test_gpu_conformance_with_cpu_fallback_allowed(tiny_bundle):
    from portable_moe.conformance.model_check import check_backend

    result = check_backend(tiny_bundle, _cuda_or_skip(), {"allow_cpu_fallback": True})
    assert result.passed, result.reason
    assert result.placement.get(CUDA_PROVIDER, 0) > result.placement.get(CPU_PROVIDER, 0)


def test_gpu_strict_placement_runs_all_on_cuda_or_names_the_cpu_nodes(tiny_bundle):
    backend = _cuda_or_skip()
    try:
        compiled = backend.compile(tiny_bundle)
    except BackendError as error:
        assert "node(s) would run on the CPU (" in str(error)
        return
    assert set(compiled.placement()) == {CUDA_PROVIDER}


def test_gpu_cuda_graph_replays_at_fixed_addresses(tiny_bundle):
    backend = _cuda_or_skip()
    try:
        compiled = backend.compile(tiny_bundle, {"enable_cuda_graph": True})
    except BackendError as error:
        pytest.skip(f"the tiny model cannot be captured whole: {error}")
    feeds, expected = tiny_bundle.golden_sets()[0]
    for _ in range(3):  # warm-up, capture, replay
        outputs = compiled.run(feeds)
        np.testing.assert_allclose(outputs["logits"], expected["logits"], atol=1e-4, rtol=1e-3)
