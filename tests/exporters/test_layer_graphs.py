"""Layer-wise export: the reference model as a LayeredModel, and the full graph stamped from one export per kind."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'portable-moe[export]')")

from exporters import trace_cache  # noqa: E402
from exporters.layer_graphs import export_layered  # noqa: E402
from exporters.lowerings import get_lowering  # noqa: E402
from exporters.reference_model import build_model, golden_inputs  # noqa: E402
from exporters.torch_export import export_model_to_onnx  # noqa: E402
from portable_moe import ExportError, compare_outputs, get_backend, get_preset  # noqa: E402

# Four layers (one dense, three MoE of one kind): the weights of the kind's one export are swapped per layer.
FOUR_LAYERS = dataclasses.replace(get_preset("tiny"), name="tiny-4-layers", num_hidden_layers=4)


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def test_prologue_layers_and_head_compose_to_forward_exactly():
    model = build_model(FOUR_LAYERS, seed=3)
    ids = golden_inputs(FOUR_LAYERS, seed=3)["input_ids"]
    with torch.no_grad():
        logits, routing = model(ids)
        hidden, *shared = model.prologue(ids)
        composed_routing = []
        for layer in model.layer_modules():
            hidden, expert_ids, dropped = layer(hidden, *shared)
            assert dropped is None
            if expert_ids is not None:
                composed_routing.append(expert_ids)
        composed_logits = model.head(hidden)
    assert torch.equal(logits, composed_logits)
    assert all(torch.equal(a, b) for a, b in zip(routing, composed_routing))
    assert len(composed_routing) == len(FOUR_LAYERS.moe_layer_indices) == 3


def test_layer_kinds_tell_dense_from_moe_and_follow_the_lowering():
    model = build_model(FOUR_LAYERS)
    kinds = [model.layer_kind(index) for index in range(4)]
    assert kinds[0] == ("dense",) and kinds[1] == kinds[2] == kinds[3] != kinds[0]
    model.layers[3].mlp.routed_experts = get_lowering("sparse").routed_experts({})
    assert model.layer_kind(3) != model.layer_kind(1)


@pytest.fixture(scope="module")
def four_layer_bundle(bundle_factory):
    """Four layers with the weights forced into external data (threshold 1 KiB)."""
    return bundle_factory(FOUR_LAYERS, "sparse", 0, external_data_threshold_bytes=1024)


def test_four_layers_export_with_weights_in_external_data(four_layer_bundle):
    import onnx

    files = set(four_layer_bundle.manifest["files"])
    assert {"model.onnx", "model.onnx.data"} <= files
    proto = onnx.load(str(four_layer_bundle.model_path), load_external_data=False)
    external = [tensor.name for tensor in proto.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL]
    assert "layers.3.mlp.w1" in external and "embed_tokens.weight" in external
    assert four_layer_bundle.routing_outputs == {f"expert_ids_layer{index}": index for index in (1, 2, 3)}


def test_each_layer_of_a_kind_runs_its_own_weights(four_layer_bundle):
    """Three MoE layers from one exported graph: a swapped or shared weight would break these."""
    reference = build_model(FOUR_LAYERS, seed=0)
    compiled = get_backend("cpu").compile(four_layer_bundle)
    for batch, seq in ((1, 1), (3, 7), (2, 40)):
        ids = _ids(batch, seq)
        with torch.no_grad():
            logits, routing = reference(ids)
        expected = {
            "logits": logits.numpy(),
            **{name: r.numpy() for name, r in zip(four_layer_bundle.routing_outputs, routing)},
        }
        results = compare_outputs(expected, compiled.run({"input_ids": ids.numpy()}), four_layer_bundle.routing_outputs)
        assert all(result.passed for result in results), [result.message for result in results if not result.passed]
    # The layers really differ: the same kind with one layer's weights everywhere would not match.
    assert not np.array_equal(routing[1].numpy(), routing[2].numpy())


def test_no_node_computes_from_weights_alone(four_layer_bundle):
    """Weights are bound after export and folded once over the full graph, as the monolithic export did."""
    proto = four_layer_bundle.load_onnx(load_external_data=False)
    weights = {
        tensor.name for tensor in proto.graph.initializer if tensor.name.startswith(("layers.", "embed", "lm_head"))
    }
    weight_only = [
        node.op_type for node in proto.graph.node if node.input and all(name in weights for name in node.input)
    ]
    # The sparse lowering leaves its per-expert Concat/Split of weights to the runtime (ORT folds
    # them at session start; see exporters/lowering_sparse.py); nothing else reads weights alone.
    assert set(weight_only) <= {"Concat", "Split"}, weight_only


class _NotAModule:
    config = get_preset("tiny")


class _FlattenedPrologue(torch.nn.Module):
    """A prologue that returns [batch * seq, hidden]: one graph per kind cannot serve every shape."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_model(get_preset("tiny"))
        self.config = self.inner.config

    def prologue(self, input_ids):
        hidden, *shared = self.inner.prologue(input_ids)
        return (hidden.reshape(-1, hidden.shape[-1]), *shared)


