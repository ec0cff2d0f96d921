"""``cpu``: ONNX Runtime's CPU execution provider."""

from __future__ import annotations

from typing import Any

import numpy as np

from portable_moe.backend import (
    WEIGHT_FORMAT_KEYS,
    Backend,
    Capabilities,
    CompiledModel,
    ModelInput,
    Option,
    ProbeResult,
)

# ORT's optimisation levels by the names users type.
_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class OrtCompiledModel(CompiledModel):
    """An ``onnxruntime.InferenceSession`` behind the CompiledModel contract."""

    def __init__(self, backend: Backend, model: ModelInput, session: Any) -> None:
        super().__init__(backend, model)
        self.session = session
        self._node_count = len(model.proto.graph.node)
        self._output_names = [output.name for output in session.get_outputs()]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self.session.run(self._output_names, feeds)))

    def placement(self) -> dict[str, int]:
        # A session with the CPU provider alone runs every node there.
        return {"CPUExecutionProvider": self._node_count}


def session_options(threads: int, optimization: str) -> Any:
    """ORT SessionOptions from the options users pass."""
    import onnxruntime

    if optimization not in _OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(_OPTIMIZATION_LEVELS)}, got {optimization!r}")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are about its own internals
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
            dynamic_shapes=True,
            moe_lowerings=("fused", "sparse", "dense", "capacity"),
            domains=frozenset({"com.microsoft"}),
            weight_formats=WEIGHT_FORMAT_KEYS,
        )

    def _compile(self, model: ModelInput, options: dict[str, Any]) -> CompiledModel:
        import onnxruntime

        session = onnxruntime.InferenceSession(
            model_source(model),
            sess_options=session_options(options["threads"], options["optimization"]),
            providers=["CPUExecutionProvider"],
        )
        return OrtCompiledModel(self, model, session)
