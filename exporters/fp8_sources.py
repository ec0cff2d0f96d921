"""FP8 checkpoints (DeepSeek-V3's layout) as a source of int8/int4 weights.

DeepSeek-V3 stores each linear weight ``[out, in]`` as FP8 e4m3 codes with one float32
``weight_scale_inv`` per 128x128 tile: the real weight is ``e4m3 * scale_inv`` tile by tile. ONNX
runtimes and Ascend chips have no FP8 matrix kernels, so such a checkpoint is either dequantized to
a float format or requantized into int8/int4 blocks; :func:`requantize_fp8_blocks` does the latter
keeping each block's FP8 scale, :func:`dequantize_fp8_blocks` the former.

At export the checkpoint is loaded dequantized (the torch model needs float weights), so the
weight-format pass sees float32 initializers. :class:`FP8Sources` finds which of them came from
an FP8 weight (by value: the exported weight is that weight's exact float32 dequantization) so
that the pass can take their int8/int4 codes and scales from the FP8 blocks instead.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from exporters.weight_formats import get_weight_format, quantize
from portable_moe.errors import ExportError


def decode_float8_e4m3(codes: np.ndarray) -> np.ndarray:
    """FP8 e4m3 (the "fn" variant DeepSeek-V3 stores: no infinities, 0x7f/0xff are NaN) bytes to float32.

    Args:
        codes: uint8 bit patterns.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = ((codes >> 3) & 0x0F).astype(np.int32)
    mantissa = (codes & 0x07).astype(np.float64)
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8.0) * np.exp2(-6.0)
    values = sign * np.where(exponent == 0, subnormal, normal)
    values = np.where((codes & 0x7F) == 0x7F, np.nan, values)
    return values.astype(np.float32)


