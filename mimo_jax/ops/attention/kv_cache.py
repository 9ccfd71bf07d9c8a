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
which covers their positions. A ring is written first too when the chunk is one token (plain
decoding): that token's slot held a position at least S >= W back (or, where S is the whole
sequence, nothing), which its window no longer reaches, and rejected keys ahead of it stay hidden
by the causal mask. How many slots a ring needs is `mimo_jax.inference.cache`'s business.

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

    keys: [B, K, S, H]; values: [B, K, U, S]; positions: [B, S] int32, -1 for an empty slot.
    Each is laid out as the attention products read it, so they need no transposed copy of it:
    the scores contract keys over H per (B, K), the output contracts values over S per (B, K),
    and XLA:CPU's matmuls want the contracted axis last (slots before heads cost a copy of every
    cached key and value per step once a layer has more than one KV head; values as [S, U]
    cost a transposed copy of every global layer's values per step).
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
    if window is None or q.shape[1] == 1:
        # Joining the ring with the chunk copies (and, on CPU, transposes) every cached key and
        # value each step: a tenth of a batch-32 decoding step. One token needs no join.
        return _attend_in_place(cache, q, k, v, positions, sinks, window)
    valid = positions >= 0
    big = jnp.iinfo(jnp.int32).max
    chunk_start = jnp.min(jnp.where(valid, positions, big), axis=1, keepdims=True)  # [B, 1]
    old = cache.positions
    old_visible = jnp.where((old >= 0) & (old < chunk_start), old, -1)  # [B, S]
    key_positions = jnp.concatenate([old_visible, jnp.where(valid, positions, -1)], axis=1)
    mask = attention_mask(
        positions, key_positions, valid.astype(jnp.int32),
        (key_positions >= 0).astype(jnp.int32), window)  # [B, T, S + T]
    keys = jnp.concatenate([cache.keys, jnp.swapaxes(k, 1, 2).astype(cache.keys.dtype)], axis=2)
    values = jnp.concatenate(
        [cache.values, jnp.moveaxis(v, 1, 3).astype(cache.values.dtype)], axis=3)
    attended = masked_attention(q, _keys_slots_major(keys), _values_slots_major(values), mask,
                                sinks)
    return attended, write(cache, k, v, positions)


# The cache's layouts -> [B, S, K, .] as `masked_attention` takes them (XLA folds the moves into
# the products).
def _keys_slots_major(keys: jax.Array) -> jax.Array:
    """[B, K, S, H] -> [B, S, K, H]."""
    return jnp.swapaxes(keys, 1, 2)


def _values_slots_major(values: jax.Array) -> jax.Array:
    """[B, K, U, S] -> [B, S, K, U]."""
    return jnp.moveaxis(values, 3, 1)


def _attend_in_place(cache: LayerCache, q: jax.Array, k: jax.Array, v: jax.Array,
                     positions: jax.Array, sinks: jax.Array | None,
                     window: int | None) -> tuple[jax.Array, LayerCache]:
    """`attend` for a full-length (global) cache, or a ring and one new token: write the chunk
    first, then attend to the cache.

    Joining the cache and the chunk would copy the whole cache every step, which at long context
    costs more than the attention. Writing first is safe in a full-length cache because a slot
    is its position: the chunk overwrites every stale key (of a rejected draft) at its own
    positions, and stale keys further ahead are later than every query, so the causal mask hides
    them. For a ring and one token, see the module's docstring.
    """
    cache = write(cache, k, v, positions)
    valid = (positions >= 0).astype(jnp.int32)
    mask = attention_mask(positions, cache.positions, valid,
                          (cache.positions >= 0).astype(jnp.int32), window)
    return masked_attention(q, _keys_slots_major(cache.keys), _values_slots_major(cache.values),
                            mask, sinks), cache


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
        # Indices on axes apart put their [B, T] first: the indexed views are [B, T, K, H] and
        # [B, T, K, U], as k and v are.
        keys=cache.keys.at[rows, :, slot].set(k.astype(cache.keys.dtype), mode="drop"),
        values=cache.values.at[rows, :, :, slot].set(v.astype(cache.values.dtype),
                                                     mode="drop"),
        positions=cache.positions.at[rows, slot].set(positions, mode="drop"))
