"""Reading a Hugging Face checkpoint directory: config.json and safetensors weights, lazily.

A checkpoint is a local directory as ``save_pretrained`` writes it: ``config.json`` and either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Nothing is downloaded:
a path that is not a directory is refused, with a hint when it looks like a hub id.

Tensors are read one at a time when asked for (``safetensors.safe_open``), so loading never holds
a second copy of the whole model. Block-wise FP8 weights (DeepSeek-V3's published format:
``float8_e4m3fn`` weights with a ``<name>_scale_inv`` float32 tensor of one scale per
``weight_block_size`` block) are dequantized as they are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_moe.errors import ExportError

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def checkpoint_directory(path: str | Any) -> Path:
    """Return ``path`` as a checkpoint directory, refusing anything that is not a local one.

    Raises:
        ExportError: the path does not exist (with a hint when it looks like a hub id, since nothing
            is downloaded), is not a directory, or has no config.json.
    """
    directory = Path(path)
    if not directory.exists():
        if _HUB_ID.match(str(path)):
            raise ExportError(
                f"--hf {path}: no such local directory; portable-moe downloads nothing: fetch the checkpoint first "
                "(e.g. huggingface-cli download) and pass its directory"
            )
        raise ExportError(f"--hf {path}: no such directory; pass a checkpoint directory written by save_pretrained")
    if not directory.is_dir():
        raise ExportError(f"--hf {path}: not a directory; pass the checkpoint directory, not a file in it")
    if not (directory / CONFIG_NAME).is_file():
        raise ExportError(f"--hf {path}: no config.json; pass a checkpoint directory written by save_pretrained")
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict.

    Raises:
        ExportError: the file is not a JSON object.
    """
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"{directory / CONFIG_NAME}: not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{directory / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
    return config


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class CheckpointReader:
    """Lazy access to the tensors of a checkpoint directory.

    Attributes:
        directory: the checkpoint directory.
        block_size: FP8 scale block (rows, columns) from ``quantization_config.weight_block_size``,
            or None for a checkpoint that is not block-quantized.
        files_read: weight file name -> sha256, for every file a tensor was read from.
    """

    directory: Path
    block_size: tuple[int, int] | None = None
    files_read: dict[str, str] = field(default_factory=dict)
    _where: dict[str, str] = field(default_factory=dict, repr=False)
    _open: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: Path, config: dict[str, Any]) -> CheckpointReader:
        """Index the checkpoint's tensors (names and files only; no tensor is read).

        Raises:
            ExportError: no weights, an unreadable index, a shard the index names that is missing,
                or a safetensors file whose header cannot be read.
        """
        reader = cls(directory, block_size=_fp8_block_size(config))
        index_path, single_path = directory / INDEX_FILE, directory / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ExportError(f"{index_path}: not a safetensors index with a weight_map ({error})") from None
            missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
            if missing:
                raise ExportError(
                    f"{directory}: shard(s) {', '.join(missing)} named in {INDEX_FILE} are missing; "
                    "copy the complete checkpoint"
                )
            reader._where = dict(weight_map)
        elif single_path.is_file():
            reader._where = dict.fromkeys(reader._handle(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            raise ExportError(
                f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are supported "
                "(re-save with save_pretrained(..., safe_serialization=True))"
            )
        return reader

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def _handle(self, file_name: str) -> Any:
        if file_name not in self._open:
            from safetensors import safe_open

            path = self.directory / file_name
            try:
                self._open[file_name] = safe_open(str(path), framework="pt")
            except Exception as error:  # safetensors raises its own SafetensorError for corrupt headers
                raise ExportError(
                    f"{path}: not a readable safetensors file ({error}); the checkpoint is corrupt or truncated"
                ) from None
            self.files_read[file_name] = sha256_of(path)
        return self._open[file_name]

    def _raw(self, name: str) -> Any:
        file_name = self._where[name]
        try:
            return self._handle(file_name).get_tensor(name)
        except ExportError:
            raise
        except Exception as error:
            raise ExportError(
                f"{self.directory / file_name}: cannot read tensor {name!r} ({error}); the checkpoint is corrupt"
            ) from None

    def tensor(self, name: str, dtype: Any) -> Any:
        """Read one tensor as ``dtype``, dequantizing block-wise FP8 weights.

        Raises:
            ExportError: the tensor is missing, unreadable, or FP8 without its scale tensor.
        """
        import torch

        if name not in self._where:
            raise ExportError(f"{self.directory}: the checkpoint has no tensor {name!r}; it does not match its config")
        value = self._raw(name)
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self._where or self.block_size is None:
                raise ExportError(
                    f"{self.directory}: {name!r} is FP8 but the checkpoint has no {scale_name!r} or its config no "
                    "quantization_config.weight_block_size; only block-scaled FP8 is supported"
                )
            return dequantize_fp8_blocks(value, self._raw(scale_name), self.block_size).to(dtype)
        return value.to(dtype)

    def close(self) -> None:
        self._open.clear()


def _fp8_block_size(config: dict[str, Any]) -> tuple[int, int] | None:
    quantization = config.get("quantization_config") or {}
    block = quantization.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ExportError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def dequantize_fp8_blocks(weight: Any, scale_inv: Any, block_size: tuple[int, int]) -> Any:
    """``weight * scale_inv`` with one scale per (rows, columns) block, as float32.

    Args:
        weight: [out, in] FP8 tensor.
        scale_inv: [ceil(out / rows), ceil(in / columns)] float32 scales (edge blocks may be partial).
        block_size: (rows, columns) of a block.

    Raises:
        ExportError: the scale tensor's shape does not match the weight and block size.
    """
    import torch

    rows, columns = block_size
    out_features, in_features = weight.shape
    expected = (math.ceil(out_features / rows), math.ceil(in_features / columns))
    if tuple(scale_inv.shape) != expected:
        raise ExportError(
            f"FP8 scale of shape {list(scale_inv.shape)} does not fit a [{out_features}, {in_features}] weight in "
            f"{rows}x{columns} blocks (expected {list(expected)})"
        )
    scales = scale_inv.float().repeat_interleave(rows, dim=0)[:out_features]
    scales = scales.repeat_interleave(columns, dim=1)[:, :in_features]
    return weight.to(torch.float32) * scales
