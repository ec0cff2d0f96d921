"""Build a transformers model from a local checkpoint directory, filling its weights lazily.

The model is built on the meta device (no memory for weights), then each parameter is read from
the safetensors files as it is needed, converted to float32 (FP8 blocks dequantized), and put in
place. Checkpoints keep experts one tensor per expert (``experts.<e>.gate_proj.weight``, Mixtral's
``w1``/``w3``/``w2``) while transformers 5 keeps them fused (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]); both layouts are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.hf.architectures import Architecture, get_architecture
from exporters.hf.checkpoint import CheckpointReader, checkpoint_directory, read_config
from portable_moe.config import ModelConfig
from portable_moe.errors import ExportError


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded as an unmodified transformers model.

    Attributes:
        directory: where it came from.
        hf_model: the transformers causal LM (float32, eager attention and experts, eval mode).
        architecture: its entry in the architecture table.
        config: the summary :class:`ModelConfig` a bundle carries.
        source_config: config.json as read.
        weight_files: weight file name -> sha256 of every file a tensor was read from.
    """

    directory: Path
    hf_model: Any
    architecture: Architecture
    config: ModelConfig
    source_config: dict[str, Any]
    weight_files: dict[str, str]


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ExportError(
            "exporting a Hugging Face checkpoint needs transformers and safetensors; install them with: "
            "pip install 'portable-moe[hf]'"
        ) from None
    return transformers


def moe_layer_indices(hf_model: Any) -> list[int]:
    """Indices of the decoder layers whose feed-forward is a routed MoE block."""
    return [index for index, layer in enumerate(hf_model.model.layers) if hasattr(layer.mlp, "experts")]


def _check_supported(hf_config: Any, moe_layers: list[int], where: str) -> None:
    """Refuse what the export does not reproduce exactly, naming it."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ExportError(
            f"{where}: hidden_act {hf_config.hidden_act!r} is not supported; the lowerings use SwiGLU (silu)"
        )
    layer_types = getattr(hf_config, "layer_types", None) or []
    if any("sliding" in str(kind) for kind in layer_types) or (
        not layer_types and getattr(hf_config, "sliding_window", None)
    ):
        raise ExportError(f"{where}: sliding-window attention is not supported yet; set sliding_window to null")
    expected = list(range(moe_layers[0], hf_config.num_hidden_layers)) if moe_layers else []
    if not moe_layers or moe_layers != expected:
        raise ExportError(
            f"{where}: MoE layers {moe_layers} are not a contiguous run ending at the last layer; only dense-first "
            "layouts (e.g. first_k_dense_replace, mlp_only_layers at the start) are supported"
        )


class _WeightResolver:
    """Maps the model's parameter names onto checkpoint tensors (direct, renamed, or per expert)."""

    def __init__(self, reader: CheckpointReader, architecture: Architecture, tie_embeddings: bool) -> None:
        self.reader = reader
        self.architecture = architecture
        self.tie_embeddings = tie_embeddings
        self.loaded: dict[str, Any] = {}

    def _names(self, name: str) -> list[str]:
        block = self.architecture.checkpoint_block
        return [name] if block == "mlp" else [name, name.replace(".mlp.", f".{block}.")]

    def tensor(self, name: str, like: Any) -> Any:
        import torch

        for candidate in self._names(name):
            if candidate in self.reader:
                return self.reader.tensor(candidate, torch.float32)
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj") and prefix.endswith(".experts"):
            return self._experts(prefix, leaf, like)
        if name == "lm_head.weight" and self.tie_embeddings:
            return self.loaded["model.embed_tokens.weight"]
        raise ExportError(
            f"{self.reader.directory}: the checkpoint has no tensor for {name!r}; it does not match its config.json"
        )

    def _experts(self, prefix: str, leaf: str, like: Any) -> Any:
        """Assemble a fused expert tensor from per-expert tensors, one expert at a time."""
        import torch

        gate, up, down = self.architecture.expert_projections
        out = torch.empty(tuple(like.shape), dtype=torch.float32)
        prefixes = self._names(prefix)
        for expert in range(out.shape[0]):
            projections = (gate, up) if leaf == "gate_up_proj" else (down,)
            parts = []
            for projection in projections:
                names = [f"{p}.{expert}.{projection}.weight" for p in prefixes]
                found = next((n for n in names if n in self.reader), names[-1])
                parts.append(self.reader.tensor(found, torch.float32))
            part = torch.cat(parts, dim=0)
            if tuple(part.shape) != tuple(out.shape[1:]):
                raise ExportError(
                    f"{self.reader.directory}: expert {expert} of {prefix} has shape {list(part.shape)}, the config "
                    f"implies {list(out.shape[1:])}"
                )
            out[expert] = part
        return out


def _fill_weights(model: Any, resolver: _WeightResolver) -> None:
    from torch import nn

    # Embeddings first, so a tied head can reuse them.
    names = sorted(
        (name for name, _ in model.named_parameters(remove_duplicate=False)),
        key=lambda name: name != "model.embed_tokens.weight",
    )
    for full_name in names:
        owner_name, _, leaf = full_name.rpartition(".")
        owner = model.get_submodule(owner_name)
        like = owner._parameters[leaf]
        if like is None or not like.is_meta:
            continue
        value = resolver.tensor(full_name, like)
        if tuple(value.shape) != tuple(like.shape):
            raise ExportError(
                f"{resolver.reader.directory}: tensor {full_name!r} has shape {list(value.shape)}, the config implies "
                f"{list(like.shape)}"
            )
        resolver.loaded[full_name] = value
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    for module_name, module in model.named_modules():
        for leaf, buffer in list(module._buffers.items()):
            if buffer is None or not buffer.is_meta or leaf in module._non_persistent_buffers_set:
                continue
            full_name = f"{module_name}.{leaf}" if module_name else leaf
            module._buffers[leaf] = resolver.tensor(full_name, buffer).to(buffer.dtype)
    # Rotary frequencies are computed, not stored: rebuild that module off the meta device.
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=model.config)
    leftovers = [name for name, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta]
    if leftovers:
        raise ExportError(f"could not materialise {', '.join(leftovers[:5])}: not stored in the checkpoint")


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Load a local Hugging Face MoE checkpoint as an unmodified transformers model in float32.

    Args:
        path: a directory as ``save_pretrained`` writes it. Nothing is downloaded.

    Returns:
        The loaded checkpoint.

    Raises:
        ExportError: not a local checkpoint directory, an unsupported architecture or layout,
            missing or corrupt weight files, or tensors that do not match the config.
    """
    directory = checkpoint_directory(path)
    source_config = read_config(directory)
    architecture = get_architecture(source_config, str(directory))
    transformers = _import_transformers()
    import torch

    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:
        raise ExportError(f"{directory}: transformers cannot read config.json ({error})") from None
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # dequantized at load: the model itself is plain float32
    reader = CheckpointReader.open(directory, source_config)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(
            hf_config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
        )
    moe_layers = moe_layer_indices(hf_model)
    _check_supported(hf_config, moe_layers, str(directory))
    tie = bool(getattr(hf_config, "tie_word_embeddings", False))
    _fill_weights(hf_model, _WeightResolver(reader, architecture, tie))
    hf_model.eval()
    name = str(source_config.get("model_type") or architecture.name)
    config = architecture.summary_config(hf_config, moe_layers, f"hf-{name}")
    return LoadedCheckpoint(directory, hf_model, architecture, config, source_config, dict(reader.files_read))
