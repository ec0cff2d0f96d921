"""The backend contract: checks at the door, written once in the base, the same on every backend."""

import numpy as np
import onnx.parser
import pytest

from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend
from portable_moe import BackendError, InputError, get_backend
from portable_moe.backend import ModelInput, as_model_input
from portable_moe.tensors import specs_from_onnx

TWO_INPUTS = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
two_inputs (int64[batch, seq] input_ids, float[batch, 4] features) => (float[batch, 4] doubled, int64[batch, seq] ids)
{
    doubled = Add(features, features)
    ids = Identity(input_ids)
}
""")

BACKENDS = ["cpu", "reference"]


def _feeds(**change):
    feeds = {"input_ids": np.zeros((2, 3), np.int64), "features": np.ones((2, 4), np.float32)}
    feeds.update(change)
    return {name: value for name, value in feeds.items() if value is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_runs_a_small_model(backend):
    outputs = get_backend(backend).compile(TWO_INPUTS).run(_feeds())
    assert list(outputs) == ["doubled", "ids"]
    np.testing.assert_array_equal(outputs["doubled"], np.full((2, 4), 2.0, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        (_feeds(features=None), r"missing input\(s\) 'features'; the model takes 'input_ids': int64 \[batch, seq\]"),
        (_feeds(extra=np.zeros(1)), r"unexpected input\(s\) 'extra'"),
        (
            _feeds(input_ids=np.zeros((2, 3), np.float32)),
            r"'input_ids' has dtype float32, expected int64 \[batch, seq\]",
        ),
        (_feeds(input_ids=np.zeros((2, 3, 1), np.int64)), r"'input_ids' has rank 3 \(shape \[2, 3, 1\]\), expected"),
        (_feeds(features=np.ones((2, 5), np.float32)), r"'features' has size 5 on axis 1, expected 4"),
        (
            _feeds(features=np.ones((3, 4), np.float32)),
            r"'features' has batch=3 on axis 0, but input 'input_ids' has batch=2",
        ),
        (_feeds(input_ids=np.zeros((2, 0), np.int64)), r"'input_ids' is empty on axis 1 \(seq\)"),
        (_feeds(input_ids=[[1, 2, 3], [4, 5, 6]]), r"'input_ids' is a list, expected a numpy array of int64"),
    ],
    ids=["missing", "unexpected", "dtype", "rank", "fixed-dim", "batch-mismatch", "empty", "not-array"],
)
def test_bad_feeds_are_refused_with_the_expected_spec(backend, feeds, message):
    compiled = get_backend(backend).compile(TWO_INPUTS)
    with pytest.raises(InputError, match=message):
        compiled.run(feeds)


def test_feeds_that_are_not_a_mapping():
    with pytest.raises(InputError, match="feeds must be a mapping"):
        get_backend("cpu").compile(TWO_INPUTS).run([np.zeros(1)])


def test_non_contiguous_feeds_are_accepted():
    compiled = get_backend("cpu").compile(TWO_INPUTS)
    features = np.ones((4, 2), np.float32).T  # a transposed view: not C-contiguous
    assert not features.flags.c_contiguous
    outputs = compiled.run(_feeds(features=features))
    np.testing.assert_array_equal(outputs["doubled"], np.full((2, 4), 2.0, np.float32))


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(BackendError, match=r"'cpu' has no option\(s\) thread; its options: optimization, threads"):
        get_backend("cpu").compile(TWO_INPUTS, {"thread": 2})


def test_bad_option_value_is_a_compile_error():
    with pytest.raises(BackendError, match="optimization must be one of"):
        get_backend("cpu").compile(TWO_INPUTS, {"optimization": "max"})


def test_a_lowering_the_backend_does_not_take_is_refused():
    inputs, outputs = specs_from_onnx(TWO_INPUTS)
    model = ModelInput(TWO_INPUTS, None, inputs, outputs, moe_lowering="warp-drive")
    with pytest.raises(BackendError, match=r"does not accept the 'warp-drive' MoE lowering; it takes dense"):
        get_backend("reference").compile(model)


def test_an_opset_outside_the_range_is_refused():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 5]>
    old (float[2] x) => (float[2] y) { y = Identity(x) }
    """)
    with pytest.raises(BackendError, match="runs ai.onnx opsets 7-.*the model uses opset 5"):
        get_backend("cpu").compile(model)


