"""Bad input at run time, tried on every registered backend (the checks live in the shared base).

One test is generated per (kind of bad input, backend): the backends are read from the registry
at collection time, so an adapter added later is covered without touching this file; one that
cannot run on this machine is skipped with its probe's reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx.parser
import pytest

from portable_moe import BackendError, InputError, load_bundle, registry
from portable_moe.backend import ModelInput
from portable_moe.testing.hostile import TOY_VOCAB, write_toy_bundle

TWO_INPUTS = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
two_inputs (int64[batch, seq] input_ids, float[batch, 4] features) => (float[batch, 4] doubled, int64[batch, seq] ids)
{
    doubled = Add(features, features)
    ids = Identity(input_ids)
}
""")


def _two(**change: Any) -> dict[str, Any]:
    feeds: dict[str, Any] = {
        "input_ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "features": np.arange(8, dtype=np.float32).reshape(2, 4),
    }
    feeds.update(change)
    return {name: value for name, value in feeds.items() if value is not None}


def _toy(ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {"input_ids": np.arange(10, dtype=np.int64).reshape(2, 5) % TOY_VOCAB if ids is None else ids}


def _with(array: np.ndarray, position: tuple[int, ...], value: Any) -> np.ndarray:
    changed = array.copy()
    changed[position] = value
    return changed


def _read_only(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class Case:
    """One kind of bad input: the model it is fed to, the feeds, and the InputError it must raise
    (``refused``), or None when the input must be accepted and give the same outputs as clean input."""

    kind: str
    model: str  # "two" (two inputs, a fixed and a shared dimension) or "toy" (a bundle with a config)
    feeds: Callable[[], Any]
    refused: str | None


CASES = [
    Case("missing input", "two", lambda: _two(features=None), r"missing input\(s\) 'features'; the model takes"),
    Case("unexpected input", "two", lambda: _two(extra=np.zeros(1)), r"unexpected input\(s\) 'extra'"),
    Case(
        "wrong dtype",
        "two",
        lambda: _two(input_ids=np.zeros((2, 3), np.float32)),
        r"'input_ids' has dtype float32, expected int64 \[batch, seq\]",
    ),
    Case("wrong rank", "two", lambda: _two(features=np.ones((2, 4, 1), np.float32)), r"'features' has rank 3"),
    Case(
        "dimension contradicts the model",
        "two",
        lambda: _two(features=np.ones((2, 5), np.float32)),
        r"'features' has size 5 on axis 1, expected 4",
    ),
    Case(
        "dimension contradicts another input",
        "two",
        lambda: _two(features=np.ones((3, 4), np.float32)),
        r"'features' has batch=3 on axis 0, but input 'input_ids' has batch=2",
    ),
    Case("empty batch", "two", lambda: _two(input_ids=np.zeros((0, 3), np.int64)), r"'input_ids' is empty on axis 0"),
    Case("not an array", "two", lambda: _two(features=[[1.0] * 4] * 2), r"'features' is a list, expected a numpy"),
    Case("feeds not a mapping", "two", lambda: list(_two().values()), "feeds must be a mapping"),
    Case(
        "NaN in a float input",
        "two",
        lambda: _two(features=_with(_two()["features"], (1, 2), np.nan)),
        r"'features' contains 1 NaN/Inf value\(s\), the first \(nan\) at position \(1, 2\).*nan_policy='pass'",
    ),
    Case(
        "Inf in a float input",
        "two",
        lambda: _two(features=_with(_two()["features"], (0, 3), -np.inf)),
        r"'features' contains 1 NaN/Inf value\(s\), the first \(-inf\) at position \(0, 3\)",
    ),
    Case(
        "token id past the vocabulary",
        "toy",
        lambda: _toy(_with(_toy()["input_ids"], (1, 3), TOY_VOCAB)),
        rf"'input_ids' has token id {TOY_VOCAB} at position \(1, 3\), outside the vocabulary: valid ids are 0 to "
        rf"{TOY_VOCAB - 1} \(vocab_size {TOY_VOCAB}\); 1 id\(s\) out of range",
    ),
    Case(
        "negative token id",
        "toy",
        lambda: _toy(_with(_toy()["input_ids"], (0, 0), -1)),
        r"'input_ids' has token id -1 at position \(0, 0\), outside the vocabulary",
    ),
    Case(
        "non-contiguous array",
        "two",
        lambda: _two(features=np.asfortranarray(_two()["features"])),
        None,
    ),
    Case("strided view", "two", lambda: _two(features=np.arange(16, dtype=np.float32).reshape(2, 8)[:, ::2]), None),
    Case("read-only arrays", "two", lambda: {name: _read_only(value) for name, value in _two().items()}, None),
    Case("byte-swapped array", "two", lambda: _two(features=_two()["features"].astype(">f4")), None),
    Case("token ids at the vocabulary's edges", "toy", lambda: _toy(_with(_toy()["input_ids"], (0, 0), 15)), None),
]
# Accepted cases give the outputs of these clean inputs.
_CLEAN = {
    "non-contiguous array": lambda: _two(),
    "strided view": lambda: _two(features=np.arange(16, dtype=np.float32).reshape(2, 8)[:, ::2].copy()),
    "read-only arrays": lambda: _two(),
    "byte-swapped array": lambda: _two(),
    "token ids at the vocabulary's edges": lambda: _toy(_with(_toy()["input_ids"], (0, 0), 15)),
}


def _collected_backends() -> list[str]:
    return registry.backend_names()


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    return load_bundle(write_toy_bundle(tmp_path_factory.mktemp("inputs") / "toy"))


_compiled: dict[tuple[str, str], Any] = {}


def _compiled_model(backend_name: str, model: str, toy_bundle) -> Any:
    backend = registry.get_backend(backend_name)
    probe = backend.safe_probe()
    if not probe.available:
        pytest.skip(f"backend {backend_name!r} is unavailable here: {probe.reason}")
    key = (backend_name, model)
    if key not in _compiled:
        _compiled[key] = backend.compile(TWO_INPUTS if model == "two" else toy_bundle)
    return _compiled[key]


@pytest.mark.parametrize("backend_name", _collected_backends())
@pytest.mark.parametrize("case", CASES, ids=[case.kind.replace(" ", "-") for case in CASES])
def test_bad_input_on_every_backend(backend_name, case, toy_bundle):
    """Refused kinds raise InputError naming the input and the problem; accepted kinds give the clean outputs."""
    compiled = _compiled_model(backend_name, case.model, toy_bundle)
    feeds = case.feeds()
    if case.refused is not None:
        with pytest.raises(InputError, match=case.refused):
            compiled.run(feeds)
        return
    before = {name: (value.copy(), value.flags.writeable) for name, value in feeds.items()}
    outputs = compiled.run(feeds)
    expected = compiled.run(_CLEAN[case.kind]())
    for name in expected:
        np.testing.assert_array_equal(outputs[name], expected[name])
    for name, (copy, writeable) in before.items():  # the caller's arrays are untouched
        np.testing.assert_array_equal(feeds[name], copy)
        assert feeds[name].flags.writeable == writeable


def test_the_non_contiguous_cases_really_are_non_contiguous():
    by_kind = {case.kind: case for case in CASES}
    assert not by_kind["strided view"].feeds()["features"].flags.c_contiguous
    assert not by_kind["non-contiguous array"].feeds()["features"].flags.c_contiguous
    assert by_kind["byte-swapped array"].feeds()["features"].dtype.byteorder == ">"


# ---------------------------------------------------------------------------------------------
# NaN policy


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_nan_policy_pass_lets_non_finite_values_through(backend_name):
    features = _with(_two()["features"], (1, 2), np.nan)
    passing = registry.get_backend(backend_name).compile(TWO_INPUTS, {"nan_policy": "pass"})
    assert np.isnan(passing.run(_two(features=features))["doubled"][1, 2])
    with pytest.raises(InputError, match="contains 1 NaN/Inf"):
        passing.run(_two(features=features), nan_policy="reject")  # a per-run override
    rejecting = registry.get_backend(backend_name).compile(TWO_INPUTS)
    assert rejecting.nan_policy == "reject"
    assert np.isnan(rejecting.run(_two(features=features), nan_policy="pass")["doubled"][1, 2])


def test_an_unknown_nan_policy_is_refused():
    with pytest.raises(InputError, match=r"nan_policy must be one of 'reject', 'pass', got 'ignore'"):
        registry.get_backend("cpu").compile(TWO_INPUTS, {"nan_policy": "ignore"})
    with pytest.raises(InputError, match=r"nan_policy must be one of 'reject', 'pass', got 'zero'"):
        registry.get_backend("cpu").compile(TWO_INPUTS).run(_two(), nan_policy="zero")


# ---------------------------------------------------------------------------------------------
# The checks happen before the backend sees anything, and the backend cannot touch the caller's arrays


_calls: list[dict[str, np.ndarray]] = []


def _recording_backend():
    """The cpu backend, but its compiled model records what reaches _run, and scribbles on it."""
    from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, OrtCompiledModel

    class RecordingCompiledModel(OrtCompiledModel):
        def _run(self, feeds):
            _calls.append(feeds)
            outputs = super()._run(feeds)
            for value in feeds.values():
                value[...] = 0  # a careless adapter writing into its inputs
            return outputs

    class RecordingBackend(OnnxRuntimeCpuBackend):
        name = "recording"

        def _compile(self, model: ModelInput, options):
            return RecordingCompiledModel(self, model, super()._compile(model, options).session)

    return RecordingBackend()


@pytest.fixture
def recording_backend():
    _calls.clear()
    registry.register_backend("recording", _recording_backend)
    yield registry.get_backend("recording")
    registry.unregister_backend("recording")


def test_out_of_vocabulary_ids_never_reach_the_backend(recording_backend, toy_bundle):
    compiled = recording_backend.compile(toy_bundle)
    assert compiled.token_id_limits == {"input_ids": TOY_VOCAB}
    with pytest.raises(InputError, match="outside the vocabulary"):
        compiled.run(_toy(_with(_toy()["input_ids"], (1, 4), 10_000)))
    assert _calls == []


def test_a_model_without_a_config_has_no_vocabulary_check(recording_backend):
    assert recording_backend.compile(TWO_INPUTS).token_id_limits == {}


def test_the_backend_gets_private_copies(recording_backend):
    compiled = recording_backend.compile(TWO_INPUTS)
    feeds = _two()
    originals = {name: value.copy() for name, value in feeds.items()}
    outputs = compiled.run(feeds)
    [seen] = _calls
    assert all(seen[name] is not feeds[name] for name in feeds)
    for name in feeds:  # the adapter zeroed what it got; the caller's arrays are as they were
        np.testing.assert_array_equal(feeds[name], originals[name])
        assert not seen[name].any()
    np.testing.assert_array_equal(outputs["doubled"], originals["features"] * 2)


def test_a_backend_that_leaves_out_an_output_is_a_backend_error(monkeypatch):
    compiled = registry.get_backend("cpu").compile(TWO_INPUTS)
    run = compiled._run
    monkeypatch.setattr(compiled, "_run", lambda feeds: {k: v for k, v in run(feeds).items() if k != "ids"})
    with pytest.raises(BackendError, match=r"backend 'cpu' returned no value for output\(s\) ids"):
        compiled.run(_two())
