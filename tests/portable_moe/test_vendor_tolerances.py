"""A vendor package, written from docs/writing-a-backend.md and installed out of tree, declares its own
float16 precision mode and its own op-suite tolerance override; conformance and the op suite judge it by
those declarations, with no edit to portable-moe.
"""

from __future__ import annotations

import numpy as np
import onnx.parser
import pytest

from portable_moe import load_bundle, registry
from portable_moe.compare import TOLERANCES
from portable_moe.conformance.model_check import ERROR, PASSED, check_bundle
from portable_moe.conformance.ops import FAILED, OpCase, declared_overrides, run_case
from portable_moe.testing.hostile import write_toy_bundle

ACME_VENDOR = '''
import numpy as np

from portable_moe.backend import Backend, Capabilities, CompiledModel, ModelInput, ProbeResult
from portable_moe.compare import PrecisionMode, Tolerance, ToleranceOverride

ACME_MODES = {
    "acme-fp16": PrecisionMode(
        tolerances={
            "float32": Tolerance(
                atol=2e-2, rtol=1e-2, min_routing_agreement=1.0, reason="float16 outputs: 10-bit mantissa"
            )
        },
        near_tie_margin=5e-3,
        near_tie_reason="float16 rounding of router scores",
    )
}
ACME_OP_OVERRIDES = (
    ToleranceOverride(
        precision="acme-fp16",
        case_pattern=r"^test_sub",
        rtol=1e-3,
        atol=2e-3,
        reason="float16 inputs: a difference of two values near 1 keeps their rounding (up to 4.9e-4 each)",
    ),
)


def _to_float16(values):
    return {
        name: value.astype(np.float16).astype(value.dtype) if value.dtype.kind == "f" else value
        for name, value in values.items()
    }


class AcmeCompiledModel(CompiledModel):
    precision = "acme-fp16"

    def __init__(self, backend, model, evaluator):
        super().__init__(backend, model)
        self.evaluator = evaluator
        self.node_count = len(model.proto.graph.node)

    def _run(self, feeds):
        # The device computes in float16: float inputs are rounded to it, and every float output comes back so.
        outputs = dict(zip(self.evaluator.output_names, self.evaluator.run(None, _to_float16(feeds))))
        return _to_float16(outputs)

    def placement(self):
        return {"acme:npu": self.node_count}


class AcmeNpuBackend(Backend):
    name = "acme-npu"
    vendor = "Acme"
    description = "a float16 NPU, simulated with onnx's evaluator"

    def probe(self):
        return ProbeResult(True, "simulated")

    @property
    def capabilities(self):
        return Capabilities(precision_modes=ACME_MODES, op_tolerance_overrides=ACME_OP_OVERRIDES)

    def _compile(self, model: ModelInput, options):
        from onnx.reference import ReferenceEvaluator

        return AcmeCompiledModel(self, model, ReferenceEvaluator(model.proto))


class UndeclaredNpuBackend(AcmeNpuBackend):
    """Reports the same float16 mode but forgets to declare it."""

    name = "undeclared-npu"

    @property
    def capabilities(self):
        return Capabilities()
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return load_bundle(write_toy_bundle(tmp_path_factory.mktemp("vendor") / "toy"))


@pytest.fixture
def acme_vendor(tmp_path, monkeypatch, write_vendor_package):
    backends = {"acme-npu": "acme_vendor:AcmeNpuBackend", "undeclared-npu": "acme_vendor:UndeclaredNpuBackend"}
    write_vendor_package(tmp_path, "acme_vendor", ACME_VENDOR, backends)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield
    monkeypatch.undo()
    registry.refresh()


def test_a_vendor_mode_is_judged_by_the_vendors_declaration(acme_vendor, toy):
    [result] = check_bundle(toy, ["acme-npu"])
    assert result.status == PASSED, result.reason
    assert result.precision == "acme-fp16"
    # float16 rounding really happened: the outputs are not bit-equal, yet inside the declared rows.
    assert 0 < result.worst("max_abs_error") <= 2e-2
    assert [layer.near_tie_margin for layer in result.routing] == [5e-3]
    assert "acme-fp16" not in {mode for mode, _ in TOLERANCES}  # core was not edited


def test_a_mode_the_backend_does_not_declare_is_an_error_that_says_where_to_declare_it(acme_vendor, toy):
    [result] = check_bundle(toy, ["undeclared-npu"])
    assert result.status == ERROR
    assert "no tolerance for precision mode 'acme-fp16'; known modes: exact" in result.reason
    assert "Capabilities.precision_modes" in result.reason


def _sub_case() -> OpCase:
    """x - y for x just above 1 and y = 1: float16 inputs round x to 1, so the differences vanish."""
    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> sub (float[4] x, float[4] y) => (float[4] z) { z = Sub(x, y) }'
    )
    x = np.array([1.0001, 1.0002, 1.0003, 1.0004], dtype=np.float32)
    y = np.ones(4, dtype=np.float32)
    return OpCase("test_sub_near_one", "Sub", model.SerializeToString(), (((x, y), (x - y,)),), 1e-3, 1e-7)


def test_a_vendor_declares_its_own_op_suite_tolerance_override(acme_vendor):
    acme, case = registry.get_backend("acme-npu"), _sub_case()
    result = run_case(acme, case)
    assert result.status == PASSED, result.reason
    owed = result.tolerance_override  # passed only because of the vendor's override, whose raw error shows
    assert (owed["atol"], owed["case_atol"]) == (2e-3, 1e-7) and "float16 inputs" in owed["reason"]
    assert owed["max_abs_error"] == pytest.approx(4e-4, rel=1e-2)
    assert run_case(acme, case, strict=True).status == FAILED
    # The same float16 device without the declaration is judged by the case's own tolerance.
    assert run_case(registry.get_backend("undeclared-npu"), case).status == FAILED
    assert declared_overrides(["cpu", "acme-npu"])[-1] == ("acme-npu", acme.capabilities.op_tolerance_overrides[0])
