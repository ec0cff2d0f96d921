"""torch -> ONNX: tracing the reference model, MoE lowerings, validation, writing bundles.

Importing this package does not import torch; :func:`export_bundle` does, when called.
"""

from exporters.lowerings import LOWERINGS, Lowering, get_lowering
from exporters.torch_export import export_bundle

__all__ = ["LOWERINGS", "Lowering", "export_bundle", "get_lowering"]