def _checked_fp8(
    fp8_weight: np.ndarray, scale_inv: np.ndarray, fp8_block: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The decoded e4m3 values and each element's tile scale, after checking shapes and codes."""
    rows, columns = fp8_weight.shape
    tile_rows, tile_columns = fp8_block
    expected = (math.ceil(rows / tile_rows), math.ceil(columns / tile_columns))
    if scale_inv.shape != expected:
        raise ExportError(
            f"FP8 scale_inv has shape {list(scale_inv.shape)}, expected {list(expected)} for a {[rows, columns]} "
            f"weight in {tile_rows}x{tile_columns} tiles"
        )
    values = decode_float8_e4m3(fp8_weight)
    if np.isnan(values).any():
        raise ExportError("the FP8 weight holds NaN codes (0x7f/0xff); the checkpoint is damaged")
    tile_scales = np.repeat(np.repeat(scale_inv.astype(np.float32), tile_rows, 0)[:rows], tile_columns, 1)
    return values, tile_scales[:, :columns]


def dequantize_fp8_blocks(
    fp8_weight: np.ndarray, scale_inv: np.ndarray, fp8_block: tuple[int, int] = (128, 128)
) -> np.ndarray:
    """The real float32 weight of a block-wise FP8 weight: ``e4m3 * scale_inv`` tile by tile.

    For float formats: the result goes through the weight-format pass like any float32 weight.

    Raises:
        ExportError: for a ``scale_inv`` that does not fit the tiles, or NaN codes.
    """
    values, tile_scales = _checked_fp8(fp8_weight, scale_inv, fp8_block)
    return (values * tile_scales).astype(np.float32)


def requantize_fp8_blocks(
    fp8_weight: np.ndarray,
    scale_inv: np.ndarray,
    weights: str,
    block_size: int,
    fp8_block: tuple[int, int] = (128, 128),
) -> tuple[np.ndarray, np.ndarray]:
    """Requantize a block-wise FP8 weight (DeepSeek-V3's layout) into int8/int4 blocks.

    The FP8 checkpoint stores ``weight [out, in]`` as e4m3 codes and one ``scale_inv`` per
    ``fp8_block`` tile: the real weight is ``e4m3 * scale_inv``. Each new block (``block_size``
    inputs of one output row) lies inside one FP8 tile when ``block_size`` divides the tile's
    width, so its scale is the tile's ``scale_inv`` times the block's own e4m3 range: the FP8
    scales carry over and only the e4m3 values are rounded again.

    Args:
        fp8_weight: uint8 e4m3 bit patterns, ``[out, in]``.
        scale_inv: float32 ``[ceil(out / 128), ceil(in / 128)]``.
        weights: "int8" or "int4".
        block_size: inputs per new block; must divide ``fp8_block[1]`` (0: per output channel,
            which spans tiles and therefore rescales across them).
        fp8_block: the FP8 tile (rows, columns).

    Returns:
        ``(codes, scales)`` as :func:`quantize` returns them for axis 1 (the input axis).

    Raises:
        ExportError: for a float format, shapes that do not fit the tiles, a block that straddles
            tiles, or NaN codes.
    """
    weight_format = get_weight_format(weights)
    if not weight_format.quantized:
        raise ExportError(f"FP8 blocks requantize to int8 or int4, not {weights}; use dequantize_fp8_blocks")
    values, tile_scales = _checked_fp8(fp8_weight, scale_inv, fp8_block)
    columns = values.shape[1]
    if block_size == 0:
        return quantize(values * tile_scales, weight_format.bits, 0, axis=1)
    if fp8_block[1] % block_size or columns % block_size:
        raise ExportError(
            f"block size {block_size} must divide the FP8 tile width {fp8_block[1]} and the input size "
            f"{columns} so that each block keeps one FP8 scale"
        )
    codes, relative = quantize(values, weight_format.bits, block_size, axis=1)
    return codes, (relative * tile_scales[:, ::block_size]).astype(np.float32)


def _value_key(matrix: np.ndarray) -> tuple[tuple[int, ...], str]:
    """A 2-D float32 ``[out, in]`` weight's shape and a digest of its bytes."""
    data = np.ascontiguousarray(matrix, dtype=np.float32)
    return data.shape, hashlib.sha256(data.tobytes()).hexdigest()


class FP8Sources:
    """The block-wise FP8 weights of a checkpoint, found by their dequantized value.

    Holds one digest per FP8 weight, not the weights: codes and scales are read again from the
    checkpoint for the weights the pass converts.

    Args:
        read_blocks: FP8 weight name -> ``(uint8 e4m3 codes [out, in], float32 scale_inv)``.
        names: the FP8 weights' names.
        tile: the FP8 tile (rows, columns), ``quantization_config.weight_block_size``.
    """

    def __init__(
        self, read_blocks: Callable[[str], tuple[np.ndarray, np.ndarray]], names: list[str], tile: tuple[int, int]
    ) -> None:
        self.read_blocks = read_blocks
        self.tile = tile
        self._names = {_value_key(dequantize_fp8_blocks(*read_blocks(name), tile)): name for name in names}

    def __len__(self) -> int:
        return len(self._names)

    def fallback_reason(self, weights: str, block_size: int) -> str | None:
        """Why int8/int4 blocks of ``block_size`` cannot keep the FP8 scales, or None when they can."""
        if not get_weight_format(weights).quantized:
            return f"{weights} weights are float: the FP8 blocks are dequantized"
        if not block_size:
            return (
                f"one {weights} scale per output channel spans {self.tile[0]}x{self.tile[1]} FP8 tiles: "
                "quantized from the dequantized weights"
            )
        if self.tile[1] % block_size:
            return (
                f"block size {block_size} does not divide the FP8 tile width {self.tile[1]}: quantized from the "
                f"dequantized weights (give --block-size {self.tile[1]} or a divisor of it to keep the FP8 scales)"
            )
        return None

    def _matrix_codes(self, matrix: np.ndarray, weights: str, block_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        name = self._names.get(_value_key(matrix))
        if name is None:
            return None
        return requantize_fp8_blocks(*self.read_blocks(name), weights, block_size, self.tile)

    def quantize(
        self, array: np.ndarray, axis: int, weights: str, block_size: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """:func:`quantize`'s ``(codes, scales)`` for a weight that came from FP8 blocks, keeping their scales.

        ``array`` is an exported float32 weight with reduction axis ``axis``: a 2-D matrix, or a stack
        of matrices along its leading axes (expert weights). Returns None when it (or one matrix of the
        stack) is not the dequantization of an FP8 weight; call only when :meth:`fallback_reason` is None.
        """
        axis = axis % array.ndim
        if array.ndim < 2 or axis < array.ndim - 2:
            return None
        # [..., out, in]: the FP8 layout, with the reduction axis last.
        moved = np.moveaxis(array, axis, -1)
        matrices = moved.reshape(-1, *moved.shape[-2:])
        parts = [self._matrix_codes(matrix, weights, block_size) for matrix in matrices]
        if any(part is None for part in parts):
            return None
        codes = np.stack([codes for codes, _ in parts]).reshape(moved.shape)
        scales = np.stack([scales for _, scales in parts])
        scales = scales.reshape(*moved.shape[:-1], scales.shape[-1])
        return np.moveaxis(codes, -1, axis), np.moveaxis(scales, -1, axis)


def fp8_sources_of_checkpoint(directory: str | Path) -> FP8Sources | None:
    """The block-wise FP8 (e4m3) weights of a Hugging Face checkpoint, or None when it holds none.

    Raises:
        ExportError: an unreadable checkpoint (as loading it would).
    """
    from exporters.hf.checkpoint import SCALE_SUFFIX, CheckpointReader, checkpoint_directory, read_config

    directory = checkpoint_directory(directory)
    reader = CheckpointReader.open(directory, read_config(directory))
    if reader.block_size is None:
        return None
    names = [name[: -len(SCALE_SUFFIX)] for name in reader.keys() if name.endswith(SCALE_SUFFIX)]
    names = [name for name in names if name in reader and reader.dtype_of(name) == "F8_E4M3"]
    if not names:
        return None

    def read_blocks(name: str) -> tuple[np.ndarray, np.ndarray]:
        import torch

        codes = reader.raw(name).view(torch.uint8).numpy()
        return codes, reader.raw(name + SCALE_SUFFIX).float().numpy()

    return FP8Sources(read_blocks, names, reader.block_size)
