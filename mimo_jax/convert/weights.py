"""Checkpoint tensors as float arrays: dtype checks and FP8 dequantisation in one place."""

from __future__ import annotations

import numpy as np

from mimo_jax.convert import fp8
from mimo_jax.convert.errors import CheckpointError
from mimo_jax.convert.safetensors_io import CheckpointReader

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FP8_DTYPES = ("F8_E4M3",)
SCALE_SUFFIX = "_scale_inv"


class WeightReader:
    """Reads weights by name from a `CheckpointReader`.

    Float tensors come back in their stored dtype (a read-only view); FP8 e4m3 tensors come back
    as float32, dequantised with their `<name>_scale_inv` block scales. Anything else (integer
    tensors, unknown dtypes, FP8 without scales) raises a `CheckpointError` naming the tensor.
    """

    def __init__(self, reader: CheckpointReader, block: tuple[int, int]):
        self.reader = reader
        self.block = block

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def first_present(self, names: tuple[str, ...]) -> str:
        """The first of `names` the checkpoint holds; a missing-tensor error naming all if none."""
        for name in names:
            if name in self.reader:
                return name
        alternatives = f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
        raise CheckpointError(f"missing tensor {names[0]!r}{alternatives} in "
                              f"{self.reader.directory}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.info(name).shape

    def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as floats after checking its shape against `expected_shape`."""
        info = self.reader.info(name)
        if info.shape != tuple(expected_shape):
            raise CheckpointError(f"tensor {name!r} has shape {info.shape} but the config needs "
                                  f"{tuple(expected_shape)}")
        if info.dtype in FLOAT_DTYPES:
            return self.reader.get(name)
        if info.dtype in FP8_DTYPES:
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self.reader:
                raise CheckpointError(f"tensor {name!r} is {info.dtype} but the checkpoint has no "
                                      f"{scale_name!r} block scales to dequantise it")
            scale = self.reader.get(scale_name)
            if self.reader.info(scale_name).dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor {scale_name!r} has dtype "
                                      f"{self.reader.info(scale_name).dtype}; scales must be floats")
            return fp8.dequantize(self.reader.get(name), scale, self.block, name)
        raise CheckpointError(
            f"tensor {name!r} has dtype {info.dtype}, which cannot hold weights (expected one of "
            f"{', '.join(FLOAT_DTYPES)}, or {', '.join(FP8_DTYPES)} with {SCALE_SUFFIX} scales)")
