"""Failing devices: explicit fallback that reports what ran and why, and isolation from crashes and hangs.

Faults come from fake backends: in-process ones (registry.register_backend) for fallback, and a
vendor package on sys.path (a dist-info with entry points, as an installed adapter would be) for
isolation, because the worker process discovers backends the way a fresh program does. One test
uses npu-sim's own fault injection when that backend is registered.
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest

from portable_moe import BackendError, InputError, load_bundle, registry
from portable_moe.backend import ProbeResult
from portable_moe.run.fallback import (
    Attempt,
    FallbackError,
    compile_with_fallback,
    run_with_fallback,
    spread_options,
)
from portable_moe.run.isolated import run_isolated
from portable_moe.testing.hostile import write_toy_bundle


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return load_bundle(write_toy_bundle(tmp_path_factory.mktemp("devices") / "toy"))


@pytest.fixture(scope="module")
def feeds(toy):
    return toy.golden_sets()[0][0]


@pytest.fixture(scope="module")
def cpu_outputs(toy, feeds):
    return registry.get_backend("cpu").compile(toy).run(feeds)


# ---------------------------------------------------------------------------------------------
# In-process fakes


def _fake(kind: str):
    from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, OrtCompiledModel

    class FailingRun(OrtCompiledModel):
        def _run(self, feeds):
            raise RuntimeError("simulated ECC error on the device")

    class Fake(OnnxRuntimeCpuBackend):
        name = kind
        vendor = "Fault Injection Inc."

        def probe(self):
            if kind == "absent-device":
                return ProbeResult(False, "no device found: install the vendor driver")
            return super().probe()

        def _compile(self, model, options):
            if kind == "fails-compile":
                raise RuntimeError("simulated driver fault: device lost during graph build")
            compiled = super()._compile(model, options)
            return FailingRun(self, model, compiled.session) if kind == "fails-run" else compiled

    return Fake()


FAKES = ("absent-device", "fails-compile", "fails-run")


@pytest.fixture
def fakes():
    for kind in FAKES:
        registry.register_backend(kind, lambda kind=kind: _fake(kind))
    yield
    for kind in FAKES:
        registry.unregister_backend(kind)


def test_a_compile_failure_falls_back_and_says_why(fakes, toy, feeds, cpu_outputs):
    result = run_with_fallback(toy, "fails-compile,cpu", feeds)
    assert result.backend_name == "cpu" and result.fell_back
    [failed, ran] = result.attempts
    assert failed.backend == "fails-compile" and failed.status == "compile-failed"
    assert "RuntimeError: simulated driver fault: device lost during graph build" in failed.reason
    assert ran == Attempt("cpu", "ran", "")
    assert result.placement == {"CPUExecutionProvider": 4}
    for name, value in cpu_outputs.items():
        np.testing.assert_array_equal(result.outputs[name], value)
    assert result.describe().startswith("ran on cpu after falling back (fails-compile compile-failed: backend")


def test_a_run_failure_falls_back_and_says_why(fakes, toy, feeds):
    result = run_with_fallback(toy, ["fails-run", "cpu"], feeds)
    assert [(a.backend, a.status) for a in result.attempts] == [("fails-run", "run-failed"), ("cpu", "ran")]
    assert "backend 'fails-run' failed while running: RuntimeError: simulated ECC error" in result.attempts[0].reason


def test_unavailable_backends_are_reported_not_dropped(fakes, toy, feeds):
    result = run_with_fallback(toy, "absent-device,fails-compile,cpu", feeds)
    assert [a.status for a in result.attempts] == ["unavailable", "compile-failed", "ran"]
    assert result.attempts[0].reason == "no device found: install the vendor driver"


def test_when_every_backend_fails_the_error_lists_every_reason(fakes, toy, feeds):
    with pytest.raises(
        FallbackError,
        match=r"no backend in 'absent-device,fails-run' could run the model \(absent-device unavailable: no device "
        r"found.*; fails-run run-failed: .*simulated ECC error",
    ) as caught:
        run_with_fallback(toy, "absent-device,fails-run", feeds)
    assert [a.status for a in caught.value.attempts] == ["unavailable", "run-failed"]
    assert isinstance(caught.value, BackendError)


def test_bad_input_stops_at_once_instead_of_falling_back(fakes, toy, feeds):
    with pytest.raises(InputError, match="outside the vocabulary"):
        run_with_fallback(toy, "fails-run,cpu", {"input_ids": feeds["input_ids"] + 1000})


def test_compile_time_fallback(fakes, toy, feeds, cpu_outputs):
    chosen = compile_with_fallback(toy, "absent-device,fails-compile,cpu")
    assert chosen.backend_name == "cpu"
    assert [a.status for a in chosen.attempts] == ["unavailable", "compile-failed", "compiled"]
    np.testing.assert_array_equal(chosen.compiled.run(feeds)["logits"], cpu_outputs["logits"])


def test_options_are_given_per_backend(fakes, toy, feeds):
    assert run_with_fallback(toy, "cpu", feeds, {"cpu": {"threads": 1}}).backend_name == "cpu"
    with pytest.raises(BackendError, match=r"options are given per backend.*got options for 'threads'"):
        run_with_fallback(toy, "cpu", feeds, {"threads": 1})
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        run_with_fallback(toy, "tpu,cpu", feeds)


def test_one_set_of_options_is_spread_to_the_backends_that_declare_them(fakes):
    spread = spread_options("fails-run,reference", {"threads": 2, "nan_policy": "pass"})
    assert spread == {"fails-run": {"threads": 2, "nan_policy": "pass"}, "reference": {"nan_policy": "pass"}}
    with pytest.raises(BackendError, match=r"no backend in fails-run, reference has option\(s\) warp \(fails-run: "):
        spread_options("fails-run,reference", {"warp": 9})


@pytest.mark.skipif("npu-sim" not in registry.backend_names(), reason="the npu-sim backend is not installed")
@pytest.mark.parametrize(
    ("options", "status"),
    [({"fail_on_compile": True}, "compile-failed"), ({"fail_on_run": 1}, "run-failed")],
    ids=["fail_on_compile", "fail_on_run"],
)
def test_npu_sim_fault_injection_falls_back_to_cpu(toy, feeds, options, status):
    probe = registry.get_backend("npu-sim").safe_probe()
    if not probe.available:
        pytest.skip(f"npu-sim is unavailable here: {probe.reason}")
    result = run_with_fallback(toy, "npu-sim,cpu", feeds, {"npu-sim": options})
    assert result.backend_name == "cpu"
    assert [(a.backend, a.status) for a in result.attempts] == [("npu-sim", status), ("cpu", "ran")]


# ---------------------------------------------------------------------------------------------
# Crashes and hangs, in a worker process

FAULTY_VENDOR = """
import ctypes
import signal
import time

