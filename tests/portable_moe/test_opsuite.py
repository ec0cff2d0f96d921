"""The op-level conformance suite: collection, classification, worker isolation, reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
import xml.etree.ElementTree as ElementTree

import numpy as np
import onnx
import onnx.parser
import pytest
from rich.console import Console

from portable_moe import BackendError, InputError, UnsupportedReason, registry
from portable_moe.backend import Backend, Capabilities, CompiledModel, ProbeResult, as_model_input
from portable_moe.cli.ops_report import print_report
from portable_moe.conformance.expected_failures import FailureCategory, expected_failures_of, load_expected_failures
from portable_moe.conformance.junit import write_junit
from portable_moe.conformance.ops import (
    DEFAULT_EXCLUDES,
    ERROR,
    EXPECTED_FAILURE,
    FAILED,
    PASSED,
    STATUSES,
    TIMEOUT,
    UNEXPECTED_PASS,
    UNSUPPORTED,
    CaseResult,
    ModelTask,
    OpCase,
    OpPool,
    OpTask,
    cache_file,
    collect_cases,
    declared_overrides,
    op_tasks,
    report_dict,
    run_case,
    run_tasks,
    select_cases,
    settle_expected,
    summarize,
    tolerance_for_case,
)
from portable_moe.conformance.ops.cases import _read_cache

SMALL_SUBSET = r"^test_(add|relu|matmul)"


@pytest.fixture(scope="module", autouse=True)
def case_cache(tmp_path_factory):
    """Keep the collected-cases cache in this session's temporary directory (subprocesses get it too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PORTABLE_MOE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "portable-moe-cache"))
        yield


@pytest.fixture(scope="module")
def cases(case_cache) -> dict[str, OpCase]:
    return {case.name: case for case in collect_cases()}


def make_case(text: str, inputs: list[np.ndarray], outputs: list[np.ndarray], name: str = "test_inline") -> OpCase:
    """An OpCase from an inline ONNX text model."""
    model = onnx.parser.parse_model(text)
    return OpCase(
        name, model.graph.node[0].op_type, model.SerializeToString(), ((tuple(inputs), tuple(outputs)),), 1e-3, 1e-7
    )


