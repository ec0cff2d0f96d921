"""torch -> ONNX: tracing the reference model, MoE lowerings, validation, writing bundles.

Importing this package does not import torch; :func:`export_bundle` does, when called.
"""

from exporters.lowerings import LOWERINGS, Lowering, get_lowering
from exporters.torch_export import export_bundle
from exporters.weight_formats import WEIGHT_FORMATS, WeightFormat, get_weight_format
from exporters.weight_pass import convert_bundle

__all__ = [
    "LOWERINGS",
    "WEIGHT_FORMATS",
    "Lowering",
    "WeightFormat",
    "convert_bundle",
    "export_bundle",
    "get_lowering",
    "get_weight_format",
]
