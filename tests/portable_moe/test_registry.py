"""Discovery through entry points, exactly as a vendor's installed package is found."""

import pytest

from portable_moe import BackendError, BackendUnavailableError, registry

VENDOR_MODULE = """
from portable_moe.backend import Backend, Capabilities, ProbeResult
from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend


class ReadyNpu(OnnxRuntimeCpuBackend):
    name = "ready-npu"
    vendor = "Example Vendor"
    description = "an installed third-party adapter"


class MissingDriverNpu(Backend):
    name = "missing-driver-npu"
    vendor = "Example Vendor"
    description = "an adapter whose device is absent"

    def probe(self):
        return ProbeResult(False, "no device found: install the vendor driver")

    @property
    def capabilities(self):
        return Capabilities()

    def _compile(self, model, options):
        raise AssertionError("never reached: compile checks probe first")


class ExplodingProbe(MissingDriverNpu):
    def probe(self):
        raise RuntimeError("driver library crashed")
"""


@pytest.fixture
def vendor_package(tmp_path, monkeypatch, write_vendor_package):
    """Install (on sys.path) a distribution that registers adapters through the entry-point group."""
    backends = {
        "ready-npu": "example_vendor:ReadyNpu",
        "missing-driver-npu": "example_vendor:MissingDriverNpu",
        "exploding-npu": "example_vendor:ExplodingProbe",
        "broken-import-npu": "example_vendor_not_installed:Adapter",
        "not-a-backend": "builtins:dict",
    }
    write_vendor_package(tmp_path, "example_vendor", VENDOR_MODULE, backends)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield
    monkeypatch.undo()
    registry.refresh()


def test_built_in_backends_are_found_through_entry_points():
    statuses = {status.name: status for status in registry.list_backends()}
    assert {"cpu", "reference"} <= set(statuses)
    assert statuses["cpu"].source.startswith("entry point cpu = backends.")
    assert statuses["cpu"].available and statuses["reference"].available


def test_third_party_package_is_discovered(vendor_package):
    backend = registry.get_backend("ready-npu")
    assert backend.vendor == "Example Vendor"
    assert backend.safe_probe().available


def test_unavailable_and_broken_backends_stay_listed_with_their_reason(vendor_package):
    statuses = {status.name: status for status in registry.list_backends()}
    assert not statuses["missing-driver-npu"].available
    assert statuses["missing-driver-npu"].reason == "no device found: install the vendor driver"
    assert "probe failed: RuntimeError: driver library crashed" in statuses["exploding-npu"].reason
    assert "failed to import: ModuleNotFoundError" in statuses["broken-import-npu"].reason
    assert "did not produce a portable_moe Backend" in statuses["not-a-backend"].reason


def test_compiling_on_an_unavailable_backend_says_why(vendor_package):
    with pytest.raises(BackendUnavailableError, match="'missing-driver-npu' is unavailable: no device found"):
        registry.get_backend("missing-driver-npu").compile(b"")


def test_unknown_name_lists_the_known_names():
    with pytest.raises(BackendError, match=r"unknown backend 'tpu'; registered backends: .*cpu.*reference"):
        registry.get_backend("tpu")


def test_fallback_list_picks_the_first_available_and_reports_what_was_skipped(vendor_package):
    backend, skipped = registry.select_backend("missing-driver-npu,exploding-npu,ready-npu,cpu")
    assert backend.name == "ready-npu"
    assert [name for name, _ in skipped] == ["missing-driver-npu", "exploding-npu"]
    assert "install the vendor driver" in skipped[0][1]


def test_fallback_list_with_nothing_available_gives_every_reason(vendor_package):
    with pytest.raises(
        BackendUnavailableError, match="missing-driver-npu: no device found.*exploding-npu: probe failed"
    ):
        registry.select_backend("missing-driver-npu,exploding-npu")


@pytest.mark.parametrize("spec", ["", "cpu,", ",cpu", " , "])
def test_malformed_backend_list(spec):
    with pytest.raises(BackendError, match="bad backend list"):
        registry.parse_backend_list(spec)


def test_auto_lowering_follows_the_backend_preference():
    preferred = registry.get_backend("cpu").capabilities.preferred_lowering
    assert registry.resolve_lowering("auto", "cpu") == preferred
    assert registry.resolve_lowering("dense", "cpu") == "dense"


def test_discovery_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    registry.refresh()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: id(registry.get_backend("cpu")), range(32)))
    assert len(set(results)) == 1