RELU_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
relu (float[3] x) => (float[3] y) { y = Relu(x) }
"""
RELU = make_case(
    RELU_TEXT, [np.array([-1.0, 0.5, 2.0], np.float32)], [np.array([0.0, 0.5, 2.0], np.float32)], "test_inline_relu"
)


class _ShiftedCompiled(CompiledModel):
    """Adds ``shift`` to every output: a backend that computes the wrong thing."""

    def __init__(self, backend, model, inner, shift):
        super().__init__(backend, model)
        self.inner, self.shift = inner, shift

    def _run(self, feeds):
        outputs = self.inner._run(feeds)
        return {name: (value + value.dtype.type(self.shift)) for name, value in outputs.items()}


class ConfigurableBackend(Backend):
    """An in-process test backend built on the cpu backend, with knobs for each way a case can end."""

    name = "test-backend"
    vendor = "tests"

    def __init__(self, shift=0, dtypes=None, refuse_op=None, fail_in=None, output=None):
        self.shift, self.refuse_op, self.fail_in, self.output = shift, refuse_op, fail_in, output
        self._dtypes = dtypes
        self._cpu = registry.get_backend("cpu")

    def probe(self):
        return ProbeResult(True)

    @property
    def capabilities(self):
        declared = self._cpu.capabilities
        return Capabilities(max_opset=declared.max_opset, dtypes=frozenset(self._dtypes or declared.dtypes))

    def check_supported(self, model):
        super().check_supported(model)
        for node in model.proto.graph.node:
            if node.op_type == self.refuse_op:
                raise BackendError(f"backend {self.name!r} has no kernel for {node.op_type} in its op table")

    def _compile(self, model, options):
        if self.fail_in == "compile":
            raise RuntimeError("the vendor compiler crashed")
        inner = self._cpu._compile(model, self._cpu.resolve_options(None))
        if self.fail_in == "run":
            inner._run = _device_lost
        if self.output is not None:
            inner._run = lambda feeds: {spec.name: self.output for spec in model.outputs}
        return _ShiftedCompiled(self, model, inner, self.shift)


def _device_lost(feeds):
    raise RuntimeError("device lost")


# ---------------------------------------------------------------------------------------------
# Collection and selection


def test_collects_every_node_case_of_onnx(cases):
    assert len(cases) > 1000
    relu = cases["test_relu"]
    assert relu.op == "Relu" and relu.rtol == 1e-3 and relu.atol == 1e-7
    (inputs, outputs), *_ = relu.data_sets
    assert len(inputs) == 1 and isinstance(inputs[0], np.ndarray) and outputs[0].shape == inputs[0].shape
    # An expanded case counts under the op whose function body it runs.
    assert cases["test_softmax_axis_0_expanded"].op == "Softmax"
    assert cases["test_ai_onnx_ml_array_feature_extractor"].op.startswith("ai.onnx.ml:")


def test_collected_cases_are_cached_between_runs(cases):
    path = cache_file()
    assert path is not None and path.is_file() and onnx.__version__ in path.name
    assert [case.name for case in _read_cache(path)] == list(cases)
    path.write_bytes(b"truncated")
    assert _read_cache(path) is None  # a damaged file is never trusted: the cases are generated again
    path.unlink()
    collect_cases()
    assert [case.name for case in _read_cache(path)] == list(cases)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PORTABLE_MOE_CACHE_DIR", "")
    assert cache_file() is None
    monkeypatch.delenv("PORTABLE_MOE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_file().parent == tmp_path / "portable-moe"


def test_include_and_exclude_select_by_regex(cases):
    selected = select_cases(list(cases.values()), [r"^test_relu$", r"^test_abs"], [r"abs$"])
    assert [case.name for case in selected] == ["test_relu"]


def test_default_excludes_leave_out_random_outputs_unless_asked(cases):
    everything = list(cases.values())
    with pytest.raises(InputError, match="no op cases match"):
        select_cases(everything, ["^test_bernoulli$"])
    assert [c.name for c in select_cases(everything, ["^test_bernoulli$"], default_excludes=False)] == [
        "test_bernoulli"
    ]
    kept = {case.name for case in select_cases(everything, ["^test_training_dropout"])}
    assert kept == {"test_training_dropout_zero_ratio", "test_training_dropout_zero_ratio_mask"}


def test_every_default_exclusion_has_a_reason_and_matches_a_case(cases):
    for exclusion in DEFAULT_EXCLUDES:
        assert len(exclusion.reason) > 40
        assert any(re.search(exclusion.case_pattern, name) for name in cases)


@pytest.mark.parametrize(
    ("include", "exclude", "message"),
    [
        (["^test_(add"], [], r"bad --include regex '\^test_\(add'"),
        ([], ["[z-a]"], r"bad --exclude regex '\[z-a\]'"),
        (["^no_such_case$"], [], r"no op cases match include \['\^no_such_case\$'\]"),
    ],
)
def test_bad_selection_is_refused(cases, include, exclude, message):
    with pytest.raises(InputError, match=message):
        select_cases(list(cases.values()), include, exclude)


# ---------------------------------------------------------------------------------------------
# Classification, in this process


def test_a_subset_passes_on_cpu_and_reference_in_worker_processes(cases):
    subset = select_cases(list(cases.values()), [SMALL_SUBSET])
    results = run_tasks(op_tasks(subset, ["cpu", "reference"]), subset, jobs=2)
    assert len(results) == 2 * len(subset)
    by_key = {(r.backend, r.case): r for r in results}
    for backend in ("cpu", "reference"):
        for name in ("test_add", "test_add_bcast", "test_relu", "test_matmul_2d"):
            assert by_key[(backend, name)].status == PASSED, by_key[(backend, name)]
    # Nothing fails or errors: what is not passed the runtime itself called unsupported, with a code.
    assert {r.status for r in results} <= {PASSED, UNSUPPORTED}
    assert by_key[("cpu", "test_add_uint8")].status == PASSED
    unsupported = [r for r in results if r.status == UNSUPPORTED]
    assert all(r.reason and r.code in set(UnsupportedReason) for r in unsupported)


def test_wrong_values_fail_with_the_worst_element():
    result = run_case(ConfigurableBackend(shift=0.01), RELU)
    assert result.status == FAILED
    assert "y: 3 of 3 elements outside atol=1e-07 rtol=0.001; worst at index" in result.reason
    assert result.worst["name"] == "y" and result.worst["max_abs_error"] == pytest.approx(0.01, rel=1e-3)


def test_wrong_integers_fail_with_the_first_difference(cases):
    result = run_case(ConfigurableBackend(shift=1), cases["test_argmax_default_axis_example"])
    assert result.status == FAILED
    assert "elements differ; first at index [0, 0]: expected 1, got 2" in result.reason


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (np.array([0.0, np.nan, 2.0], np.float32), r"y: non-finite values differ, first at index \[1\]"),
        (np.array([0.0, 0.5], np.float32), r"y: shape \[2\], expected \[3\]"),
        (np.array([0.0, 0.5, 2.0], np.float64), r"y: dtype float64, expected float32"),
    ],
    ids=["nan", "shape", "dtype"],
)
def test_outputs_are_compared_shape_dtype_then_values(output, message):
    result = run_case(ConfigurableBackend(output=output), RELU)
    assert result.status == FAILED
    assert re.search(message, result.reason), result.reason


def test_non_finite_values_must_match_in_kind():
    case = make_case(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        ident (float[3] x) => (float[3] y) { y = Identity(x) }
        """,
        [np.array([np.nan, np.inf, -np.inf], np.float32)],
        [np.array([np.nan, np.inf, -np.inf], np.float32)],
    )
    # NaN and Inf are fed on purpose (the compile passes nan_policy="pass"); equal NaNs are equal.
    assert run_case(ConfigurableBackend(), case).status == PASSED
    flipped = run_case(ConfigurableBackend(output=np.array([np.nan, -np.inf, -np.inf], np.float32)), case)
    assert flipped.status == FAILED
    assert "non-finite values differ, first at index [1]: expected inf, got -inf" in flipped.reason


