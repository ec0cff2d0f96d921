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
