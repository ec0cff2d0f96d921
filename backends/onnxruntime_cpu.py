"""``cpu``: ONNX Runtime's CPU execution provider.

ONNX Runtime says itself what it cannot run, and :func:`unsupported_answer` turns those answers
into :class:`~portable_moe.errors.UnsupportedError` by the exception's class, never by its words:
``NotImplemented`` (no kernel for an operator at this opset and dtype), ``Fail`` for an operator
its own schema registry does not list, and a plain ``RuntimeError`` from ``run``, which comes from
the Python binding converting a value (ORT's own failures come as its status exceptions).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from portable_moe.backend import (
    WEIGHT_FORMAT_KEYS,
    Backend,
    Capabilities,
    CompiledModel,
    ModelInput,
    Option,
    ProbeResult,
)
from portable_moe.compare import ToleranceOverride
from portable_moe.errors import UnsupportedError, UnsupportedReason
from portable_moe.tensors import outputs_not_carried

# ORT's optimisation levels by the names users type.
_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

# onnx's node test cases (the op suite) whose expected outputs ORT's float32 kernels cannot meet with the
# cases' own tolerance, for reasons that are not errors; declared in Capabilities.op_tolerance_overrides.
# None is widened to make a wrong result pass (the Resize align_corners and Attention -inf mask
# differences stay failed and show in the report).
OP_TOLERANCE_OVERRIDES: tuple[ToleranceOverride, ...] = (
    ToleranceOverride(
        precision="*",
        case_pattern=r"^test_(dft|stft)",
        rtol=1e-3,
        atol=1e-3,
        reason=(
            "onnx computes the expected spectra with numpy's float64 FFT, ORT in float32; the outputs reach "
            "~1900, and bins that cancel to ~0 keep the float32 rounding of the large terms (seen up to "
            "2.4e-4). atol 1e-3 is ~5e-7 of the output scale: a wrong bin (errors of 1 and more) still fails."
        ),
    ),
    ToleranceOverride(
        precision="*",
        case_pattern=r"^test_attention_.*fp16",
        rtol=2e-3,
        atol=1e-7,
        reason=(
            "float16 outputs: one float16 ulp is up to 2^-10 (~9.8e-4) relative, and ORT accumulates in float32 "
            "and rounds once where onnx's numpy code rounds between steps; seen: 2 ulps (4.9e-4 at 0.398). "
            "rtol 2e-3 allows 2 ulps."
        ),
    ),
)


class OrtCompiledModel(CompiledModel):
    """An ``onnxruntime.InferenceSession`` behind the CompiledModel contract."""

    def __init__(self, backend: Backend, model: ModelInput, session: Any) -> None:
        super().__init__(backend, model)
        self.session = session
        self._node_count = len(model.proto.graph.node)
        self._output_names = [output.name for output in session.get_outputs()]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = dict(zip(self._output_names, self.session.run(self._output_names, feeds)))
        except Exception as error:
            answer = unsupported_answer(error, None)
            if answer is None:
                raise
            raise answer from error
        not_carried = outputs_not_carried(self.outputs, results)
        if not_carried:
            raise UnsupportedError(
                UnsupportedReason.DTYPE_NOT_CARRIED,
                f"onnxruntime's Python binding has no numpy type for output(s) {'; '.join(not_carried)}",
            )
        return results

    def placement(self) -> dict[str, int]:
        # A session with the CPU provider alone runs every node there.
        return {"CPUExecutionProvider": self._node_count}


@functools.cache
def registered_operators() -> frozenset[tuple[str, str]]:
    """``(domain, op_type)`` of every operator schema ONNX Runtime registers ("" for ai.onnx).

    Empty when this build does not expose its registry (a minimal build): then nothing is
    reported as unknown.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    schemas = getattr(ort_state, "get_all_operator_schema", None)
    if schemas is None:
        return frozenset()
    return frozenset((schema.domain, schema.name) for schema in schemas())


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If, Loop, Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            yield from (sub for body in [attribute.g, *attribute.graphs] for sub in _nodes(body))


def unregistered_operators(model: onnx.ModelProto) -> list[str]:
    """Operators of ``model`` that ONNX Runtime's schema registry does not list (model-local functions aside)."""
    registered = registered_operators()
    if not registered:
        return []
    local = {(function.domain, function.name) for function in model.functions}
    unknown = set()
    for node in _nodes(model.graph):
        key = ("" if node.domain == "ai.onnx" else node.domain, node.op_type)
        if key not in registered and key not in local:
            unknown.add(f"{key[0]}:{key[1]}" if key[0] else key[1])
    return sorted(unknown)


