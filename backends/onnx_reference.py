"""``reference``: onnx's own numpy evaluator, slow but the oracle for what each operator means.

The evaluator says itself what it cannot run: ``NotImplementedError`` (an operator, or a version
or attribute of one, it has no implementation for) becomes
:class:`~portable_moe.errors.UnsupportedError`, decided by the exception's class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from portable_moe.backend import WEIGHT_FORMAT_KEYS, Backend, Capabilities, CompiledModel, ModelInput, ProbeResult
from portable_moe.errors import UnsupportedError, UnsupportedReason


def _unsupported(error: NotImplementedError) -> UnsupportedError:
    return UnsupportedError(
        # Its first line says what is missing; the lines after it list every operator it has.
        UnsupportedReason.NO_KERNEL,
        f"onnx.reference answered {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}",
    )


class ReferenceCompiledModel(CompiledModel):
    def __init__(self, backend: Backend, model: ModelInput, evaluator: Any) -> None:
        super().__init__(backend, model)
        self.evaluator = evaluator
        self._output_names = list(evaluator.output_names)
        self._node_count = len(model.proto.graph.node)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(self._output_names, self.evaluator.run(None, feeds)))
        except NotImplementedError as error:
            raise _unsupported(error) from error

    def placement(self) -> dict[str, int]:
        return {"onnx.reference": self._node_count}


class OnnxReferenceBackend(Backend):
    name = "reference"
    vendor = "ONNX (numpy)"
    description = "onnx.reference.ReferenceEvaluator: slow, the oracle for operator semantics"
    expected_failures_file = Path(__file__).with_name("onnx_reference_expected_failures.toml")

    def probe(self) -> ProbeResult:
        import onnx

        return ProbeResult(True, f"onnx {onnx.__version__}", {"version": onnx.__version__})

    @property
    def capabilities(self) -> Capabilities:
        import onnx

        return Capabilities(
            min_opset=1,
            max_opset=onnx.defs.onnx_opset_version(),
            dtypes=frozenset({"float64", "float32", "float16", "int64", "int32", "bool"}),
            moe_lowerings=("dense", "sparse", "capacity"),
            weight_formats=WEIGHT_FORMAT_KEYS,
            runtime_reports_unsupported=True,
        )

    def _compile(self, model: ModelInput, options: dict[str, Any]) -> CompiledModel:
        from onnx.reference import ReferenceEvaluator

        try:
            evaluator = ReferenceEvaluator(model.proto, new_ops=[gather_elements_op()])
        except NotImplementedError as error:
            raise _unsupported(error) from error
        return ReferenceCompiledModel(self, model, evaluator)


def gather_elements_op() -> type:
    """GatherElements as the ONNX specification defines it, with numpy's ``take_along_axis``.

    onnx's own implementation (1.23) gathers with ``np.choose``, which takes at most 32 (numpy 1)
    or 64 (numpy 2) choices; past that its fallback reshapes wrongly whenever more than one index is
    gathered per row, so any router with many experts and top-k > 1 (``scores.gather(1, ids)``
    exports to GatherElements over the expert axis) fails there with "cannot reshape array".
    """
    from onnx.reference.ops.op_gather_elements import GatherElements

    class SpecGatherElements(GatherElements):
        def _run(self, data: np.ndarray, indices: np.ndarray, axis: int | None = None) -> tuple[np.ndarray]:
            axis = 0 if axis is None else int(axis)
            indices = indices.astype(np.int64)
            indices = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, indices, axis=axis),)

    SpecGatherElements.__name__ = "GatherElements"
    return SpecGatherElements
