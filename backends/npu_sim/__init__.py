"""``npu-sim``: a simulated NPU modelled on Huawei Ascend's public constraints (computed on the CPU).

Registered as the ``npu-sim`` backend through the ``portable_moe.backends`` entry point, as a
vendor's own package would be. ``python -m backends.npu_sim BUNDLE`` prints its compile report.
"""

from backends.npu_sim.backend import GearReport, NpuSimBackend, NpuSimCompiledModel, NpuSimReport
from backends.npu_sim.precision import PRECISION_MODES

__all__ = ["PRECISION_MODES", "GearReport", "NpuSimBackend", "NpuSimCompiledModel", "NpuSimReport"]
