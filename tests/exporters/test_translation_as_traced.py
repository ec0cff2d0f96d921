"""Translating the graph torch.export traced, without torch.onnx's second trace (the decompositions)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch")
ort = pytest.importorskip("onnxruntime")

from torch.onnx._internal.exporter import _fx_passes  # noqa: E402

from exporters.lowerings import LOWERINGS  # noqa: E402
from exporters.torch_onnx_shortcuts import _promotes_types, quiet_exporter, translation_as_traced  # noqa: E402


class _Conversions(torch.nn.Module):
    """A linear layer and a softmax between dtype conversions of every form ``aten.to`` takes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = torch.softmax(self.linear(x.to(torch.float32)), dim=-1)
        return hidden.to(torch.float16), hidden.to(like), (hidden * 10).to("cpu", torch.int32), hidden.to("cpu")


class _Mutating(torch.nn.Module):
    """Writes into its input: only torch.onnx's decompositions make that functional."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1


class _FilledBySlices(torch.nn.Module):
    """Builds a tensor as DeepSeek-V3's attention in transformers builds its keys: ``new_empty``, then a
    ``copy_`` into each slice. ``split`` moves the boundary between the slices; ``peek`` reads the
    tensor between the two writes."""

    def __init__(self, split: int = 3, peek: bool = False) -> None:
        super().__init__()
        self.split, self.peek = split, peek

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        filled = x.new_empty(x.shape[0], 5)
        filled[..., :3].copy_(x * 2)
        early = filled[..., :3].sum() if self.peek else 0
        filled[..., self.split :].copy_(y.expand(-1, 5 - self.split) + 1)
        return filled * 3 + early


class _MixedDtypes(torch.nn.Module):
    """Ops that mix dtypes, each needing a cast from torch.onnx's type promotion pass (``which`` picks one)."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.which == "tensors":
            return x + counts  # float32 + int64
        if self.which == "number":
            return torch.where(x == 0, x, x * 2)  # a float32 tensor against the int 0
        return (x > 0).sum(dim=-1, keepdim=True) + counts  # a sum of bools is int64


class _OneDtype(torch.nn.Module):
    """Every op in float32, numbers included: no cast to insert."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return torch.where(x == 0.0, x, torch.softmax(x * 2.0, dim=-1)) - 1.0 + counts.float()


def _program(module: torch.nn.Module) -> torch.export.ExportedProgram:
    inputs = (torch.randn(3, 4), torch.arange(12).reshape(3, 4) % 5)
    return torch.export.export(
        module, inputs, dynamic_shapes=({0: torch.export.Dim("batch")}, {0: torch.export.Dim("batch")})
    )


@pytest.fixture
def promotions(monkeypatch):
    """Count the graphs torch.onnx's type promotion pass runs on."""
    counted = []
    promote = _fx_passes.insert_type_promotion_nodes

    def counting(graph_module):
        counted.append(graph_module)
        return promote(graph_module)

    monkeypatch.setattr(_fx_passes, "insert_type_promotion_nodes", counting)
    return counted


@pytest.fixture
def decompositions(monkeypatch):
    """Count the graphs that go through torch.onnx's decompositions."""
    counted = []
    decompose = _fx_passes.decompose_with_registry

    def counting(program, registry):
        counted.append(program)
        return decompose(program, registry)

    monkeypatch.setattr(_fx_passes, "decompose_with_registry", counting)
    return counted


class _RoutedExperts(torch.nn.Module):
    """One lowering's routed experts: 8 experts, top-2, hidden 16, width 8."""

    def __init__(self, lowering: str) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.lowering = LOWERINGS[lowering]
        # capacity_factor "auto" is resolved from the golden run's loads by the exporter; 8 slots here.
        self.routed = self.lowering.routed_experts({"capacity_factor": 4.0} if lowering == "capacity" else {})
        self.w1, self.w3 = (torch.nn.Parameter(torch.randn(8, 8, 16, generator=generator) / 4) for _ in range(2))
        self.w2 = torch.nn.Parameter(torch.randn(8, 16, 8, generator=generator) / 4)

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        out = self.routed(hidden, expert_ids, expert_weights, self.w1, self.w3, self.w2)
        return out[0] if isinstance(out, tuple) else out


def _exported(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path) -> list[np.ndarray]:
    batch = torch.export.Dim("batch", min=1, max=64)
    lowering = getattr(module, "lowering", None)
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            inputs,
            dynamo=True,
            dynamic_shapes=tuple({0: batch} for _ in inputs),
            opset_version=20,
            custom_translation_table=getattr(lowering.load(), "CUSTOM_TRANSLATION_TABLE", None) if lowering else None,
            verbose=False,
        )
    if lowering is not None and hasattr(lowering.load(), "after_export"):
        lowering.load().after_export(program)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {argument.name: tensor.numpy() for argument, tensor in zip(session.get_inputs(), inputs)})


