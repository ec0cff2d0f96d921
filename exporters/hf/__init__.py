"""Hugging Face checkpoints as an export source (``export_bundle(..., hf=DIR)``, ``export --hf DIR``).

- :mod:`exporters.hf.checkpoint`: the checkpoint directory, lazy safetensors reading, FP8 blocks.
- :mod:`exporters.hf.architectures`: the supported architectures and their routers.
- :mod:`exporters.hf.loading`: a transformers model built from a checkpoint, weights read lazily.
- :mod:`exporters.hf.model`: that model as a LayeredModel with the project's MoE lowerings.
- :mod:`exporters.hf.source`: golden data from transformers itself, for the bundle.

Importing this package imports neither torch nor transformers.
"""

from exporters.hf.architectures import ARCHITECTURES, Architecture, get_architecture
from exporters.hf.loading import LoadedCheckpoint, load_checkpoint

__all__ = ["ARCHITECTURES", "Architecture", "LoadedCheckpoint", "get_architecture", "load_checkpoint"]