def test_a_dtype_missing_from_the_capabilities_is_unsupported(cases):
    result = run_case(ConfigurableBackend(dtypes={"float32"}), cases["test_add_bcast"])
    assert result.status == PASSED
    result = run_case(ConfigurableBackend(dtypes={"float32"}), cases["test_argmax_default_axis_example"])
    assert result.status == UNSUPPORTED
    assert result.reason == (
        "output 'result' has dtype int64, which backend 'test-backend' does not list in its capabilities (float32)"
    )


def test_non_tensor_inputs_are_unsupported_where_only_a_declaration_answers(cases):
    result = run_case(ConfigurableBackend(), cases["test_identity_sequence"])
    assert result.status == UNSUPPORTED and result.code == UnsupportedReason.DECLARED
    assert "input 'x' is a sequence: backend 'test-backend' declares tensors only" in result.reason


@pytest.mark.parametrize(
    "name", ["test_identity_sequence", "test_identity_opt", "test_sequence_insert_at_back", "test_if_opt"]
)
def test_sequences_and_optionals_run_through_the_contract(cases, name):
    assert run_case(registry.get_backend("cpu"), cases[name]).status == PASSED


# Each answer ONNX Runtime gives for what it cannot run, and the code it becomes.
ORT_ANSWERS = {
    "no kernel": (
        """
        <ir_version: 11, opset_import: ["" : 25]>
        int4_identity (int4[2] x) => (int4[2] y) { y = Identity(x) }
        """,
        UnsupportedReason.NO_KERNEL,
        "onnxruntime answered NotImplemented: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED",
    ),
    "unknown operator": (
        """
        <ir_version: 8, opset_import: ["" : 17, "ai.onnx.preview.training" : 1]>
        step (float r, int64 t, float[2] x, float[2] g, float[2] h) => (float[2] x2, float[2] h2) {
            x2, h2 = ai.onnx.preview.training.Adagrad(r, t, x, g, h)
        }
        """,
        UnsupportedReason.UNKNOWN_OPERATOR,
        "onnxruntime's operator registry has no ai.onnx.preview.training:Adagrad; it answered Fail",
    ),
    "dtype its binding cannot carry": (
        """
        <ir_version: 8, opset_import: ["" : 21]>
        bf16_identity (bfloat16[2] x) => (bfloat16[2] y) { y = Identity(x) }
        """,
        UnsupportedReason.DTYPE_NOT_CARRIED,
        "onnxruntime's Python binding could not convert a value (RuntimeError, not an ORT status): Numpy_type",
    ),
}


@pytest.mark.parametrize("answer", list(ORT_ANSWERS))
def test_cpu_is_unsupported_only_where_onnxruntime_says_so(answer):
    import ml_dtypes

    text, code, words = ORT_ANSWERS[answer]
    model = onnx.parser.parse_model(text)
    vector = np.ones(2, np.float32)
    inputs, outputs = {
        "no kernel": ([np.zeros(2, ml_dtypes.int4)], [np.zeros(2, ml_dtypes.int4)]),
        "unknown operator": ([np.float32(0.1), np.int64(0), vector, vector, vector], [vector, vector]),
        "dtype its binding cannot carry": ([np.zeros(2, ml_dtypes.bfloat16)], [np.zeros(2, ml_dtypes.bfloat16)]),
    }[answer]
    data = ((tuple(np.asarray(value) for value in inputs), tuple(outputs)),)
    case = OpCase("test_inline", "Op", model.SerializeToString(), data, 1e-3, 1e-7)
    result = run_case(registry.get_backend("cpu"), case)
    assert (result.status, result.code) == (UNSUPPORTED, code), result
    assert words in result.reason


