"""torch.onnx's op registry, built once per process without parsing torchlib's sources, copied per export."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch")

from torch.onnx._internal.exporter import _registration  # noqa: E402

from exporters import torch_onnx_shortcuts as shortcuts  # noqa: E402

_BUILD = _registration.ONNXRegistry.__dict__["from_torchlib"]


@pytest.fixture
def no_registry_yet(monkeypatch):
    """The process as if no export had built a registry yet."""
    monkeypatch.setattr(shortcuts, "_OP_REGISTRIES", {})


def _torch_onnx_registry(opset: int):
    return _BUILD.__get__(None, _registration.ONNXRegistry)(opset)


def test_the_registry_built_without_parsing_is_the_one_torch_onnx_builds(no_registry_yet):
    reference = _torch_onnx_registry(20)
    with shortcuts.reused_op_registry():
        built = _registration.ONNXRegistry.from_torchlib(20)
    assert built.opset_version == reference.opset_version == 20
    assert len(built.functions) > 400
    assert list(built.functions) == list(reference.functions)
    # The same torchlib functions, in the same order (the dispatcher tries them in order), with the same flags.
    assert built.functions == reference.functions
    assert built.functions[torch.ops.aten.sort.default.name()] == reference.functions["aten::sort"]


def test_the_build_leaves_torch_onnx_as_it_was_even_when_it_fails(no_registry_yet, monkeypatch):
    apis = _registration.onnxscript_apis

    def failing(cls, opset_version):
        assert _registration.onnxscript_apis is not apis, "the build reads the functions from the shortcut"
        raise RuntimeError("the build failed")

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(failing))
    with shortcuts.reused_op_registry(), pytest.raises(RuntimeError, match="the build failed"):
        _registration.ONNXRegistry.from_torchlib(20)
    assert _registration.onnxscript_apis is apis
    assert _registration.ONNXRegistry.__dict__["from_torchlib"].__func__ is failing
    assert shortcuts._OP_REGISTRIES == {}


def test_each_export_gets_a_copy_its_own_translations_do_not_reach_the_next(no_registry_yet):
    def translation(x):
        return x

    with shortcuts.reused_op_registry():
        first = _registration.ONNXRegistry.from_torchlib(20)
        first.register_op(torch.ops.aten.sort.default, translation)
        second = _registration.ONNXRegistry.from_torchlib(20)
    assert [meta.onnx_function for meta in first.functions["aten::sort"]][0] is translation
    assert translation not in [meta.onnx_function for meta in second.functions["aten::sort"]]
    assert list(shortcuts._OP_REGISTRIES) == [20]
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is _BUILD
