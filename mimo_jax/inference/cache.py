"""The KV cache: a ring buffer per sliding-window layer, a full-length buffer per global layer.

Every layer's cache is a `LayerCache` of S slots holding keys, values (RoPE and the value scale
already applied, as `Attention.project` returns them) and the absolute position of the token in
each slot (-1 = empty). A token at position p lives in slot `p % S`:
  - global (GA) layers have S = the longest sequence, so the slot is the position itself;
  - sliding-window (SWA) layers, the MTP heads included, have S = window + extra slots, a ring
    buffer whose stored positions tell which token a slot holds now.

In a ring, a chunk of T new tokens attends to [old slots ; its own T keys]; old slots count only if
they hold a position before the chunk's first one. That rule is what makes speculative decoding
roll back for free: the keys of rejected draft tokens stay in their slots, but their positions are
at or after the next chunk's start, so nobody sees them until the real tokens at those positions
overwrite them. A full-length cache is written first and then attended to in place (joining it
with the chunk would copy it every step); its rejected keys are overwritten by the next chunk,
which covers their positions.

How many slots a ring needs: a chunk starting at s needs keys back to s - W + 1 (W = window) while
the previous write reached position P >= s - 1, so the ring must hold P - s + W >= W - 1 positions.
Plain decoding writes nothing ahead (W slots suffice); a speculative step writes up to k - 1
rejected positions ahead of the next start, and the MTP heads re-read M - 2 of their last positions,
so speculative decoding adds `extra_slots = max(k - 1, M - 2)`.

Legend: B batch, T new tokens, S slots, L layers in a scanned run, K KV heads, H q/k head dim,
V value head dim, N query heads.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.config import SWA, ModelConfig
from mimo_jax.model import layout
from mimo_jax.model.layers import dtype_of
from mimo_jax.ops import attention as attention_ops


@flax.struct.dataclass
class LayerCache:
    """One attention layer's cache (or a scanned run's, with a leading [L] axis on every leaf).

    keys: [B, S, K, H]; values: [B, S, K, V]; positions: [B, S] int32, -1 for an empty slot.
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array

    @property
    def num_slots(self) -> int:
        return self.positions.shape[-1]


def empty_layer_cache(batch: int, slots: int, num_kv_heads: int, qk_head_dim: int,
                      v_head_dim: int, dtype: Any, layers: int | None = None) -> LayerCache:
    """An all-empty cache; with `layers` every leaf gets a leading [L] axis (a scanned run)."""
    lead = () if layers is None else (layers,)
    return LayerCache(
        keys=jnp.zeros(lead + (batch, slots, num_kv_heads, qk_head_dim), dtype),
        values=jnp.zeros(lead + (batch, slots, num_kv_heads, v_head_dim), dtype),
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


def attend(cache: LayerCache, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
           window: int | None, sinks: jax.Array | None) -> tuple[jax.Array, LayerCache]:
    """Attention of new tokens over the cache and themselves, then the cache extended with them.

    Args:
      cache: the layer's `LayerCache` (no leading layer axis).
      q: [B, T, N, H], k: [B, T, K, H], v: [B, T, K, V] of the new tokens.
      positions: [B, T] int32 absolute positions, -1 for padding; a row's valid positions are
        distinct (a chunk is a run of consecutive positions).
      window: keys a query sees, itself included (None = all earlier keys); sinks: [N] or None.
    Returns the attended values [B, T, N, V] float32 and the updated cache.
    """
    valid = positions >= 0
    if window is None:
        return _attend_in_place(cache, q, k, v, positions, sinks)
    big = jnp.iinfo(jnp.int32).max
    chunk_start = jnp.min(jnp.where(valid, positions, big), axis=1, keepdims=True)  # [B, 1]
    old = cache.positions
    old_visible = jnp.where((old >= 0) & (old < chunk_start), old, -1)  # [B, S]
    key_positions = jnp.concatenate([old_visible, jnp.where(valid, positions, -1)], axis=1)
    mask = attention_ops.attention_mask(
        positions, key_positions, valid.astype(jnp.int32),
        (key_positions >= 0).astype(jnp.int32), window)  # [B, T, S + T]
    keys = jnp.concatenate([cache.keys, k.astype(cache.keys.dtype)], axis=1)
    values = jnp.concatenate([cache.values, v.astype(cache.values.dtype)], axis=1)
    attended = attention_ops.masked_attention(q, keys, values, mask, sinks)
    return attended, write(cache, k, v, positions)


def _attend_in_place(cache: LayerCache, q: jax.Array, k: jax.Array, v: jax.Array,
                     positions: jax.Array, sinks: jax.Array | None) -> tuple[jax.Array, LayerCache]:
    """`attend` for a full-length (global) cache: write the chunk first, then attend to the cache.

    Joining the cache and the chunk would copy the whole cache every step, which at long context
    costs more than the attention. Writing first is safe here because a slot is its position:
    the chunk overwrites every stale key (of a rejected draft) at its own positions, and stale
    keys further ahead are later than every query, so the causal mask hides them.
    """
    cache = write(cache, k, v, positions)
    valid = (positions >= 0).astype(jnp.int32)
    mask = attention_ops.attention_mask(positions, cache.positions, valid,
                                        (cache.positions >= 0).astype(jnp.int32), None)
    return attention_ops.masked_attention(q, cache.keys, cache.values, mask, sinks), cache


def write(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """Stores the valid new tokens in slot `position % S`.

    When a chunk holds more tokens than the ring has slots, only the last S of each row are kept
    (the others would collide with them); padding is never stored.
    """
    b, t = positions.shape
    slots = cache.num_slots
    valid = positions >= 0
    last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
    keep = valid & (positions > last - slots)
    # An index of `slots` is out of bounds, and mode="drop" discards those writes.
    slot = jnp.where(keep, positions % slots, slots)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return LayerCache(
        keys=cache.keys.at[rows, slot].set(k.astype(cache.keys.dtype), mode="drop"),
        values=cache.values.at[rows, slot].set(v.astype(cache.values.dtype), mode="drop"),
        positions=cache.positions.at[rows, slot].set(positions, mode="drop"))
