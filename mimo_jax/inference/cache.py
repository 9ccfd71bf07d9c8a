"""The KV cache's construction: a ring buffer per sliding-window layer, a full-length buffer per
global layer, laid out like the parameter tree.

Each layer's cache is a `mimo_jax.ops.attention.kv_cache.LayerCache` of S slots (keys, values and
the absolute position held by each slot, -1 = empty); attention over it and writing to it live
there, beside the other attention implementations, so the model reaches them without this package.
Global (GA) layers get S = the longest sequence; sliding-window (SWA) layers, the MTP heads
included, get S = window + extra slots, a ring.

How many slots a ring needs: a chunk starting at s needs keys back to s - W + 1 (W = window) while
the previous write reached position P >= s - 1, so the ring must hold P - s + W >= W - 1 positions.
Plain decoding writes nothing ahead (W slots suffice); a speculative step writes up to k - 1
rejected positions ahead of the next start, and the MTP heads re-read M - 2 of their last positions,
so speculative decoding adds `extra_slots = max(k - 1, M - 2)`.

Legend: B batch, S slots, L layers in a scanned run, K KV heads, H q/k head dim, U value head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.config import SWA, ModelConfig
from mimo_jax.model import layout
from mimo_jax.model.layers import dtype_of
from mimo_jax.ops.attention.kv_cache import LayerCache


def empty_layer_cache(batch: int, slots: int, num_kv_heads: int, qk_head_dim: int,
                      v_head_dim: int, dtype: Any, layers: int | None = None) -> LayerCache:
    """An all-empty cache; with `layers` every leaf gets a leading [L] axis (a scanned run)."""
    lead = () if layers is None else (layers,)
    return LayerCache(
        keys=jnp.zeros(lead + (batch, num_kv_heads, slots, qk_head_dim), dtype),
        values=jnp.zeros(lead + (batch, num_kv_heads, v_head_dim, slots), dtype),
        positions=jnp.full(lead + (batch, slots), -1, jnp.int32))


def layer_slots(config: ModelConfig, layer_type: str, max_length: int, extra_slots: int) -> int:
    """Slots of one layer's cache: a ring of window + extra for SWA, `max_length` for GA."""
    window = config.attention(layer_type).sliding_window
    if window is None:
        return max_length
    # A ring longer than the sequence would only hold empty slots.
    return min(window + extra_slots, max_length)


def init_cache(config: ModelConfig, batch: int, max_length: int, *, extra_slots: int = 0,
               num_mtp_heads: int | None = None, dtype: Any = None) -> dict[str, Any]:
    """The empty cache for `batch` sequences of at most `max_length` positions.

    Returns {"decoder": {block name: LayerCache}, "mtp": [LayerCache per MTP head]}. Block names
    follow the parameter tree: `run_{r}` when layers are scanned (with a leading [run length] axis
    on runs of more than one layer), else `layer_{i}`. `extra_slots` widens the sliding-window
    rings for speculative decoding (see the module docstring); `num_mtp_heads` (default: all of
    the config's) sets how many MTP heads get a cache; `dtype` defaults to the model's compute
    dtype.
    """
    if batch < 1 or max_length < 1 or extra_slots < 0:
        raise ValueError(f"cache needs batch >= 1, max_length >= 1 and extra_slots >= 0; got "
                         f"batch={batch}, max_length={max_length}, extra_slots={extra_slots}")
    dtype = dtype_of(config.runtime.dtype) if dtype is None else dtype
    num_mtp_heads = config.num_mtp_heads if num_mtp_heads is None else num_mtp_heads
    if not 0 <= num_mtp_heads <= config.num_mtp_heads:
        raise ValueError(f"num_mtp_heads={num_mtp_heads} is not in [0, {config.num_mtp_heads}]")
    decoder = {}
    for r, run in enumerate(layout.layer_runs(config)):
        attn = config.attention(run.layer_type)
        slots = layer_slots(config, run.layer_type, max_length, extra_slots)

        def make(layers=None, attn=attn, slots=slots):
            return empty_layer_cache(batch, slots, attn.num_kv_heads, attn.qk_head_dim,
                                     attn.v_head_dim, dtype, layers)

        if config.scan_layers:
            # A run of one layer (each global layer of the full model) is decoded without its
            # scan (see `Decoder`), so its cache has no [1] axis to slice and restack each step.
            decoder[layout.block_name(config, r, run.start)] = make(
                run.length if run.length > 1 else None)
        else:
            for i in run.layers:
                decoder[layout.block_name(config, r, i)] = make()
    sliding = config.sliding
    mtp_slots = layer_slots(config, SWA, max_length, extra_slots)
    mtp = [empty_layer_cache(batch, mtp_slots, sliding.num_kv_heads, sliding.qk_head_dim,
                             sliding.v_head_dim, dtype) for _ in range(num_mtp_heads)]
    return {"decoder": decoder, "mtp": mtp}


def cache_shapes(config: ModelConfig, batch: int, max_length: int, **kwargs) -> dict[str, Any]:
    """`init_cache`'s shapes and dtypes, without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda: init_cache(config, batch, max_length, **kwargs))


def cache_bytes(cache: Any) -> int:
    """Bytes of every leaf of a cache tree (arrays or ShapeDtypeStructs), positions included."""
    return int(sum(np.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree.leaves(cache)))