def test_cpu_runs_opsets_and_domains_it_never_declared():
    """The declared range (opsets up to 23, no ai.onnx.ml) stays for bundles; the op suite asks ONNX Runtime."""
    cpu = registry.get_backend("cpu")
    assert cpu.capabilities.max_opset < 24 and "ai.onnx.ml" not in cpu.capabilities.domains
    newer = make_case(RELU_TEXT.replace('"" : 17', '"" : 24'), *RELU.data_sets[0])
    assert run_case(cpu, newer).status == PASSED
    with pytest.raises(BackendError, match="the model uses opset 24"):
        cpu.check_supported(as_model_input(onnx.load_model_from_string(newer.model)))


def test_the_reference_evaluator_answers_for_itself(cases):
    result = run_case(registry.get_backend("reference"), cases["test_scatter_with_axis"])
    assert (result.status, result.code) == (UNSUPPORTED, UnsupportedReason.NO_KERNEL)
    assert result.reason.startswith(
        "onnx.reference answered RuntimeImplementationError: No registered implementation for operator 'Scatter'"
    )
    assert "\n" not in result.reason  # its list of every operator it has is left out


def test_check_supported_is_the_backends_hook_for_unsupported_ops_and_opsets():
    refused = run_case(ConfigurableBackend(refuse_op="Relu"), RELU)
    assert refused.status == UNSUPPORTED
    assert refused.reason == "backend 'test-backend' has no kernel for Relu in its op table"
    too_new = make_case(RELU_TEXT.replace('"" : 17', '"" : 24'), *RELU.data_sets[0])
    result = run_case(ConfigurableBackend(), too_new)
    assert result.status == UNSUPPORTED and "the model uses opset 24" in result.reason


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            "compile",
            "compile: backend 'test-backend' failed to compile the model: RuntimeError: the vendor compiler crashed",
        ),
        ("run", "run: backend 'test-backend' failed while running: RuntimeError: device lost"),
    ],
)
def test_exceptions_are_errors(stage, message):
    result = run_case(ConfigurableBackend(fail_in=stage), RELU)
    assert result.status == ERROR
    assert result.reason == message


def test_tolerance_comes_from_the_case_unless_an_override_its_backend_declares_matches(cases):
    relu, dft = cases["test_relu"], cases["test_dft"]
    own = tolerance_for_case(relu, "cpu", "exact")
    assert (own.rtol, own.atol) == (1e-3, 1e-7)
    assert tolerance_for_case(dft, "cpu", "exact").atol == 1e-3  # declared by cpu, keyed by case
    assert "float64 FFT" in tolerance_for_case(dft, "cpu", "exact").reason
    assert tolerance_for_case(dft, "cpu", "exact", strict=True).atol == 1e-7
    assert tolerance_for_case(dft, "reference", "exact").atol == 1e-7
    # npu-sim declares one for its float16 mode: keyed by precision mode, on the backend that declares it.
    reduced = tolerance_for_case(relu, registry.get_backend("npu-sim"), "force_fp16")
    assert (reduced.rtol, reduced.atol) == (1e-3, 5e-3) and "float16" in reduced.reason
    assert tolerance_for_case(relu, "npu-sim", "must_keep_origin_dtype").atol == 1e-7
    assert tolerance_for_case(relu, "cpu", "force_fp16").atol == 1e-7
    with pytest.raises(BackendError, match="unknown backend 'no-such-npu'"):
        tolerance_for_case(relu, "no-such-npu", "exact")


def test_a_pass_owed_to_an_override_shows_its_raw_error_and_strict_fails_it(cases):
    cpu = registry.get_backend("cpu")
    result = run_case(cpu, cases["test_dft"])
    assert result.status == PASSED
    owed = result.tolerance_override
    assert (owed["case_rtol"], owed["case_atol"], owed["rtol"], owed["atol"]) == (1e-3, 1e-7, 1e-3, 1e-3)
    assert owed["output"] == "y" and 1e-7 < owed["max_abs_error"] < 1e-3 and "float64 FFT" in owed["reason"]
    strict = run_case(cpu, cases["test_dft"], strict=True)
    assert strict.status == FAILED and "atol=1e-07 rtol=0.001" in strict.reason
    assert run_case(cpu, cases["test_relu"]).tolerance_override is None  # its own tolerance: nothing to show


