"""Block-scaled FP8 weights (DeepSeek-V3 convention): dequantised on load, quantised on export.

A weight W [R, C] is stored as `W_fp8` (float8 e4m3) plus `weight_scale_inv` [ceil(R/bR), ceil(C/bC)]
with W[i, j] = W_fp8[i, j] * scale_inv[i // bR, j // bC]. The last block row/column may be partial
when R or C is not a multiple of the block. Leading dimensions (e.g. a fused [E, R, C] expert
tensor) carry one scale grid each.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from mimo_jax.convert.errors import CheckpointError

DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The block-scale grid a weight of `shape` needs: [..., ceil(R/bR), ceil(C/bC)]."""
    if len(shape) < 2:
        raise CheckpointError(f"a block-scaled FP8 weight needs >= 2 dims, got shape {shape}")
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
               name: str = "weight") -> np.ndarray:
    """float32 W = W_fp8 * scale_inv expanded over its blocks (edge blocks cut to size)."""
    expected = scale_shape(weight.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"tensor {name!r}_scale_inv has shape {tuple(scale_inv.shape)} but weight shape "
            f"{tuple(weight.shape)} with {block[0]}x{block[1]} blocks needs {expected}")
    rows, cols = weight.shape[-2:]
    scale = np.asarray(scale_inv, np.float32)
    expanded = np.repeat(np.repeat(scale, block[0], axis=-2), block[1], axis=-1)
    return weight.astype(np.float32) * expanded[..., :rows, :cols]


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value


def quantize(weight: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `dequantize`: per-block absmax scaling into float8 e4m3.

    Each block's largest magnitude maps to 448; an all-zero block gets a tiny scale (its values
    stay 0). Returns (W_fp8 with `weight`'s shape, scale_inv float32 [..., ceil(R/bR), ceil(C/bC)]).
    """
    weight = np.asarray(weight, np.float32)
    grid = scale_shape(weight.shape, block)
    rows, cols = weight.shape[-2:]
    lead = weight.shape[:-2]
    padded = np.zeros((*lead, grid[-2] * block[0], grid[-1] * block[1]), np.float32)
    padded[..., :rows, :cols] = weight
    blocks = padded.reshape(*lead, grid[-2], block[0], grid[-1], block[1])
    scale = np.maximum(np.abs(blocks).max(axis=(-3, -1)), 1e-12) / E4M3_MAX
    quantized = (blocks / scale[..., :, None, :, None]).reshape(padded.shape)[..., :rows, :cols]
    return quantized.astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32)
