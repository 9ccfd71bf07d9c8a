"""Hugging Face checkpoints in and out: the public API.

    from mimo_jax.convert import hf
    model, params = hf.load(hf_dir)                 # any override: hf.load(d, dtype="bfloat16")
    out = model.apply({"params": params}, tokens)   # out.logits [B, T, V]
    hf.save(model.config, params, out_dir)          # MiMoV2FlashForCausalLM.from_pretrained(out_dir)

`load` reads `config.json` in the released (hub) or the transformers spelling, and the weights
from `model.safetensors` or shards listed in `model.safetensors.index.json`, one tensor at a time:
each parameter is assembled in its final dtype, moved to the device, and its host copy dropped, so
host memory peaks near one (stacked) parameter, not the model. FP8 weights with block scales are
dequantised on the way. `save` writes transformers' layout (per-expert names, `attention_sink_bias`,
MTP heads under `model.mtp.layers.{k}`) and a transformers-form `config.json`; with `fp8_block`
it stores the release's FP8 tensors block-quantised, as the release does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mimo_jax.config import ModelConfig, replace_model
from mimo_jax.convert import fp8, hf_config, hf_names
from mimo_jax.convert.errors import CheckpointError
from mimo_jax.convert.safetensors_io import (DTYPES, CheckpointReader, PendingTensor,
                                             write_checkpoint)
from mimo_jax.convert.weights import SCALE_SUFFIX, WeightReader
from mimo_jax.model import layout
from mimo_jax.model.transformer import MiMoV2Flash, init_params

__all__ = ["CheckpointError", "load", "save", "read_config", "abstract_params"]

CONFIG_FILE = "config.json"


def read_config(hf_dir: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory (the MTP count read from its tensor names)."""
    hf_cfg = _read_json(hf_dir)
    reader = CheckpointReader(hf_dir)
    return hf_config.from_hf(hf_cfg, hf_names.count_mtp_heads(reader.names()), **overrides)


def _read_json(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"no {CONFIG_FILE} in {hf_dir}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON ({err})") from err


def abstract_params(config: ModelConfig) -> dict:
    """Shapes and dtypes of every parameter (MTP heads included) as `jax.ShapeDtypeStruct`s;
    allocates nothing. Returns a fresh tree (the trace behind it is cached per config)."""
    return jax.tree.map(lambda spec: spec, _traced_params(config))