from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, OrtCompiledModel


class SegfaultingRun(OrtCompiledModel):
    def _run(self, feeds):
        ctypes.string_at(0)  # reads address 0: a real segmentation fault in native code


class HangingRun(OrtCompiledModel):
    def _run(self, feeds):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # deaf to a polite stop: must be killed
        time.sleep(3600)


class SegfaultAtRun(OnnxRuntimeCpuBackend):
    def _compile(self, model, options):
        return SegfaultingRun(self, model, super()._compile(model, options).session)


class HangAtRun(OnnxRuntimeCpuBackend):
    def _compile(self, model, options):
        return HangingRun(self, model, super()._compile(model, options).session)


class SegfaultAtCompile(OnnxRuntimeCpuBackend):
    def _compile(self, model, options):
        ctypes.string_at(0)
"""


@pytest.fixture
def faulty_vendor(tmp_path, monkeypatch, write_vendor_package):
    backends = {
        "segfault-at-run": "faulty_vendor:SegfaultAtRun",
        "hang-at-run": "faulty_vendor:HangAtRun",
        "segfault-at-compile": "faulty_vendor:SegfaultAtCompile",
    }
    write_vendor_package(tmp_path, "faulty_vendor", FAULTY_VENDOR, backends)
    monkeypatch.syspath_prepend(str(tmp_path))  # the worker process is given the same sys.path
    registry.refresh()
    yield
    monkeypatch.undo()
    registry.refresh()


def test_isolated_run_gives_the_in_process_outputs(toy, feeds, cpu_outputs):
    result = run_isolated(toy, "cpu", feeds, timeout=60)
    assert result.placement == {"CPUExecutionProvider": 4}
    for name, value in cpu_outputs.items():
        np.testing.assert_array_equal(result.outputs[name], value)


def test_a_segfault_in_the_backend_is_a_backend_error_naming_the_signal(faulty_vendor, toy, feeds):
    with pytest.raises(
        BackendError,
        match=r"backend 'segfault-at-run' crashed during run: its worker process was killed by SIGSEGV "
        r"\(segmentation fault\)",
    ):
        run_isolated(toy, "segfault-at-run", feeds, timeout=60)


def test_isolated_fallback_survives_crashes_and_hangs(faulty_vendor, toy, feeds, cpu_outputs):
    started = time.monotonic()
    result = run_with_fallback(
        toy, "segfault-at-compile,segfault-at-run,hang-at-run,cpu", feeds, isolated=True, timeout=2.0
    )
    assert result.backend_name == "cpu"
    assert [(a.backend, a.status) for a in result.attempts] == [
        ("segfault-at-compile", "crashed"),
        ("segfault-at-run", "crashed"),
        ("hang-at-run", "timed-out"),
        ("cpu", "ran"),
    ]
    assert "crashed during compile" in result.attempts[0].reason
    assert "did not finish compile and run within 2 s (stuck in run); its worker process was stopped" in (
        result.attempts[2].reason
    )
    np.testing.assert_array_equal(result.outputs["logits"], cpu_outputs["logits"])
    assert time.monotonic() - started < 60
    assert multiprocessing.active_children() == []  # every worker is gone, the SIGTERM-deaf one included


def test_isolated_input_errors_fail_fast_without_a_worker(toy, feeds, monkeypatch):
    import portable_moe.run.isolated as isolated

    monkeypatch.setattr(isolated, "execute", lambda *args, **kwargs: pytest.fail("started a worker for bad input"))
    with pytest.raises(InputError, match="outside the vocabulary"):
        run_isolated(toy, "cpu", {"input_ids": feeds["input_ids"] - 100})


def test_a_backend_registered_with_a_lambda_cannot_be_isolated(toy, feeds):
    registry.register_backend("local-only", lambda: _fake("fails-run"))
    try:
        with pytest.raises(
            BackendError, match="'local-only' was registered in this process with a factory that cannot"
        ):
            run_isolated(toy, "local-only", feeds)
    finally:
        registry.unregister_backend("local-only")
