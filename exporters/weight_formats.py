"""Weight formats: how a bundle stores its weights, and the quantization arithmetic behind them.

The pass runs on the graph the exporter wrote, so it does not care how the graph was made (which
MoE lowering, which source). It finds the weights of matrix products that are initializers (the
``B`` input of ``MatMul`` and ``Gemm``, the expert weights of ``com.microsoft::MoE``), keeps the
router float32 (the weight of the first matrix product upstream of every routing ``TopK``, as
DeepSeek's inference keeps it) and rewrites each other weight:

- ``float16`` / ``bfloat16``: the weight is stored in that type and ``Cast`` back to float32, so
  activations stay float32 and every op sees the dtype it was exported with.
- ``int8`` / ``int4``: symmetric quantization (no zero point), one float32 scale per block of
  ``block_size`` elements along the reduction axis, or per output channel when ``block_size`` is
  0. Two kernels:

  * ``dequantize`` (standard ONNX, every backend): ``DequantizeLinear`` then the original op.
    Per-channel scales use the per-axis form (opset 13); blocks use ``block_size`` (opset 21, so
    the model's opset is raised to 21), as does int4 storage.
  * ``matmulnbits`` (ONNX Runtime's contrib operators, the fast path for ORT backends): each 2-D
    ``MatMul``/``Gemm`` weight becomes one ``com.microsoft::MatMulNBits`` (dequantize and multiply
    fused), and the fused lowering's ``com.microsoft::MoE`` node becomes one ``com.microsoft::QMoE``
    with the same routing, which reads only the selected experts' codes; the weights neither can
    take (3-D expert stacks of the dense and capacity lowerings) fall back to ``dequantize``. Both
    carry :data:`MATMULNBITS_ACCURACY_LEVEL` (int8 activations, see there).

Both kernels hold the same codes and scales, so they compute with the same dequantized weights.
The pass itself is :mod:`exporters.weight_pass` (:func:`~exporters.weight_pass.convert_weights`
on a model, :func:`~exporters.weight_pass.convert_bundle` on a written bundle); the manifest
records every initializer's format.

:func:`exporters.fp8_sources.requantize_fp8_blocks` takes a DeepSeek-V3-style FP8 (e4m3) weight
with 128x128 block scales straight into int8/int4 blocks, for checkpoints that arrive in FP8; the
pass does so for the weights :class:`exporters.fp8_sources.FP8Sources` finds, when the blocks fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from portable_moe.errors import ExportError

# The ai.onnx opset that brought DequantizeLinear's block_size and the int4 type.
BLOCKED_OPSET = 21
# MatMulNBits takes blocks of a power of two of at least 16 elements; the standard form takes the same.
MIN_BLOCK_SIZE = 16
KERNELS = ("dequantize", "matmulnbits")
# MatMulNBits' accuracy_level 4 lets ONNX Runtime quantize each block of activations to int8 and use its
# integer dot-product kernels; levels 0-1 keep float32 activations and dequantize weights on the fly. On
# ONNX Runtime 1.32 CPU (AVX2, no VNNI) one int4 1024x1024 product at one row took 4x (medians) to 20x
# (fastest calls) less time at level 4 than at level 0 (which was no faster than float32), and an int8 one
# about 30x less (level 0 has no fast 8-bit path). It is also the level ONNX Runtime's own rewrite of DequantizeLinear+MatMul picks on CPU,
# so both kernels now compute with int8 activations there (see docs/benchmarks.md, "weight formats").
MATMULNBITS_ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class WeightFormat:
    """A weight storage format.

    Attributes:
        name: what users pass to ``--weights``.
        bits: bits per stored weight.
        quantized: True for integer codes with scales.
        default_block_size: the block size when none is given (0: one scale per output channel).
        summary: one line for help text.
    """

    name: str
    bits: int
    quantized: bool
    default_block_size: int
    summary: str

    @property
    def qmax(self) -> int:
        """The largest code magnitude of the symmetric quantization (127 for int8, 7 for int4)."""
        return 2 ** (self.bits - 1) - 1


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("float32", 32, False, 0, "as exported (the reference)"),
        WeightFormat("float16", 16, False, 0, "IEEE half precision, cast to float32 before use"),
        WeightFormat("bfloat16", 16, False, 0, "bfloat16 (float32's exponent, 8-bit mantissa), cast to float32"),
        WeightFormat("int8", 8, True, 0, "symmetric int8 codes, per-channel scales by default (W8A16)"),
        WeightFormat("int4", 4, True, 32, "symmetric int4 codes, one scale per block of 32 inputs by default"),
    )
}


def get_weight_format(name: str) -> WeightFormat:
    """Return the named weight format.

    Raises:
        ExportError: if there is none by that name (the message lists the names that exist).
    """
    try:
        return WEIGHT_FORMATS[name]
    except KeyError:
        raise ExportError(f"unknown weight format {name!r}; formats: {', '.join(WEIGHT_FORMATS)}") from None


def format_key(name: str, block_size: int = 0) -> str:
    """The key backends declare formats by: "float16", "int8/channel", "int4/block", ...

    Quantized formats split by granularity because runtimes differ there (Ascend-style W8A16
    takes per-channel scales only).
    """
    if not get_weight_format(name).quantized:
        return name
    return f"{name}/{'block' if block_size else 'channel'}"


def resolve_block_size(weights: str, block_size: int | None) -> int:
    """The block size to use: the format's default when None; checked otherwise.

    Raises:
        ExportError: for a block size given with a float format, or one that is neither 0
            (per-channel) nor a power of two of at least 16.
    """
    weight_format = get_weight_format(weights)
    if block_size is None:
        return weight_format.default_block_size
    if not weight_format.quantized:
        if block_size:
            raise ExportError(f"--block-size applies to int8 and int4 weights, not {weights}; leave it out")
        return 0
    if block_size == 0 and weight_format.bits == 4:
        raise ExportError(
            "int4 weights need blocks: one scale per output channel changed the expert set of 88-97% of the small "
            "preset's tokens (see docs/benchmarks.md); give --block-size 32 (or 64, 128)"
        )
    if block_size != 0 and (block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1)):
        raise ExportError(
            f"block size {block_size} is not a power of two of at least {MIN_BLOCK_SIZE}; use e.g. 32, 64 or 128 "
            "(or 0 for one scale per output channel)"
        )
    return block_size


def _blocks_view(weight: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, int]:
    """``weight`` with ``axis`` moved last and split into blocks: ``[..., blocks, block]``."""
    moved = np.moveaxis(weight, axis, -1)
    length = moved.shape[-1]
    size = block_size or length
    return moved.reshape(*moved.shape[:-1], length // size, size), size


def quantize(weight: np.ndarray, bits: int, block_size: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization with one scale per block along ``axis`` (the reduction axis).

    Args:
        weight: float weights.
        bits: 8 or 4.
        block_size: elements per block along ``axis``; 0 for one block spanning the whole axis
            (one scale per output channel).
        axis: the reduction axis (the one a matrix product sums over).

    Returns:
        ``(codes, scales)``: int8 codes of ``weight``'s shape in ``[-qmax, qmax]``; float32
        scales of ``weight``'s shape with ``axis`` divided by the block size (1 per channel).
        ``codes * scales`` (scales repeated over each block) is the dequantized weight.

    Raises:
        ExportError: if the block size does not divide the axis.
    """
    axis = axis % weight.ndim
    length = weight.shape[axis]
    if block_size and length % block_size:
        raise ExportError(
            f"block size {block_size} does not divide the reduction axis ({length}) of a {list(weight.shape)} "
            "weight; choose a block size that divides it, or 0 for per-channel scales"
        )
    qmax = 2 ** (bits - 1) - 1
    blocks, _ = _blocks_view(weight.astype(np.float32), axis, block_size)
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    scales = np.where(largest > 0, largest / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales), -qmax, qmax).astype(np.int8)
    codes = np.moveaxis(codes.reshape(*codes.shape[:-2], length), -1, axis)
    scales = np.moveaxis(scales[..., 0], -1, axis)
    return codes, scales