@functools.lru_cache(maxsize=8)
def _traced_params(config: ModelConfig) -> dict:
    # Tracing the full model's init takes seconds; load and save each need it.
    return jax.eval_shape(functools.partial(init_params, MiMoV2Flash(config)), jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class Stacked:
    """The sources of one scanned parameter, one per layer of its run (stacked on axis 0)."""

    sources: tuple


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    return traverse_util.unflatten_dict(flat)


def source_tree(config: ModelConfig) -> dict[tuple[str, ...], Any]:
    """Flat {parameter path: source}, shaped like the parameter tree of `config`."""
    per_layer = [_nest(hf_names.layer_sources(config, i)) for i in range(config.num_layers)]
    decoder = layout.stack_layers(per_layer, config, stack=Stacked)
    tree = _nest(hf_names.top_sources())
    tree["decoder"] = decoder
    for k in range(config.num_mtp_heads):
        tree[f"mtp_{k}"] = _nest(hf_names.mtp_sources(config, k))
    return traverse_util.flatten_dict(tree)


def _path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def match_paths(sources: dict, specs: dict, what: str) -> None:
    """Raises `CheckpointError` listing the paths only one of `sources` and `specs` has."""
    missing = sorted(set(specs) - set(sources))
    extra = sorted(set(sources) - set(specs))
    if missing or extra:
        raise CheckpointError(
            f"{what}: parameters without a checkpoint name {[_path_str(p) for p in missing]}; "
            f"names without a parameter {[_path_str(p) for p in extra]}")


def leaf_pieces(source: Any, shape: tuple[int, ...], dtype: np.dtype, weights: WeightReader
                ) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """A parameter's values in (index, block) pairs, `block` being `parameter[index]`: one per
    layer of a scanned parameter and, within it, one per expert of an expert projection stored
    per expert; otherwise the whole parameter at index (). Each block is read when reached, so
    a caller that writes and drops it holds one checkpoint tensor at a time."""
    if isinstance(source, Stacked):
        for j, layer_source in enumerate(source.sources):
            for index, block in leaf_pieces(layer_source, shape[1:], dtype, weights):
                yield (j, *index), block
    elif isinstance(source, hf_names.Experts):
        yield from source.pieces(weights, shape, dtype)
    else:
        yield (), source.load(weights, shape, dtype)


def _load_leaf(source: Any, spec: jax.ShapeDtypeStruct, weights: WeightReader) -> np.ndarray:
    out = None
    for index, block in leaf_pieces(source, spec.shape, np.dtype(spec.dtype), weights):
        if not index:
            return block
        if out is None:
            out = np.empty(spec.shape, spec.dtype)
        out[index] = block
    return out


def unused_tensors(reader: CheckpointReader, config: ModelConfig) -> list[str]:
    """Tensors of the checkpoint that no parameter of `config` read (the ones a MiMo
    checkpoint may hold without a parameter excepted)."""
    return [n for n in reader.unused() if not _ignorable(n, config.num_mtp_heads)]


def unused_error(unused: list[str]) -> CheckpointError:
    shown = ", ".join(repr(n) for n in unused[:8])
    more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
    return CheckpointError(f"{len(unused)} checkpoint tensor(s) match no parameter of this "
                           f"config: {shown}{more} (pass strict=False to ignore them)")


def _ignorable(name: str, num_mtp_heads: int) -> bool:
    if name.startswith(hf_names.IGNORED_PREFIXES):
        return True
    if name.startswith(hf_names.MTP_PREFIX):
        head = name[len(hf_names.MTP_PREFIX):].split(".", 1)[0]
        return head.isdigit() and int(head) >= num_mtp_heads  # heads the caller chose to drop
    return False


class OpenedCheckpoint(NamedTuple):
    """A checkpoint ready to read parameter by parameter (nothing read yet).

    config: the model config (with the caller's overrides). reader / weights: its tensors.
    specs / sources: {parameter path: ShapeDtypeStruct} and {parameter path: its source}.
    """

    config: ModelConfig
    reader: CheckpointReader
    weights: WeightReader
    specs: dict
    sources: dict


def open_checkpoint(hf_dir: str, *, memory_map: bool = True,
                    **overrides: Any) -> OpenedCheckpoint:
    """The config, tensor readers and parameter-to-tensor mapping of a checkpoint directory,
    as `load` and the streaming converter (`orbax_export`) read it; `memory_map`: see
    `CheckpointReader`. Raises `CheckpointError` as `load` does."""
    config = read_config(hf_dir, **overrides)
    reader = CheckpointReader(hf_dir, memory_map=memory_map)
    weights = WeightReader(reader, hf_config.quantization_block(_read_json(hf_dir)))
    specs = traverse_util.flatten_dict(abstract_params(config))
    sources = source_tree(config)
    match_paths(sources, specs, "model/checkpoint mapping")
    return OpenedCheckpoint(config, reader, weights, specs, sources)


def load(hf_dir: str, *, strict: bool = True, shardings: Any = None,
         **overrides: Any) -> tuple[MiMoV2Flash, dict]:
    """Reads a Hugging Face MiMo-V2-Flash checkpoint directory.

    Args:
      hf_dir: a directory with `config.json` and `*.safetensors` (sharded or not).
      strict: fail when the checkpoint holds tensors that no parameter uses.
      shardings: optional pytree of `jax.sharding.Sharding` shaped like the params; each parameter
        is placed with `jax.device_put` as soon as it is read.
      **overrides: `ModelConfig` fields to change (param_dtype, scan_layers, num_mtp_heads, ...)
        and `RuntimeConfig` fields, which go to `model.config.runtime` (dtype, attention_impl,
        moe_impl, remat_policy, ...). `param_dtype` and `dtype` default to the checkpoint's
        `dtype`/`torch_dtype`; the router and its bias stay float32.
    Returns:
      (model, params): the Flax `MiMoV2Flash` module and its parameter tree.
    Raises:
      CheckpointError naming the tensor (and both shapes) for a missing tensor, a wrong shape, a
      dtype that cannot hold weights, or an unsupported config value.
    """
    config, reader, weights, specs, sources = open_checkpoint(hf_dir, **overrides)
    placements = {} if shardings is None else traverse_util.flatten_dict(shardings)
    params = {}
    for path, spec in specs.items():
        values = _load_leaf(sources[path], spec, weights)
        sharding = placements.get(path)
        params[path] = (jnp.asarray(values) if sharding is None
                        else jax.device_put(values, sharding))
        del values  # the host copy goes before the next parameter is read
    if strict:
        unused = unused_tensors(reader, config)
        if unused:
            raise unused_error(unused)
    return MiMoV2Flash(config), _nest(params)


class _HostLeaf:
    """A parameter, or one layer's slice of a scanned one, copied to host only when written.

    The last parameter fetched is cached on the host (whole, so slicing it is a numpy view and
    compiles nothing): the E per-expert tensors of an expert parameter, or the layers of a scanned
    run, cost one device-to-host copy, and at most one parameter sits on the host at a time.
    """

    _cache: tuple[int, np.ndarray] | None = None

    def __init__(self, array: Any, index: int | None = None):
        self.array, self.index = array, index

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.array.shape)
        return shape if self.index is None else shape[1:]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def __getitem__(self, index: int) -> "_HostLeaf":  # what `layout.unstack_layers` calls
        return _HostLeaf(self.array, index)

    def numpy(self) -> np.ndarray:
        if _HostLeaf._cache is None or _HostLeaf._cache[0] != id(self.array):
            _HostLeaf._cache = (id(self.array), np.asarray(self.array))
        whole = _HostLeaf._cache[1]
        return whole if self.index is None else whole[self.index]


