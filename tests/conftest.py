"""Shared fixtures. Nothing here imports torch or a backend module at import time."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory):
    """The tiny preset exported once per test session (dense lowering, seed 0)."""
    pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")
    from exporters import export_bundle

    return export_bundle(tmp_path_factory.mktemp("bundles") / "tiny", "tiny", seed=0)


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