def dequantize(codes: np.ndarray, scales: np.ndarray, block_size: int, axis: int) -> np.ndarray:
    """The inverse of :func:`quantize`: ``codes * scales`` with each scale repeated over its block."""
    axis = axis % codes.ndim
    repeat = block_size or codes.shape[axis]
    return (codes.astype(np.float32) * np.repeat(scales, repeat, axis=axis)).astype(np.float32)


@dataclass(frozen=True)
class WeightPlan:
    """A checked choice of weight format, block size and kernel (see :func:`plan_weights`)."""

    weights: str
    block_size: int
    kernel: str

    @property
    def key(self) -> str:
        return format_key(self.weights, self.block_size)


def plan_weights(weights: str = "float32", block_size: int | None = None, kernel: str = "dequantize") -> WeightPlan:
    """Check a weight format request at the door (before any slow work).

    Raises:
        ExportError: unknown format or kernel, a bad block size, or a kernel that does not fit the format.
    """
    weight_format = get_weight_format(weights)
    resolved = resolve_block_size(weights, block_size)
    if kernel not in KERNELS:
        raise ExportError(f"unknown weight kernel {kernel!r}; kernels: {', '.join(KERNELS)}")
    if kernel == "matmulnbits" and not weight_format.quantized:
        raise ExportError(f"the matmulnbits kernel is for int8 and int4 weights, not {weights}; leave it at dequantize")
    if kernel == "matmulnbits" and not resolved:
        raise ExportError("MatMulNBits takes block-wise scales only: give --block-size (e.g. 32), not 0")
    return WeightPlan(weights, resolved, kernel)
