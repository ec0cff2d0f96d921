"""FP8 checkpoints (DeepSeek-V3's layout) as a source of int8/int4 weights.

DeepSeek-V3 stores each linear weight ``[out, in]`` as FP8 e4m3 codes with one float32
``weight_scale_inv`` per 128x128 tile: the real weight is ``e4m3 * scale_inv`` tile by tile. ONNX
runtimes and Ascend chips have no FP8 matrix kernels, so such a checkpoint is either dequantized to
a float format or requantized into int8/int4 blocks; :func:`requantize_fp8_blocks` does the latter
keeping each block's FP8 scale, :func:`dequantize_fp8_blocks` the former.
"""

from __future__ import annotations

import math

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