def _exports(config: ModelConfig, params: dict) -> list[tuple[Any, _HostLeaf]]:
    """(source, leaf) pairs in checkpoint order: embedding, layers, final norm, head, MTP."""
    leaves = jax.tree.map(_HostLeaf, params)
    flat = traverse_util.flatten_dict
    top = flat({k: v for k, v in leaves.items() if k != "decoder" and not k.startswith("mtp_")})
    top_sources = hf_names.top_sources()
    match_paths(top_sources, top, "top-level parameters")
    pairs = [(top_sources[("embed", "embedding")], top[("embed", "embedding")])]
    for i, layer in enumerate(layout.unstack_layers(leaves["decoder"], config)):
        layer_flat, sources = flat(layer), hf_names.layer_sources(config, i)
        match_paths(sources, layer_flat, f"decoder layer {i}")
        pairs += [(sources[p], layer_flat[p]) for p in sorted(sources)]
    pairs += [(top_sources[p], top[p]) for p in (("final_norm", "scale"), ("lm_head", "kernel"))]
    for k in range(config.num_mtp_heads):
        head_flat, sources = flat(leaves[f"mtp_{k}"]), hf_names.mtp_sources(config, k)
        match_paths(sources, head_flat, f"MTP head {k}")
        pairs += [(sources[p], head_flat[p]) for p in sorted(sources)]
    return pairs


def _check_shapes(config: ModelConfig, params: dict) -> None:
    specs = traverse_util.flatten_dict(abstract_params(config))
    given = traverse_util.flatten_dict(params)
    match_paths(given, specs, "params vs config")
    for path, spec in specs.items():
        if tuple(given[path].shape) != tuple(spec.shape):
            raise CheckpointError(f"parameter {_path_str(path)!r} has shape "
                                  f"{tuple(given[path].shape)} but the config needs {spec.shape}")


def _fp8_tensors(name: str, shape: tuple[int, ...], produce,
                 block: tuple[int, int]) -> list[PendingTensor]:
    """`name` as float8 e4m3 plus its `_scale_inv` block scales (float32). The writer produces
    tensors in list order, so the weight is quantised once and only its scales wait."""
    scales = []

    def weight() -> np.ndarray:
        quantized, scale = fp8.quantize(produce(), block)
        scales.append(scale)
        return quantized

    return [PendingTensor(name, shape, DTYPES["F8_E4M3"], weight),
            PendingTensor(name + SCALE_SUFFIX, fp8.scale_shape(shape, block),
                          np.dtype(np.float32), scales.pop)]


def save(model_config: ModelConfig, params: dict, out_dir: str, *, dtype: str | None = None,
         fp8_block: tuple[int, int] | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes `params` as a transformers-loadable checkpoint: safetensors + `config.json`.

    Args:
      model_config: the architecture (`model.config` of `load`'s module). Whether the params are
        scanned is read from the tree itself.
      params: the parameter tree (boxed or not), e.g. from `load` or a training state.
      out_dir: created if needed; earlier `model*.safetensors` files in it are replaced.
      dtype: "float32" | "bfloat16" | "float16" for the stored weights; None keeps each
        parameter's dtype. The router and its bias are always stored in float32.
      fp8_block: e.g. (128, 128): store the tensors the released FP8 checkpoint stores in FP8
        (`hf_names.stored_in_fp8`) as float8 e4m3 with block scales of this shape, and say so in
        `config.json`'s `quantization_config`; the rest are stored as `dtype` says.
      max_shard_bytes: larger checkpoints are split into shards plus an index.
    Returns the safetensors file names written.
    """
    if fp8_block is not None:
        if len(fp8_block) != 2 or not all(isinstance(b, int) and b > 0 for b in fp8_block):
            raise ValueError(f"fp8_block must be two positive integers, got {fp8_block!r}")
        fp8_block = tuple(fp8_block)
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    scanned = any(k.startswith("run_") for k in params.get("decoder", {}))
    config = replace_model(model_config, scan_layers=scanned)
    _check_shapes(config, params)
    stored = dtype or str(np.dtype(params["embed"]["embedding"].dtype))
    hf_cfg = hf_config.to_hf(config, stored)
    if fp8_block is not None:
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                         "activation_scheme": "dynamic",
                                         "weight_block_size": list(fp8_block)}
    tensors = []
    for source, leaf in _exports(config, params):
        target = np.dtype(np.float32) if getattr(source, "float32", False) else (
            np.dtype(jnp.dtype(dtype)) if dtype else leaf.dtype)
        for name, shape, produce in source.export(leaf.shape, leaf.numpy):
            if fp8_block is not None and hf_names.stored_in_fp8(name):
                tensors += _fp8_tensors(name, tuple(shape), produce, fp8_block)
            else:
                tensors.append(PendingTensor(name, tuple(shape), target, produce))
    os.makedirs(out_dir, exist_ok=True)
    try:
        files = write_checkpoint(out_dir, tensors, max_shard_bytes)
    finally:
        _HostLeaf._cache = None  # drop the host copy of the last parameter
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    return files
