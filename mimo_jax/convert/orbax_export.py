"""A Hugging Face checkpoint streamed into a params export, one checkpoint tensor at a time.

    config, out = stream_to_export("/ckpt/MiMo-V2-Flash", "/exports/mimo", param_dtype="bfloat16")

The output is the layout `checkpoint.export_params` writes (`model_config.json`, `params/` an
Orbax PyTree checkpoint, `tokenizer.json` when the Hugging Face directory has one), so
`load_checkpoint`, `init_from` (post-training, a pretraining stage) and `load_exported` read it,
and a restore with target shardings reads only the chunks each host's shards cover.

Host memory is bounded by the largest checkpoint tensor, not the model: each parameter is
created as an empty zarr array (tensorstore, Orbax's own array format) and filled block by block,
one block per checkpoint tensor (a layer of a scanned parameter, an expert of an expert
projection; `hf.leaf_pieces`), each read, converted (FP8 dequantised, transposed, cast) and
written before the next is read; the safetensors are read into buffers freed with each tensor,
not memory-mapped. Each block is its own chunk, cut further so that no chunk exceeds
`CHUNK_BYTES`, which keeps a sharded read close to what the shard holds.

The export is written under `<out>.partial` and renamed when complete: an interrupted or failed
conversion leaves no export that looks whole, and an existing `<out>` is kept unless `overwrite`.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts

from mimo_jax.config import ModelConfig, model_config_to_dict
from mimo_jax.convert import hf, hf_names
from mimo_jax.convert.errors import CheckpointError
from mimo_jax.convert.weights import WeightReader

PARAMS_DIR = "params"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"
PARTIAL_SUFFIX = ".partial"
# Largest zarr chunk written: a sharded restore reads whole chunks, so they stay small next to
# a device's shard of the full model's parameters.
CHUNK_BYTES = 64 * 2**20
# What Orbax's PyTree handler records for a checkpoint of zarr (v2) arrays without OCDBT.
_ORBAX_METADATA = {"use_ocdbt": False, "use_zarr3": False,
                   "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
_DICT_KEY = 2  # Orbax's key type of a dict entry


def chunk_shape(shape: tuple[int, ...], block_dims: int, itemsize: int) -> tuple[int, ...]:
    """Chunks of one block (the leading `block_dims` axes 1), the largest axis halved until a
    chunk holds at most `CHUNK_BYTES`."""
    chunk = [1] * block_dims + list(shape[block_dims:])
    while math.prod(chunk) * itemsize > CHUNK_BYTES and max(chunk) > 1:
        axis = int(np.argmax(chunk))
        chunk[axis] = -(-chunk[axis] // 2)
    return tuple(chunk)


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else dtype.str


def _open_array(directory: pathlib.Path, shape: tuple[int, ...], dtype: np.dtype,
                chunks: tuple[int, ...]) -> ts.TensorStore:
    return ts.open({
        "driver": "zarr", "kvstore": {"driver": "file", "path": str(directory)},
        "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": _zarr_dtype(dtype),
                     "compressor": {"id": "zstd", "level": 1}, "dimension_separator": "."},
        "create": True}).result()


def _block_dims(source: Any, weights: WeightReader) -> int:
    """How many leading axes index one checkpoint tensor's block of this parameter."""
    if isinstance(source, hf.Stacked):
        return 1 + _block_dims(source.sources[0], weights)
    if isinstance(source, hf_names.Experts) and source.fused_name() not in weights:
        return 1
    return 0


def _write_parameter(directory: pathlib.Path, source: Any, spec: jax.ShapeDtypeStruct,
                     weights: WeightReader) -> None:
    dtype = np.dtype(spec.dtype)
    chunks = chunk_shape(tuple(spec.shape), _block_dims(source, weights), dtype.itemsize)
    array = _open_array(directory, tuple(spec.shape), dtype, chunks)
    for index, block in hf.leaf_pieces(source, tuple(spec.shape), dtype, weights):
        array[index].write(block).result()
        del block  # freed before the next tensor is read


def _tree_metadata(paths: list[tuple[str, ...]], specs: dict) -> dict[str, Any]:
    return {str(path): {"key_metadata": [{"key": key, "key_type": _DICT_KEY} for key in path],
                        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                           "write_shape": list(specs[path].shape)}}
            for path in paths}


def stream_to_export(hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                     strict: bool = True, overwrite: bool = False, **overrides: Any
                     ) -> tuple[ModelConfig, pathlib.Path]:
    """Converts the Hugging Face checkpoint in `hf_dir` (float or the released FP8 layout) into
    a params export at `out_dir`; returns (its model config, the export's path).

    `overrides`: `ModelConfig` fields as `hf.load` takes them (`param_dtype` defaults to the
    checkpoint's dtype, `scan_layers` to True, `num_mtp_heads` to the heads it holds).
    `strict`: fail when a checkpoint tensor matches no parameter. Raises `CheckpointError`
    naming a missing tensor, a wrong shape, a bad config value or an existing `out_dir`.
    """
    hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out_dir).absolute()
    if not (hf_dir / hf.CONFIG_FILE).is_file():
        raise CheckpointError(f"{str(hf_dir)!r} is not a Hugging Face checkpoint directory (no "
                              f"{hf.CONFIG_FILE})")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {str(out)!r} already exists (pass overwrite to replace it)")
    config, reader, weights, specs, sources = hf.open_checkpoint(str(hf_dir), memory_map=False,
                                                                 **overrides)

    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if partial.exists():
        shutil.rmtree(partial)  # what an interrupted conversion left
    params_dir = partial / PARAMS_DIR
    params_dir.mkdir(parents=True)
    paths = sorted(specs)
    for path in paths:
        _write_parameter(params_dir / ".".join(path), sources[path], specs[path], weights)
    if strict:
        unused = hf.unused_tensors(reader, config)
        if unused:
            shutil.rmtree(partial)
            raise hf.unused_error(unused)
    (params_dir / "_METADATA").write_text(json.dumps(
        {"tree_metadata": _tree_metadata(paths, specs), **_ORBAX_METADATA}))
    (partial / MODEL_CONFIG_FILE).write_text(json.dumps(model_config_to_dict(config), indent=2))
    if (hf_dir / TOKENIZER_FILE).is_file():
        shutil.copy(hf_dir / TOKENIZER_FILE, partial / TOKENIZER_FILE)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return config, out