def test_an_operator_domain_the_backend_lacks_is_refused():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    contrib (float[2, 4] x) => (float[2, 4] y) { y = com.microsoft.Gelu(x) }
    """)
    with pytest.raises(BackendError, match="'reference' cannot run operators of domain.*com.microsoft"):
        get_backend("reference").compile(model)
    assert get_backend("cpu").compile(model).run({"x": np.ones((2, 4), np.float32)})["y"].shape == (2, 4)


def test_a_backend_failure_at_run_time_is_a_backend_error():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    reshape (float[n] x, int64[1] shape) => (float[m] y) { y = Reshape(x, shape) }
    """)
    compiled = get_backend("cpu").compile(model)
    with pytest.raises(BackendError, match="backend 'cpu' failed while running"):
        compiled.run({"x": np.ones(4, np.float32), "shape": np.array([3], np.int64)})


def test_model_sources(tmp_path, tiny_bundle):
    path = tmp_path / "two.onnx"
    onnx.save(TWO_INPUTS, path)
    assert as_model_input(path).path == path
    assert as_model_input(str(tiny_bundle.path)).moe_lowering == tiny_bundle.moe_lowering
    assert as_model_input(tiny_bundle).bundle is tiny_bundle


def test_declared_options_turn_words_into_their_type_and_refuse_the_rest():
    from portable_moe import Option

    flag, count, ratio = Option(False, bool), Option(0, int, minimum=0, maximum=8), Option(1.0, float, minimum=0)
    assert [flag.check("x", "strict", word) for word in ("true", "False", "yes", "0", True)] == [
        True,
        False,
        True,
        False,
        True,
    ]
    assert count.check("x", "threads", 8) == 8 and ratio.check("x", "ratio", 2) == 2.0
    with pytest.raises(BackendError, match=r"^x option threads must be an integer from 0 to 8, got 9$"):
        count.check("x", "threads", 9)
    with pytest.raises(BackendError, match=r"^x option threads must be an integer from 0 to 8, got 2.5$"):
        count.check("x", "threads", 2.5)
    with pytest.raises(BackendError, match=r"^x option strict must be true or false, got 'maybe'$"):
        flag.check("x", "strict", "maybe")
    with pytest.raises(BackendError, match=r"^x option ratio must be a number >= 0, got True$"):
        ratio.check("x", "ratio", True)


def test_options_are_checked_before_the_backend_compiles():
    compiled_models = []

    class Recording(OnnxRuntimeCpuBackend):
        def _compile(self, model, options):
            compiled_models.append(model)
            return super()._compile(model, options)

    with pytest.raises(BackendError, match=r"cpu option threads must be an integer >= 0, got 'abc'"):
        Recording().compile(TWO_INPUTS, {"threads": "abc"})
    assert compiled_models == []
    assert Recording.option_defaults == {"threads": 0, "optimization": "all"}  # derived from the declarations


def _model(node: onnx.NodeProto, inputs: list, outputs: list, opset: int) -> onnx.ModelProto:
    graph = onnx.helper.make_graph([node], "containers", inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)


FLOAT_TENSOR = onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)
SEQUENCE_MODEL = _model(
    onnx.helper.make_node("SequenceAt", ["items", "position"], ["item"]),
    [
        onnx.helper.make_value_info("items", onnx.helper.make_sequence_type_proto(FLOAT_TENSOR)),
        onnx.helper.make_tensor_value_info("position", onnx.TensorProto.INT64, []),
    ],
    [onnx.helper.make_tensor_value_info("item", onnx.TensorProto.FLOAT, None)],
    17,
)


def test_sequence_inputs_are_lists_of_tensors_checked_one_by_one():
    inputs, _ = specs_from_onnx(SEQUENCE_MODEL)
    assert inputs[0].containers == ("sequence",) and inputs[0].describe() == "sequence of float32 []"
    compiled = get_backend("cpu").compile(SEQUENCE_MODEL)
    items = [np.arange(2, dtype=np.float32), np.arange(5, dtype=np.float32)]  # sizes may differ
    np.testing.assert_array_equal(compiled.run({"items": items, "position": np.array(1)})["item"], items[1])
    with pytest.raises(InputError, match=r"input 'items' is a ndarray, expected a list: sequence of float32 \[\]"):
        compiled.run({"items": items[0], "position": np.array(1)})
    with pytest.raises(InputError, match=r"input 'items' holds dtype float64, expected sequence of float32 \[\]"):
        compiled.run({"items": [np.zeros(2)], "position": np.array(0)})


def test_optional_inputs_take_none():
    model = _model(
        onnx.helper.make_node("OptionalHasElement", ["maybe"], ["present"]),
        [onnx.helper.make_value_info("maybe", onnx.helper.make_optional_type_proto(FLOAT_TENSOR))],
        [onnx.helper.make_tensor_value_info("present", onnx.TensorProto.BOOL, [])],
        18,
    )
    compiled = get_backend("reference").compile(model)
    assert not compiled.run({"maybe": None})["present"]
    assert compiled.run({"maybe": np.ones(2, np.float32)})["present"]
