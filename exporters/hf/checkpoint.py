"""Reading a Hugging Face checkpoint directory: config.json and safetensors weights, lazily.

A checkpoint is a local directory as ``save_pretrained`` writes it: ``config.json`` and either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Nothing is downloaded:
a path that is not a directory is refused, with a hint when it looks like a hub id.

Tensors are read one at a time when asked for, straight from the file into the tensor's memory
(the safetensors header gives each tensor's dtype, shape and byte range). Nothing is memory-mapped,
so loading holds one copy of the weights, not the weights plus the mapped files. Block-wise FP8 weights (DeepSeek-V3's published format:
``float8_e4m3fn`` weights with a ``<name>_scale_inv`` float32 tensor of one scale per
``weight_block_size`` block) are dequantized as they are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_moe.errors import ExportError

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_HEADER_BYTES = 100 << 20
# safetensors dtype names -> torch dtype attribute names.
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


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
    _headers: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict, repr=False)

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
            reader._where = dict.fromkeys(reader._header(SINGLE_FILE)[0], SINGLE_FILE)
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

    def _header(self, file_name: str) -> tuple[dict[str, Any], int]:
        """(tensor name -> {dtype, shape, data_offsets}, where the data starts), read once per file."""
        if file_name not in self._headers:
            path = self.directory / file_name
            self._headers[file_name] = read_safetensors_header(path)
            self.files_read[file_name] = sha256_of(path)
        return self._headers[file_name]

    def dtype_of(self, name: str) -> str:
        """The safetensors dtype of a tensor the checkpoint holds ("BF16", "F8_E4M3", ...)."""
        return self._header(self._where[name])[0].get(name, {}).get("dtype", "")

    def raw(self, name: str) -> Any:
        """One tensor as stored (a torch tensor of the file's dtype)."""
        import torch

        file_name = self._where[name]
        header, data_start = self._header(file_name)
        if name not in header:
            raise ExportError(
                f"{self.directory / file_name}: has no tensor {name!r}, which {INDEX_FILE} places there; the "
                "checkpoint is incomplete"
            )
        entry = header[name]
        begin, end = entry["data_offsets"]
        dtype = getattr(torch, _DTYPES[entry["dtype"]])
        # Read into a torch allocation (aligned as any tensor is, so kernels take their usual paths).
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with (self.directory / file_name).open("rb") as stream:
            stream.seek(data_start + begin)
            if stream.readinto(raw.numpy()) != end - begin:
                raise ExportError(
                    f"{self.directory / file_name}: truncated while reading {name!r}; the checkpoint is corrupt"
                )
        return raw.view(dtype).reshape(entry["shape"])

    def tensor(self, name: str, dtype: Any) -> Any:
        """Read one tensor as ``dtype``, dequantizing block-wise FP8 weights.

        Raises:
            ExportError: the tensor is missing, unreadable, or FP8 without its scale tensor.
        """
        import torch

        if name not in self._where:
            raise ExportError(f"{self.directory}: the checkpoint has no tensor {name!r}; it does not match its config")
        value = self.raw(name)
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self._where or self.block_size is None:
                raise ExportError(
                    f"{self.directory}: {name!r} is FP8 but the checkpoint has no {scale_name!r} or its config no "
                    "quantization_config.weight_block_size; only block-scaled FP8 is supported"
                )
            return dequantize_fp8_blocks(value, self.raw(scale_name), self.block_size).to(dtype)
        return value.to(dtype)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors file's header without reading any tensor.

    Returns:
        (tensor name -> {"dtype", "shape", "data_offsets"}, the byte offset where tensor data starts).

    Raises:
        ExportError: the file is not a safetensors file, or names a dtype, shape or byte range that
            does not fit it.
    """
    problem = f"{path}: not a readable safetensors file"
    size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
            raise ExportError(
                f"{problem} (header length {length} for a file of {size} bytes); the checkpoint is corrupt or truncated"
            )
        try:
            header = json.loads(stream.read(length))
        except ValueError as error:
            raise ExportError(
                f"{problem} (header is not JSON: {error}); the checkpoint is corrupt or truncated"
            ) from None
    if not isinstance(header, dict):
        raise ExportError(f"{problem} (header is not a JSON object); the checkpoint is corrupt or truncated")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            count = math.prod(entry["shape"])
            width = _width(entry["dtype"])
        except (KeyError, TypeError, ValueError) as error:
            raise ExportError(f"{problem} (entry {name!r}: {error}); the checkpoint is corrupt or truncated") from None
        if not (0 <= begin <= end <= data_size and end - begin == count * width):
            raise ExportError(
                f"{problem} (tensor {name!r} claims bytes {begin}..{end} of {data_size}); the checkpoint is corrupt or "
                "truncated"
            )
    return header, 8 + length


def _width(dtype: str) -> int:
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)


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
