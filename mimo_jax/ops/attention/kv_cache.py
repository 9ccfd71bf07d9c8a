"""Attention over a KV cache: new tokens attend to the cached keys and to themselves, then are
stored.

Every layer's cache is a `LayerCache` of S slots holding keys, values (RoPE and the value scale
already applied, as the model's `Attention.project` returns them) and the absolute position of the
token in each slot (-1 = empty). A token at position p lives in slot `p % S`:
  - a full-length cache (global layers) has S = the longest sequence, so the slot is the position;
  - a ring (sliding-window layers) has S = window + extra slots, and the stored positions tell
    which token a slot holds now.

In a ring, a chunk of T new tokens attends to [old slots ; its own T keys]; old slots count only if
they hold a position before the chunk's first one. That rule is what makes speculative decoding
roll back for free: the keys of rejected draft tokens stay in their slots, but their positions are
at or after the next chunk's start, so nobody sees them until the real tokens at those positions
overwrite them. A full-length cache is written first and then attended to in place (joining it
with the chunk would copy it every step); its rejected keys are overwritten by the next chunk,
which covers their positions. How many slots a ring needs is `mimo_jax.inference.cache`'s business.

Legend: B batch, T new tokens, S slots, N query heads, K KV heads, H q/k head dim,
U value head dim.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from mimo_jax.ops.attention.reference import attention_mask, masked_attention


@flax.struct.dataclass
class LayerCache:
    """One attention layer's cache (or a scanned run's, with a leading [L] axis on every leaf).

    keys: [B, S, K, H]; values: [B, S, K, U]; positions: [B, S] int32, -1 for an empty slot.
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array

    @property
    def num_slots(self) -> int:
        """S, the slots per row."""
        return self.positions.shape[-1]


def attend(cache: LayerCache, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
           window: int | None, sinks: jax.Array | None) -> tuple[jax.Array, LayerCache]:
    """Attention of new tokens over the cache and themselves, then the cache extended with them.

    Args:
      cache: the layer's `LayerCache` (no leading layer axis).
      q: [B, T, N, H], k: [B, T, K, H], v: [B, T, K, U] of the new tokens.
      positions: [B, T] int32 absolute positions, -1 for padding; a row's valid positions are
        distinct (a chunk is a run of consecutive positions).
      window: keys a query sees, itself included (None = all earlier keys); sinks: [N] or None.
    Returns the attended values [B, T, N, U] float32 and the updated cache.
    """
    valid = positions >= 0
    if window is None:
        return _attend_in_place(cache, q, k, v, positions, sinks)
    big = jnp.iinfo(jnp.int32).max
    chunk_start = jnp.min(jnp.where(valid, positions, big), axis=1, keepdims=True)  # [B, 1]
    old = cache.positions
    old_visible = jnp.where((old >= 0) & (old < chunk_start), old, -1)  # [B, S]
    key_positions = jnp.concatenate([old_visible, jnp.where(valid, positions, -1)], axis=1)
    mask = attention_mask(
        positions, key_positions, valid.astype(jnp.int32),
        (key_positions >= 0).astype(jnp.int32), window)  # [B, T, S + T]
    keys = jnp.concatenate([cache.keys, k.astype(cache.keys.dtype)], axis=1)
    values = jnp.concatenate([cache.values, v.astype(cache.values.dtype)], axis=1)
    attended = masked_attention(q, keys, values, mask, sinks)
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
    mask = attention_mask(positions, cache.positions, valid,
                          (cache.positions >= 0).astype(jnp.int32), None)
    return masked_attention(q, cache.keys, cache.values, mask, sinks), cache


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
