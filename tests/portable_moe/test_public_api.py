"""The public surface is curated: this list changes only on purpose."""

import subprocess
import sys

import portable_moe

PUBLIC = {
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
    "export",
    "get_backend",
    "get_preset",
    "list_backends",
    "load_bundle",
    "register_backend",
    "routing_agreement",
    "select_backend",
    "unregister_backend",
    "FallbackResult",
    "compile_with_fallback",
    "run_with_fallback",
}


def test_public_surface_is_pinned():
    assert set(portable_moe.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(portable_moe, name), name


def test_importing_the_package_imports_no_torch_and_no_backend():
    code = (
        "import sys, portable_moe, exporters; "
        "loaded = [m for m in ('torch', 'backends.onnxruntime_cpu', 'backends.onnx_reference', 'onnxruntime') "
        "if m in sys.modules]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_error_is_a_portable_moe_error():
    for name in ("BackendError", "BackendUnavailableError", "BundleError", "ConfigError", "ExportError", "InputError"):
        assert issubclass(getattr(portable_moe, name), portable_moe.PortableMoEError)
    assert portable_moe.ConformanceError.exit_code == 1 and portable_moe.InputError.exit_code == 2