def test_a_graph_of_translatable_ops_skips_the_decompositions_and_computes_the_same(decompositions, tmp_path):
    torch.manual_seed(0)
    module = _Conversions().eval()
    inputs = (torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64))
    with torch.no_grad():
        expected = [tensor.numpy() for tensor in module(*inputs)]
    decomposed = _exported(module, inputs, tmp_path / "decomposed.onnx")
    assert len(decompositions) == 1
    with translation_as_traced():
        as_traced = _exported(module, inputs, tmp_path / "as-traced.onnx")
    assert len(decompositions) == 1, "translated as traced: no second trace"
    assert [value.dtype for value in as_traced] == [value.dtype for value in expected]  # float16, 64, int32, 32
    for ours, theirs, truth in zip(as_traced, decomposed, expected):
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_allclose(ours, truth, atol=1e-3)
    assert _fx_passes.decompose_with_registry.__name__ == "counting", "the block puts back what it replaced"


def test_a_graph_that_mutates_goes_through_the_decompositions(decompositions, tmp_path):
    inputs = (torch.arange(6, dtype=torch.float32).reshape(3, 2),)
    with translation_as_traced():
        (result,) = _exported(_Mutating(), (inputs[0].clone(),), tmp_path / "mutating.onnx")
    assert len(decompositions) == 1
    np.testing.assert_array_equal(result, inputs[0].numpy() * 2 + 1)


@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
def test_every_lowering_translates_as_traced(decompositions, tmp_path, lowering):
    """A lowering that brought in an op torchlib lacks (argsort, one_hot) would cost every export a second trace."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 16, generator=generator)
    expert_ids = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(5)])
    expert_weights = torch.rand(5, 2, generator=generator)
    module = _RoutedExperts(lowering)
    with torch.no_grad():
        expected = module(hidden, expert_ids, expert_weights).numpy()
    with translation_as_traced():
        (result,) = _exported(module, (hidden, expert_ids, expert_weights), tmp_path / "experts.onnx")
    assert decompositions == []
    np.testing.assert_allclose(result, expected, atol=1e-5)


def test_a_tensor_filled_slice_by_slice_is_translated_as_a_concatenation(decompositions, tmp_path):
    inputs = (torch.randn(4, 3), torch.randn(4, 1))
    expected = _FilledBySlices()(*inputs).numpy()
    with translation_as_traced():
        (result,) = _exported(_FilledBySlices(), inputs, tmp_path / "filled.onnx")
    assert decompositions == []
    np.testing.assert_allclose(result, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("module", "why"),
    [(_FilledBySlices(split=2), "the slices overlap"), (_FilledBySlices(peek=True), "read between the writes")],
    ids=["overlap", "peek"],
)
def test_slice_writes_that_are_not_a_plain_concatenation_go_through_the_decompositions(
    decompositions, tmp_path, module, why
):
    inputs = (torch.randn(4, 3), torch.randn(4, 1))
    with torch.no_grad():
        expected = module(*inputs).numpy()
    with translation_as_traced():
        (result,) = _exported(module, inputs, tmp_path / "filled.onnx")
    assert len(decompositions) == 1, why
    np.testing.assert_allclose(result, expected, atol=1e-5)


@pytest.mark.parametrize("which", ["tensors", "number", "sum of bools"])
def test_ops_that_mix_dtypes_are_seen_as_the_type_promotion_pass_sees_them(which):
    from torch.onnx._internal.exporter._fx_passes import insert_type_promotion_nodes

    program = _program(_MixedDtypes(which))
    before = str(program.graph_module.graph)
    assert _promotes_types(program.graph_module)
    insert_type_promotion_nodes(program.graph_module)
    assert str(program.graph_module.graph) != before, "the pass did insert a cast"


def test_a_graph_of_one_dtype_is_seen_to_need_no_promotion_and_the_pass_would_change_nothing():
    from torch.onnx._internal.exporter._fx_passes import insert_type_promotion_nodes

    program = _program(_OneDtype())
    before = str(program.graph_module.graph)
    assert not _promotes_types(program.graph_module)
    insert_type_promotion_nodes(program.graph_module)
    assert str(program.graph_module.graph) == before


@pytest.mark.parametrize(
    ("module", "promoted"), [(_OneDtype(), 0), (_MixedDtypes("tensors"), 1), (_MixedDtypes("number"), 1)]
)
def test_the_type_promotion_pass_runs_only_where_it_casts_and_the_export_computes_the_same(
    promotions, tmp_path, module, promoted
):
    inputs = (torch.tensor([[0.0, 1.5, -2.0, 3.0]]).repeat(3, 1), torch.arange(12).reshape(3, 4) % 5)
    with torch.no_grad():
        expected = module(*inputs).numpy()
    with translation_as_traced():
        (result,) = _exported(module, inputs, tmp_path / "promoted.onnx")
    assert len(promotions) == promoted
    assert _fx_passes.insert_type_promotion_nodes.__name__ == "counting", "the block puts back what it replaced"
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    assert result.dtype == expected.dtype


@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
def test_the_reference_model_needs_no_type_promotion_pass_with_any_lowering(lowering):
    """A Python int in float arithmetic, or a sum of booleans, would cost every export a second
    fake-tensor run of the graph (torch.onnx's type promotion pass)."""
    import dataclasses

    from exporters.reference_model import build_model, golden_inputs
    from portable_moe import get_preset

    config = dataclasses.replace(get_preset("tiny"), num_hidden_layers=2)
    model = build_model(config)
    low = LOWERINGS[lowering]
    model.set_routed_experts(low.routed_experts({"capacity_factor": 4.0} if lowering == "capacity" else {}))
    ids = golden_inputs(config)["input_ids"]
    program = torch.export.export(
        model, (ids,), dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    )
    assert not _promotes_types(program.graph_module)