def test_every_declared_tolerance_override_has_a_reason_a_known_mode_and_matches_a_case(cases):
    declared = declared_overrides(registry.backend_names())
    assert {name for name, _ in declared} >= {"cpu", "npu-sim"}
    for name, override in declared:
        modes = {"*", "exact", *registry.get_backend(name).capabilities.precision_modes}
        assert override.precision in modes, (name, override.precision)
        assert len(override.reason) > 40
        assert any(re.search(override.case_pattern, case) for case in cases)


def test_the_crosscheck_against_raw_onnxruntime_counts_both_sides(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "ort_crosscheck.py"
    spec = importlib.util.spec_from_file_location("ort_crosscheck", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    arguments = ["--include", "^test_(relu|dft|cast_FLOAT_to_BFLOAT16)$", "--jobs", "0"]
    # test_dft passes in the op suite only through its tolerance override: 1 of 3 cases differ.
    assert script.main(arguments) == 1
    output = capsys.readouterr().out
    assert "raw onnxruntime loop: 1 passed" in output and "--backend cpu: 2 passed" in output
    assert "op suite only test_dft: passed" in output and "(33.33% of the cases; limit 1%)" in output
    assert script.main([*arguments, "--strict"]) == 0
    assert "cases on which they disagree: 0 (0.00% of the cases" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Expected failures


class ListingBackend(ConfigurableBackend):
    """A backend whose expected-failures file is given by the test (through a class attribute)."""

    name = "listing-backend"


@pytest.fixture
def listing_backend(tmp_path):
    def register(text: str) -> str:
        path = tmp_path / "expected.toml"
        path.write_text(text)
        ListingBackend.expected_failures_file = path
        registry.register_backend(ListingBackend.name, ListingBackend)
        expected_failures_of.cache_clear()
        return ListingBackend.name

    yield register
    registry.unregister_backend(ListingBackend.name)
    expected_failures_of.cache_clear()


LISTED = """
[[case]]
name = "test_relu"
category = "runtime-bug"
reason = "a symptom"

[[case]]
name = "test_abs"
category = "platform-limit"
reason = "a machine without it"
"""


def test_a_listed_failure_is_expected_and_a_listed_pass_is_unexpected(listing_backend):
    name = listing_backend(LISTED)
    failing = settle_expected(
        CaseResult("test_abs", "Abs", name, FAILED, "y: 1 of 3 elements outside", code="mismatch")
    )
    assert (failing.status, failing.code, failing.listed_outcome) == (EXPECTED_FAILURE, "platform-limit", FAILED)
    assert failing.reason == "listed as platform-limit: a machine without it; failed: y: 1 of 3 elements outside"
    passing = settle_expected(CaseResult("test_relu", "Relu", name, PASSED))
    assert (passing.status, passing.listed_outcome) == (UNEXPECTED_PASS, PASSED)
    assert passing.reason == "listed as runtime-bug: a symptom; it passed: remove it from the list"
    timed_out = settle_expected(CaseResult("test_abs", "Abs", name, TIMEOUT, "ran past the time limit of 3 s"))
    assert timed_out.status == EXPECTED_FAILURE and timed_out.listed_outcome == TIMEOUT
    unlisted = CaseResult("test_add", "Add", name, FAILED, "differs")
    assert settle_expected(unlisted) is unlisted


def test_expected_failures_apply_in_the_runner(listing_backend):
    name = listing_backend(LISTED)
    [result] = run_tasks([OpTask(name, RELU.name)], [RELU], jobs=0)
    assert result.status == PASSED  # test_inline_relu is not listed
    relu = OpCase("test_relu", "Relu", RELU.model, RELU.data_sets, RELU.rtol, RELU.atol)
    [result] = run_tasks([OpTask(name, "test_relu")], [relu], jobs=0)
    assert result.status == UNEXPECTED_PASS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[case]]\nname = "test_relu"\ncategory = "runtime-bug"\n', r"entry 1: give reason \(non-empty strings\)"),
        (
            '[[case]]\nname = "test_relu"\ncategory = "flaky"\nreason = "x"\n',
            r"entry 1: unknown category 'flaky'; use one of runtime-bug, platform-limit",
        ),
        (LISTED + '[[case]]\nname = "test_relu"\ncategory = "runtime-bug"\nreason = "again"\n', "listed twice"),
        ("[[case]\n", "cannot be read"),
        ('case = "test_relu"\n', r"'case' must be an array of tables"),
    ],
    ids=["missing field", "unknown category", "duplicate", "bad toml", "not a table array"],
)
def test_a_malformed_expected_failures_file_is_refused(tmp_path, text, message):
    path = tmp_path / "expected.toml"
    path.write_text(text)
    with pytest.raises(BackendError, match=message):
        load_expected_failures(path)