def test_models_that_cannot_be_exported_layer_wise_are_refused():
    ids = _ids(2, 5)
    dense = get_lowering("dense")
    with pytest.raises(ExportError, match="layer-wise export needs a torch.nn.Module, got _NotAModule"):
        export_layered(_NotAModule(), ids, lowering=dense, opset=20)
    with pytest.raises(ExportError, match=r"prologue output 0 \(shape \[10, 64\]\) has an axis \(0\) that grows by 2"):
        export_layered(_FlattenedPrologue(), ids, lowering=dense, opset=20)


def test_layers_of_one_kind_must_have_the_same_parameters(tmp_path):
    model = build_model(get_preset("tiny"))
    model.layers[2].mlp.shared_experts = None  # layer 2 still claims the kind of layer 1
    with pytest.raises(
        ExportError, match=r"layers 1 and 2 have the same kind .* but different parameters \(mlp.shared"
    ):
        export_model_to_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_config_must_name_the_layers_that_route(tmp_path):
    model = build_model(get_preset("tiny"))
    model.config = dataclasses.replace(model.config, first_k_dense_replace=2)
    with pytest.raises(
        ExportError, match=r"layers \[1, 2\] return expert ids but the config's moe_layer_indices are \[2\]"
    ):
        export_model_to_onnx(model, tmp_path / "model.onnx")


class _ToyLayer(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, hidden):
        return hidden + torch.relu(self.linear(hidden)), None, None