def unsupported_answer(error: BaseException, model: onnx.ModelProto | None) -> UnsupportedError | None:
    """ONNX Runtime's ``error`` as an UnsupportedError when it says it cannot run the model, else None.

    Args:
        error: what ``InferenceSession`` (``model`` given) or ``session.run`` (``model`` None) raised.
        model: the model a session was being created for; None for an error raised by ``run``.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    words = str(error).strip()
    if isinstance(error, ort_state.NotImplemented):
        return UnsupportedError(UnsupportedReason.NO_KERNEL, f"onnxruntime answered NotImplemented: {words}")
    if model is None and type(error) is RuntimeError:
        return UnsupportedError(
            UnsupportedReason.DTYPE_NOT_CARRIED,
            f"onnxruntime's Python binding could not convert a value (RuntimeError, not an ORT status): {words}",
        )
    if model is not None and isinstance(error, ort_state.Fail):
        unknown = unregistered_operators(model)
        if unknown:
            return UnsupportedError(
                UnsupportedReason.UNKNOWN_OPERATOR,
                f"onnxruntime's operator registry has no {', '.join(unknown)}; it answered Fail: {words}",
            )
    return None


def session_options(threads: int, optimization: str) -> Any:
    """ORT SessionOptions from the options users pass."""
    import onnxruntime

    if optimization not in _OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(_OPTIMIZATION_LEVELS)}, got {optimization!r}")
    options = onnxruntime.SessionOptions()
    # Fatal only: ORT's errors are raised to the caller, who reports them with ORT's words (a log
    # line would say the same again on stderr, even where the caller expects the failure and goes
    # on, as generation does when a decoder's cache cannot be preallocated); its warnings are about
    # its own internals.
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "disable": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    return options


def model_source(model: ModelInput) -> Any:
    """What to hand ORT: the file path when there is one (so external data resolves), else bytes."""
    return str(model.path) if model.path is not None else model.proto.SerializeToString()


class OnnxRuntimeCpuBackend(Backend):
    name = "cpu"
    vendor = "ONNX Runtime (any x86-64 or Arm CPU)"
    description = "ONNX Runtime CPU execution provider"
    declared_options = {
        "threads": Option(0, int, "intra-op threads (0: ONNX Runtime decides)", minimum=0),
        "optimization": Option("all", str, "ONNX Runtime graph optimisation level", choices=_OPTIMIZATION_LEVELS),
    }
    expected_failures_file = Path(__file__).with_name("onnxruntime_cpu_expected_failures.toml")

    def probe(self) -> ProbeResult:
        try:
            import onnxruntime
        except ImportError as error:
            return ProbeResult(False, f"onnxruntime is not installed ({error}); run: pip install onnxruntime")
        if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
            return ProbeResult(False, "this onnxruntime build has no CPUExecutionProvider")
        return ProbeResult(True, f"onnxruntime {onnxruntime.__version__}", {"version": onnxruntime.__version__})

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            min_opset=7,
            max_opset=23,
            dtypes=frozenset(
                {
                    "float64",
                    "float32",
                    "float16",
                    "int64",
                    "int32",
                    "int16",
                    "int8",
                    "uint64",
                    "uint32",
                    "uint16",
                    "uint8",
                    "bool",
                }
            ),
            moe_lowerings=("fused", "sparse", "dense", "capacity"),
            domains=frozenset({"com.microsoft"}),
            weight_formats=WEIGHT_FORMAT_KEYS,
            op_tolerance_overrides=OP_TOLERANCE_OVERRIDES,
            runtime_reports_unsupported=True,
        )

    def _compile(self, model: ModelInput, options: dict[str, Any]) -> CompiledModel:
        import onnxruntime

        try:
            session = onnxruntime.InferenceSession(
                model_source(model),
                sess_options=session_options(options["threads"], options["optimization"]),
                providers=["CPUExecutionProvider"],
            )
        except Exception as error:
            answer = unsupported_answer(error, model.proto)
            if answer is None:
                raise
            raise answer from error
        return OrtCompiledModel(self, model, session)