def test_every_shipped_expected_failure_names_a_case_with_a_category_and_reason(cases):
    for name in ("cpu", "reference", "openvino", "npu-sim"):
        listed = expected_failures_of(name)
        for case, entry in listed.items():
            assert case in cases, f"{name}: {case} is not a case of onnx {onnx.__version__}"
            assert isinstance(entry.category, FailureCategory) and len(entry.reason) > 20


# ---------------------------------------------------------------------------------------------
# Worker processes: a backend that crashes or hangs loses one case, not the run

FLAKY_VENDOR = """
import os
import signal
import time

from backends.onnxruntime_cpu import OnnxRuntimeCpuBackend


class FlakyNpu(OnnxRuntimeCpuBackend):
    description = "segfaults on test_abs, hangs on test_acos"

    def _compile(self, model, options):
        compiled = super()._compile(model, options)
        graph = model.proto.graph.name
        run = compiled._run

        def flaky_run(feeds):
            if graph == "test_abs":
                os.kill(os.getpid(), signal.SIGSEGV)
            if graph == "test_acos":
                time.sleep(3600)
            return run(feeds)

        compiled._run = flaky_run
        return compiled
"""


@pytest.fixture
def flaky_vendor(tmp_path, monkeypatch, write_vendor_package):
    """A vendor package on sys.path, registered through the entry-point group (worker processes see it too)."""
    write_vendor_package(tmp_path, "flaky_vendor", FLAKY_VENDOR, {"flaky-npu": "flaky_vendor:FlakyNpu"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield "flaky-npu"
    monkeypatch.undo()
    registry.refresh()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSEGV by os.kill is POSIX")
def test_a_crash_and_a_hang_lose_only_their_case(cases, flaky_vendor):
    names = ["test_abs", "test_add", "test_acos", "test_relu"]
    subset = [cases[name] for name in names]
    with OpPool(subset, jobs=1, timeout=3) as pool:
        results = pool.run([OpTask(flaky_vendor, name) for name in names])
    by_case = {result.case: result for result in results}
    assert [result.case for result in results] == names
    assert by_case["test_abs"].status == ERROR
    assert (
        "the worker process was killed by SIGSEGV (segmentation fault) while running this case"
        in by_case["test_abs"].reason
    )
    assert "flaky_vendor.py" in by_case["test_abs"].reason  # faulthandler's innermost frame
    assert by_case["test_abs"].op == "Abs"
    assert by_case["test_acos"].status == TIMEOUT and by_case["test_acos"].details == {"time_limit_s": 3}
    assert by_case["test_acos"].reason == "ran past the time limit of 3 s; the worker was killed and replaced"
    assert by_case["test_add"].status == PASSED and by_case["test_relu"].status == PASSED


class _Unimportable(ConfigurableBackend):
    name = "unimportable"


def test_workers_that_cannot_start_stop_the_run_with_the_reason(cases, monkeypatch):
    # A factory from a module that exists only in this process: the worker cannot unpickle it.
    module = types.ModuleType("portable_moe_test_only_module")
    module.Factory = type("Factory", (_Unimportable,), {"__module__": module.__name__})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    registry.register_backend("unimportable", module.Factory)
    try:
        with OpPool([cases["test_relu"]], jobs=1, timeout=5) as pool:
            with pytest.raises(
                BackendError,
                match=r"(?s)worker processes exited with status 1 before taking a task.*No module named 'portable_moe_test_only_module'",
            ):
                pool.run([OpTask("unimportable", "test_relu")])
    finally:
        registry.unregister_backend("unimportable")


def test_an_unpicklable_in_process_backend_is_refused_for_workers(cases):
    registry.register_backend("lambda-backend", lambda: ConfigurableBackend())
    try:
        with OpPool([cases["test_relu"]], jobs=1) as pool:
            with pytest.raises(BackendError, match="'lambda-backend' was registered in this process with a factory"):
                pool.run([OpTask("lambda-backend", "test_relu")])
        # In this process it runs (no isolation).
        [result] = run_tasks([OpTask("lambda-backend", "test_relu")], [cases["test_relu"]], jobs=0)
        assert result.status == PASSED
    finally:
        registry.unregister_backend("lambda-backend")


@pytest.mark.parametrize(("jobs", "timeout", "message"), [(0, 5, "--jobs must be at least 1"), (1, 0, "--timeout")])
def test_pool_arguments_are_checked(jobs, timeout, message):
    with pytest.raises(InputError, match=message):
        OpPool([], jobs=jobs, timeout=timeout)


def test_model_conformance_runs_in_a_worker(tiny_bundle):
    with OpPool([], jobs=1) as pool:
        [result] = pool.run([ModelTask("cpu", str(tiny_bundle.path))])
    assert result.status == PASSED and result.op == "(model)", result.reason


# ---------------------------------------------------------------------------------------------
# Reports

RESULTS = [
    CaseResult("test_relu", "Relu", "cpu", PASSED, seconds=0.01),
    CaseResult("test_add", "Add", "cpu", FAILED, "z: 1 of 3 elements outside", 0.02, {"name": "z"}),
    CaseResult("test_abs", "Abs", "cpu", ERROR, "timed out after 3 s", 3.0),
    CaseResult("test_cast", "Cast", "cpu", UNSUPPORTED, "input 'x' has dtype bfloat16"),
    CaseResult("test_relu", "Relu", "reference", PASSED),
    CaseResult("test_add", "Add", "reference", PASSED),
    CaseResult("test_abs", "Abs", "reference", PASSED),
    CaseResult("test_cast", "Cast", "reference", UNSUPPORTED, "bfloat16"),
]


def test_summary_never_counts_unsupported_as_passed():
    summaries = summarize(RESULTS, ["cpu", "reference"])
    cpu = summaries["cpu"]
    assert cpu.counts == {**dict.fromkeys(STATUSES, 0), PASSED: 1, FAILED: 1, UNSUPPORTED: 1, ERROR: 1}
    assert cpu.pass_rate_supported == pytest.approx(1 / 3)
    assert cpu.pass_rate_all == pytest.approx(1 / 4)
    assert summaries["reference"].pass_rate_supported == 1.0 and summaries["reference"].pass_rate_all == 0.75


def test_json_report_structure():
    report = json.loads(json.dumps(report_dict(RESULTS, ["cpu", "reference"], "portable-moe conformance ops")))
    assert report["format"] == "portable-moe-opsuite/2"
    assert set(report["denominators"]) == {"pass_rate_all", "pass_rate_supported"}
    assert report["backends"]["cpu"]["supported"] == 3
    assert report["onnx_version"] == onnx.__version__
    assert report["backends"]["cpu"]["failed"] == 1 and report["backends"]["cpu"]["total"] == 4
    assert report["results"][1] == {
        "case": "test_add",
        "op": "Add",
        "backend": "cpu",
        "status": FAILED,
        "reason": "z: 1 of 3 elements outside",
        "seconds": 0.02,
        "worst": {"name": "z"},
        "placement": {},
        "details": {},
        "code": "",
        "tolerance_override": None,
        "listed_outcome": "",
    }
    overrides = report["tolerance_overrides"]
    assert overrides and all(entry["reason"] and entry["backend"] == "cpu" for entry in overrides)
    assert set(overrides[0]) == {"backend", "precision", "case_pattern", "rtol", "atol", "reason"}


def test_junit_has_one_testcase_per_result_with_outcomes_marked(tmp_path):
    path = tmp_path / "ops.xml"
    write_junit(RESULTS, path)
    root = ElementTree.parse(path).getroot()
    suites = root.findall("testsuite")
    assert [suite.get("name") for suite in suites] == ["portable-moe ops on cpu", "portable-moe ops on reference"]
    cpu = suites[0]
    assert (cpu.get("tests"), cpu.get("failures"), cpu.get("errors"), cpu.get("skipped")) == ("4", "1", "1", "1")
    cases = {case.get("name"): case for case in cpu.findall("testcase")}
    assert len(root.findall(".//testcase")) == len(RESULTS)
    assert list(cases["test_relu"]) == []
    assert cases["test_add"].find("failure").get("message") == "failed: z: 1 of 3 elements outside"
    assert cases["test_abs"].find("error").text == "timed out after 3 s"
    assert cases["test_cast"].find("skipped") is not None and cases["test_cast"].get("classname") == "cpu.Cast"


def test_junit_marks_timeouts_as_errors_and_listed_cases_by_their_outcome(tmp_path):
    path = tmp_path / "ops.xml"
    write_junit(
        [
            CaseResult("test_abs", "Abs", "cpu", TIMEOUT, "ran past the time limit of 3 s", 3.0, code="timeout"),
            CaseResult("test_add", "Add", "cpu", EXPECTED_FAILURE, "listed as runtime-bug: x", code="runtime-bug"),
            CaseResult("test_relu", "Relu", "cpu", UNEXPECTED_PASS, "listed as runtime-bug: x; it passed"),
        ],
        path,
    )
    cases = {case.get("name"): case for case in ElementTree.parse(path).getroot().iter("testcase")}
    assert cases["test_abs"].find("error").get("message") == "timeout (timeout): ran past the time limit of 3 s"
    assert cases["test_add"].find("skipped").get("type") == "expected-failure (runtime-bug)"
    assert cases["test_relu"].find("failure").get("message").startswith("unexpected-pass: listed as")


def test_matrix_shows_only_ops_with_a_non_pass_unless_asked():
    console = Console(record=True, width=200)
    print_report(console, RESULTS, ["cpu", "reference"], full_matrix=False)
    text = console.export_text()
    assert "Add" in text and "Cast" in text and "Relu " not in text.split("op x backend")[1]
    assert "1/1 e1" not in text and "0/1 e1" in text and "0/1 f1" in text and "0/1 u1" in text
    assert "failed test_add: z: 1 of 3 elements outside" in text
    console = Console(record=True, width=200)
    print_report(console, RESULTS, ["cpu", "reference"], full_matrix=True)
    assert "Relu" in console.export_text().split("op x backend")[1]


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_runs_the_suite_and_writes_reports(tmp_path):
    report, junit, page = tmp_path / "ops.json", tmp_path / "ops.xml", tmp_path / "ops.html"
    command = [sys.executable, "-m", "portable_moe.cli", "conformance", "ops", "--backend", "cpu,reference"]
    command += ["--include", "^test_relu$", "--include", "^test_cast_FLOAT_to_BFLOAT16$", "--include", "^test_dft$"]
    command += ["--json", str(report), "--junit", str(junit), "--html", str(page)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ONNX node test cases" in result.stdout and "3 cases x 2 backends" in result.stdout
    assert "CPU-seconds" in result.stdout
    assert "Cast" in result.stdout and "Relu" not in result.stdout.split("op x backend")[1]
    assert "cpu: 1 case(s) passed only because of a tolerance override" in result.stdout
    data = json.loads(report.read_text())
    statuses = {(r["backend"], r["case"]): (r["status"], r["code"]) for r in data["results"]}
    assert statuses[("cpu", "test_relu")] == statuses[("reference", "test_relu")] == (PASSED, "")
    assert statuses[("cpu", "test_cast_FLOAT_to_BFLOAT16")] == (UNSUPPORTED, UnsupportedReason.DTYPE_NOT_CARRIED)
    assert statuses[("cpu", "test_dft")] == (PASSED, "")
    assert data["command"].startswith("portable-moe conformance ops")
    assert data["backends"]["cpu"]["passed_with_tolerance_override"] == 1
    assert len(ElementTree.parse(junit).getroot().findall(".//testcase")) == 6
    html_text = page.read_text()
    assert "Passed only because of a tolerance override (1)" in html_text and "test_dft" in html_text


def test_cli_strict_uses_the_cases_own_tolerances(capsys):
    from portable_moe.cli import main

    arguments = ["conformance", "ops", "--backend", "cpu", "--include", "^test_dft$", "--jobs", "0"]
    assert main(arguments) == 0
    assert main([*arguments, "--strict"]) == 1
    output = capsys.readouterr().out
    assert "tolerances: the cases' own (--strict)" in output and "failed test_dft: y:" in output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--backend", "tpu"], "unknown backend 'tpu'"),
        (["--jobs", "-1"], "--jobs must be 0"),
        (["--include", "("], "bad --include regex"),
    ],
)
def test_cli_usage_errors_are_one_line(arguments, message, capsys):
    from portable_moe.cli import main

    assert main(["conformance", "ops", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_an_unavailable_backend(monkeypatch, capsys):
    from portable_moe.cli import main

    class Unavailable(ConfigurableBackend):
        def probe(self):
            return ProbeResult(False, "no device found")

    registry.register_backend("absent-npu", Unavailable)
    try:
        assert main(["conformance", "ops", "--backend", "absent-npu"]) == 2
        assert "'absent-npu' is unavailable: no device found" in capsys.readouterr().err
    finally:
        registry.unregister_backend("absent-npu")
