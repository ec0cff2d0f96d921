"""Shared fixtures. Nothing here imports torch or a backend module at import time."""

from __future__ import annotations

import hashlib
import time

import pytest

# Every model export of this test session: (config name, lowering, weights fingerprint) -> seconds
# per export. A bundle is exported once per session (through ``bundle_factory``); the summary at the
# end lists the exports and the session fails if one was repeated.
_EXPORTS: dict[tuple[str, str, str], list[float]] = {}


@pytest.fixture(scope="session", autouse=True)
def _shared_trace_cache(tmp_path_factory):
    """One on-disk trace cache for the session, this process and the exports it starts in subprocesses
    (CLI, demo, examples): each model structure is traced once per session (see exporters.trace_cache)."""
    from exporters.trace_cache import ENVIRONMENT_VARIABLE

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENVIRONMENT_VARIABLE, str(tmp_path_factory.mktemp("traces")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _count_exports():
    """Record every call of the exporter (without importing torch: the wrapper imports nothing)."""
    import exporters.torch_export as torch_export

    export = torch_export.export_model_to_onnx

    def counted(model, path, **options):
        start = time.perf_counter()
        export(model, path, **options)
        lowering = options.get("lowering", "dense")
        key = (model.config.name, getattr(lowering, "name", lowering), _fingerprint(model))
        _EXPORTS.setdefault(key, []).append(time.perf_counter() - start)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_export, "export_model_to_onnx", counted)
        yield


def _fingerprint(model) -> str:
    """A short hash of the model's weights: two exports of equal weights are the same bundle."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def repeated_exports() -> dict[tuple[str, str, str], list[float]]:
    """The exports this session made more than once."""
    return {key: seconds for key, seconds in _EXPORTS.items() if len(seconds) > 1}


def pytest_terminal_summary(terminalreporter):
    if not _EXPORTS:
        return
    total = sum(sum(seconds) for seconds in _EXPORTS.values())
    count = sum(len(seconds) for seconds in _EXPORTS.values())
    from exporters.trace_cache import trace_cache_statistics

    statistics = trace_cache_statistics()
    terminalreporter.section("portable-moe exports")
    terminalreporter.write_line(
        f"{count} model export(s) in this process, {total:.1f} s in all; layer graphs traced "
        f"{statistics['traced']} time(s), reused from the trace cache {statistics['reused']} time(s):"
    )
    for (preset, lowering, weights), seconds in sorted(_EXPORTS.items()):
        times = ", ".join(f"{value:.1f} s" for value in seconds)
        terminalreporter.write_line(f"  {preset} / {lowering} / weights {weights}: {times}")
    for key in repeated_exports():
        terminalreporter.write_line(f"EXPORTED MORE THAN ONCE: {key}; get bundles from bundle_factory")


def pytest_sessionfinish(session):
    if repeated_exports() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """``bundle_factory(preset, lowering="dense", seed=0, **export_options)``: an exported bundle, shared.

    ``preset`` is a preset name or a ModelConfig; ``export_options`` go to ``export_bundle``.

    Each distinct request is exported once per test session (an export that fails raises the same
    error again on every request); tests must not change the returned bundle (copy it first, see
    ``tiny_bundle_copy``).
    """
    pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")
    from exporters import export_bundle

    made: dict[str, object] = {}

    def factory(preset="tiny", lowering: str = "dense", seed: int = 0, **options):
        key = repr((preset, lowering, seed, sorted(options.items())))
        if key not in made:
            name = preset if isinstance(preset, str) else preset.name
            directory = tmp_path_factory.mktemp("bundles") / f"{name}-{lowering}-{seed}"
            try:
                made[key] = export_bundle(directory, preset, seed, moe_lowering=lowering, **options)
            except Exception as error:
                made[key] = error
        if isinstance(made[key], Exception):
            raise made[key]
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_bundle(bundle_factory):
    """The tiny preset (dense lowering, seed 0), exported once per test session."""
    return bundle_factory("tiny", "dense", 0)


@pytest.fixture
def tiny_bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle that a test may damage."""
    import shutil

    from portable_moe import load_bundle

    target = tmp_path / "tiny"
    shutil.copytree(tiny_bundle.path, target)
    return load_bundle(target)


def _write_vendor_package(directory, module_name: str, source: str, backends: dict[str, str]):
    """Write a module and a dist-info registering ``backends`` (name -> "module:Class") in ``directory``.

    Put ``directory`` on sys.path (or PYTHONPATH, for subprocesses) and the registry finds the
    backends through entry points, exactly as it finds an installed vendor package.
    """
    (directory / f"{module_name}.py").write_text(source)
    dist_info = directory / f"{module_name}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module_name.replace('_', '-')}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in backends.items())
    (dist_info / "entry_points.txt").write_text(f"[portable_moe.backends]\n{lines}")
    return directory


@pytest.fixture(scope="session")
def write_vendor_package():
    """A function that writes a fake vendor package (module + entry points) into a directory."""
    return _write_vendor_package