class _Toy(torch.nn.Module):
    """A LayeredModel that traces in about a second: an embedding, two residual linear layers, a head."""

    def __init__(self, width: int = 8, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = dataclasses.replace(get_preset("tiny"), name="toy", num_hidden_layers=2, first_k_dense_replace=2)
        self.embed = torch.nn.Embedding(256, width)
        self.layers = torch.nn.ModuleList(_ToyLayer(width) for _ in range(2))
        self.out = torch.nn.Linear(width, 256, bias=False)
        self.scale = scale  # a plain attribute the trace bakes in as a constant

    def prologue(self, input_ids):
        return (self.embed(input_ids) * self.scale,)

    def layer_modules(self):
        return list(self.layers)

    def layer_kind(self, index):
        return "residual linear"

    def head(self, hidden):
        return self.out(hidden)

    def forward(self, input_ids):
        hidden = self.prologue(input_ids)[0]
        for layer in self.layers:
            hidden = layer(hidden)[0]
        return self.head(hidden), ()


@pytest.fixture
def count_traces(monkeypatch):
    """The number of times the exporter traced (rather than took a traced graph from the cache)."""
    import exporters.layer_graphs as layer_graphs

    calls = []
    trace = layer_graphs._export_pieces
    monkeypatch.setattr(layer_graphs, "_export_pieces", lambda *args: calls.append(1) or trace(*args))
    trace_cache.clear_trace_cache()
    yield calls
    trace_cache.clear_trace_cache()


def _toy_onnx(model, messages=None) -> bytes:
    import onnx_ir

    exported = export_layered(model, _ids(2, 5), lowering=get_lowering("dense"), opset=20, progress=messages)
    return onnx_ir.to_proto(exported).SerializeToString()


def test_other_weights_reuse_the_trace_and_write_the_same_bytes_as_a_fresh_trace(count_traces, tmp_path, monkeypatch):
    monkeypatch.setenv(trace_cache.ENVIRONMENT_VARIABLE, str(tmp_path))
    messages = []
    _toy_onnx(_Toy(seed=0))
    [written] = tmp_path.glob("*.onnx")  # the traced graph, on disk for later processes
    cached = _toy_onnx(_Toy(seed=1), messages.append)
    assert len(count_traces) == 1 and "reusing the traced layers" in messages[0]
    trace_cache.clear_trace_cache()  # as a new process: memory empty, the directory kept
    assert _toy_onnx(_Toy(seed=1)) == cached and len(count_traces) == 1
    written.write_bytes(b"not a graph")  # unreadable (say, a disk that filled up): traced afresh
    trace_cache.clear_trace_cache()
    fresh = _toy_onnx(_Toy(seed=1))
    assert len(count_traces) == 2
    assert cached == fresh
    assert cached != _toy_onnx(_Toy(seed=0))  # the weights are really the new model's (from the cache too)
    assert len(count_traces) == 2


def test_a_change_of_structure_is_another_key():
    """Another key is a miss by construction (the cache is a dict); no tracing needed to see it."""
    model, dense = _Toy(), get_lowering("dense")
    keys = [
        _key(model, _ids(2, 5), dense, 20),
        _key(_Toy(width=16), _ids(2, 5), dense, 20),  # other shapes
        _key(_Toy(scale=2.0), _ids(2, 5), dense, 20),  # another constant baked into the graph
        _key(_Toy().eval(), _ids(2, 5), dense, 20),  # another mode
        _key(model, _ids(3, 5), dense, 20),  # another example shape
        _key(model, _ids(2, 5), get_lowering("fused"), 20),  # another translation table
        _key(model, _ids(2, 5), dense, 21),
    ]
    assert len(set(keys)) == len(keys) and None not in keys
    assert _key(_Toy(seed=5), _ids(2, 5), dense, 20) == keys[0]  # other weights: the same key
    # The tiny preset: another lowering's or option's routed experts are another function or closure.
    tiny = build_model(get_preset("tiny"))
    capacity = get_lowering("capacity")
    variants = []
    for lowering, options in ((capacity, {"capacity_factor": 2.0}), (capacity, {"capacity_factor": 3.0}), (dense, {})):
        tiny.set_routed_experts(lowering.routed_experts(options))
        variants.append(_key(tiny, _ids(2, 5), lowering, 20))
    assert len(set(variants)) == 3 and None not in variants


def _key(model, ids, lowering, opset):
    from exporters.layer_graphs import _dynamic_axes, _find_kinds, _structure_key

    kinds, final_hidden = _find_kinds(model, ids)
    return _structure_key(model, kinds, (ids, final_hidden), _dynamic_axes(model, ids), lowering, opset)


def test_the_key_describes_closures_partials_and_tensor_constants():
    import functools

    def bound(scale):
        return lambda hidden: hidden * scale

    keys = [
        trace_cache.structure_key(value)
        for value in (
            bound(1.0),
            bound(2.0),
            functools.partial(torch.add, alpha=1),
            functools.partial(torch.add, alpha=2),
            torch.zeros(3),
            torch.ones(3),
            torch.nn.Parameter(torch.zeros(3)),
        )
    ]
    assert len(set(keys)) == len(keys) and None not in keys
    assert trace_cache.structure_key(bound(1.0)) == keys[0]
    # Parameters and buffers are graph inputs: their values are not part of the key, their shapes are.
    assert trace_cache.structure_key(torch.nn.Linear(2, 2)) == trace_cache.structure_key(torch.nn.Linear(2, 2))
    assert trace_cache.structure_key(torch.nn.Linear(2, 2)) != trace_cache.structure_key(torch.nn.Linear(2, 3))
    # What cannot be described is not cached.
    assert trace_cache.structure_key(torch.nn.Linear(2, 2), object()) is None


def test_the_key_is_the_same_in_another_process():
    """Keys on disk are found by later processes: nothing in the key may vary by process (set literals'
    order varies with hash randomization, for one)."""
    import subprocess
    import sys

    program = (
        "import torch\n"
        "from exporters import trace_cache\n"
        "def routed(hidden, names=None):\n"
        "    return hidden if names in {'alpha', 'beta', 'gamma', 'delta'} else -hidden\n"
        "torch.manual_seed(0)\n"
        "print(trace_cache.structure_key(torch.nn.Linear(2, 2), routed))\n"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(keys) == 1 and len(next(iter(keys))) == 64, keys


def test_the_key_changes_with_the_exporting_stack_and_the_source(monkeypatch):
    """A key on disk outlives the process: another torch, or an edited model file, must miss it."""
    layer = torch.nn.Linear(2, 2)
    key = trace_cache.structure_key(layer)
    with monkeypatch.context() as patch:
        patch.setattr(trace_cache, "_version", lambda distribution: "0.0-other")
        assert trace_cache.structure_key(layer) != key
    with monkeypatch.context() as patch:
        patch.setattr(trace_cache, "_source_digest", lambda module: (module, "edited"))
        assert trace_cache.structure_key(layer) != key
    assert trace_cache.structure_key(layer) == key


@pytest.fixture
def untraced(monkeypatch):
    """Every export traces afresh (no key: the trace cache is neither read nor written)."""
    import exporters.layer_graphs as layer_graphs

    monkeypatch.setattr(layer_graphs, "_structure_key", lambda *args: None)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="tracing processes are forked; this platform cannot")
def test_parts_traced_in_parallel_make_the_same_model_onnx_as_one_process(untraced, tmp_path, monkeypatch):
    """Byte for byte (scripts/export_speed.py checks the same on the tiny preset's 2, 4 and 8 layers)."""
    from exporters import parallel_tracing

    forked = []
    side_by_side = parallel_tracing._traced_side_by_side
    monkeypatch.setattr(
        parallel_tracing, "_traced_side_by_side", lambda *args: forked.append(len(args[0])) or side_by_side(*args)
    )
    written = {}
    for processes in ("0", "3"):  # in this process, then the head here and three parts in it and two children
        monkeypatch.setenv(parallel_tracing.ENVIRONMENT_VARIABLE, processes)
        export_model_to_onnx(_TwoKinds(), tmp_path / f"{processes}.onnx")
        written[processes] = (tmp_path / f"{processes}.onnx").read_bytes()
    assert forked == [3]
    assert written["0"] == written["3"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="tracing processes are forked; this platform cannot")
def test_a_part_that_fails_in_its_process_fails_the_export_with_its_name_and_writes_nothing(tmp_path, monkeypatch):
    import exporters.layer_graphs as layer_graphs
    from exporters import parallel_tracing

    def trace_or_fail(tracing, part):
        if part == 1:
            raise RuntimeError("no translation for aten::frobnicate")
        return b""  # never merged: the failure comes first

    monkeypatch.setattr(layer_graphs, "_export_part", trace_or_fail)
    monkeypatch.setattr(layer_graphs, "_structure_key", lambda *args: None)
    monkeypatch.setenv(parallel_tracing.ENVIRONMENT_VARIABLE, "2")
    with pytest.raises(
        ExportError,
        match=r"torch.onnx.export failed for toy \(dense lowering\): tracing layer kind 1 \(first at layer 1\): "
        r"RuntimeError: no translation for aten::frobnicate$",
    ):
        export_model_to_onnx(_TwoKinds(), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


class _TwoKinds(_Toy):
    """The toy with each layer a kind of its own: two layer kinds to trace."""

    def layer_kind(self, index):
        return f"residual linear {index}"


def test_tracing_turns_the_cycle_collector_off_and_back_to_how_it_was():
    import gc

    from exporters.torch_onnx_shortcuts import fast_tracing

    assert gc.isenabled()
    with pytest.raises(RuntimeError), fast_tracing():
        assert not gc.isenabled()
        raise RuntimeError("a trace that fails")
    assert gc.isenabled()
    gc.disable()
    try:
        with fast_tracing():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
