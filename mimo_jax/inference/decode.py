"""Cached forward passes: prompt prefill and the per-row bookkeeping of a token buffer.

A batch of prompts is right-padded into [B, T] with `lengths` [B]; row b's token at column j sits at
position j, and every row then advances on its own (its frontier `n[b]` is the position of its
newest token). Positions -1 mark padding everywhere: padding is neither attended to nor cached.
Legend: B batch, T length, C chunk length, D model dim, V vocab, L MoE layers, k experts per token.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp

from mimo_jax.config import ModelConfig
from mimo_jax.model import layout
from mimo_jax.model.transformer import MiMoV2Flash


def model_decode(model: MiMoV2Flash, params: Any, tokens: jax.Array, positions: jax.Array,
                 cache: dict, return_routing: bool = False):
    """The main model over a chunk with its decoder cache: (hidden [B, C, D], new cache), and
    with `return_routing` the experts each token ran, [B, C, L, k] int32 (-1 on padding)."""
    return model.apply({"params": params}, tokens, positions, cache, return_routing,
                       method=MiMoV2Flash.decode)


def logits(model: MiMoV2Flash, params: Any, hidden: jax.Array) -> jax.Array:
    """Main-model logits [B, C, V] float32 of hidden states [B, C, D] (only the rows needed:
    the LM head is a large share of a small model's decode step)."""
    return model.apply({"params": params}, hidden, method=MiMoV2Flash.logits)


def mtp_decode(model: MiMoV2Flash, params: Any, head: int, previous_hidden: jax.Array,
               next_tokens: jax.Array, positions: jax.Array,
               cache: Any) -> tuple[jax.Array, jax.Array, Any]:
    """MTP head `head` over a chunk: (hidden [B, C, D], normed output [B, C, D], new cache)."""
    return model.apply({"params": params}, head, previous_hidden, next_tokens, positions, cache,
                       method=MiMoV2Flash.mtp_decode)


def mtp_logits(model: MiMoV2Flash, params: Any, normed: jax.Array) -> jax.Array:
    """Logits [B, C, V] float32 of MTP-head outputs [B, C, D] (the shared LM head)."""
    return model.apply({"params": params}, normed, method=MiMoV2Flash.mtp_logits)


def loop_layout(config: ModelConfig, params: Any,
                unstack_layers: bool | None) -> tuple[ModelConfig, Any]:
    """The config and params a generation runs with; call it before the compiled program.

    With `unstack_layers` (default: on CPU) scanned runs become one module per layer: XLA:CPU
    would otherwise copy every layer's weights out of the stacked arrays at every step, which
    costs more than a small model's step (1.6x slower decoding for the tiny config). Off on
    accelerators, where the copy would double the decoder's weight memory.

    The copy is made once per params: a later call with the same arrays (a user generating again
    from one checkpoint) reuses it, where copying inside every generation cost 10-30 ms a call
    on issue 11's 26.8M-parameter model (`benchmarks/vs_transformers.py`). The latest copy is
    kept until its source arrays are freed or other params are decoded, so a CPU process holds
    the decoder's weights twice while it keeps both.
    """
    if unstack_layers is None:
        unstack_layers = jax.default_backend() == "cpu"
    if not unstack_layers or not config.scan_layers:
        return config, params
    target = dataclasses.replace(config, scan_layers=False)
    leaves = jax.tree.leaves(params)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):  # inside a caller's jit
        return target, _unstack(params, config)
    if _last_layout.matches(config, leaves):
        return target, _last_layout.params
    unstacked = _unstack(params, config)
    _last_layout.remember(config, leaves, unstacked)
    return target, unstacked


@functools.partial(jax.jit, static_argnums=1)
def _unstack(params: Any, config: ModelConfig) -> Any:
    return layout.relayout_decoder(params, config, scan_layers=False)


class _LastLayout:
    """The most recent `loop_layout` copy, held while the params it was made from live.

    Identity, not value, names the params: the arrays are held by weak references, so a stale
    entry can never match new arrays, and the copy is dropped as soon as its source is freed.
    """

    def __init__(self):
        self._config, self._sources, self.params = None, (), None

    def matches(self, config: ModelConfig, leaves: list) -> bool:
        return (config == self._config and len(leaves) == len(self._sources)
                and all(ref() is leaf for ref, leaf in zip(self._sources, leaves)))

    def remember(self, config: ModelConfig, leaves: list, params: Any) -> None:
        self._config, self.params = config, params
        self._sources = tuple(weakref.ref(leaf) for leaf in leaves)
        weakref.finalize(leaves[0], self._forget, self._sources)

    def _forget(self, sources: tuple) -> None:
        if sources is self._sources:
            self._config, self._sources, self.params = None, (), None


_last_layout = _LastLayout()


def gather_rows(x: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    """x[b, starts[b] : starts[b] + length] for every row; indices clipped into range.

    x: [B, T, ...]; starts: [B] int. Returns [B, length, ...].
    """
    index = jnp.clip(starts[:, None] + jnp.arange(length), 0, x.shape[1] - 1)
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def write_rows(x: jax.Array, starts: jax.Array, values: jax.Array, count: jax.Array) -> jax.Array:
    """x[b, starts[b] + i] = values[b, i] for i < count[b]; writes past the end are dropped.

    x: [B, T, ...]; starts, count: [B]; values: [B, C, ...].
    """
    b, c = values.shape[:2]
    index = starts[:, None] + jnp.arange(c)
    index = jnp.where(jnp.arange(c) < count[:, None], index, x.shape[1])
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, c))
    return x.at[rows, index].set(values.astype(x.dtype), mode="drop")


def check_prompts(tokens: jax.Array, lengths: jax.Array) -> None:
    """Raises a clear error for prompt shapes that cannot work (concrete lengths only)."""
    if tokens.ndim != 2:
        raise ValueError(f"prompts must be [batch, length] token ids, got shape {tokens.shape}")
    if lengths.shape != tokens.shape[:1]:
        raise ValueError(f"prompt lengths must have shape {tokens.shape[:1]}, got {lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer):
        bad = [int(n) for n in jax.device_get(lengths) if not 1 <= n <= tokens.shape[1]]
        if bad:
            raise ValueError(f"prompt lengths must be in [1, {tokens.shape[1]}], got {bad[0]}")


def prefill(model: MiMoV2Flash, params: Any, tokens: jax.Array, lengths: jax.Array,
            cache: dict, *, chunk_size: int, mtp_heads: int = 0,
            keep_hidden: bool = False, keep_routing: bool = False
            ) -> tuple[jax.Array, jax.Array | None, dict, jax.Array | None]:
    """Runs the prompts through the model in chunks, filling the cache.

    Args:
      tokens: [B, T] right-padded prompts; lengths: [B] (each >= 1).
      cache: from `init_cache`; its "mtp" list must hold at least `mtp_heads` caches.
      chunk_size: prompt tokens per cached forward (bounds the attention's memory).
      mtp_heads: also fill the caches of the first `mtp_heads` MTP heads at the positions
        j < length - mtp_heads, the ones whose inputs are all prompt tokens (speculative decoding
        computes the last ones itself, see `speculative.py`).
      keep_hidden: also return the main model's hidden states.
      keep_routing: also return the experts each prompt token ran.
    Returns the logits at each row's last prompt token [B, V] float32, the hidden states
    [B, T, D] (or None), the cache, and the routing [B, T, L, k] int32 (-1 on padding; or None).
    """
    b, t = tokens.shape
    chunk = min(chunk_size, t)
    num_chunks = -(-t // chunk)
    padded = num_chunks * chunk
    # One more column of padding so MTP heads may read the token after the last chunk.
    tokens = jnp.pad(tokens, ((0, 0), (0, padded - t + mtp_heads)))
    cfg = model.config
    dtype = jnp.dtype(cfg.runtime.dtype)
    hidden_all = jnp.zeros((b, padded, cfg.hidden_size), dtype) if keep_hidden else None
    routing_all = (jnp.full((b, padded, len(cfg.moe_layers), cfg.num_experts_per_token), -1,
                            jnp.int32) if keep_routing else None)
    last_hidden = jnp.zeros((b, cfg.hidden_size), dtype)

    def body(c, carry):
        cache, last_hidden, hidden_all, routing_all = carry
        start = c * chunk
        columns = start + jnp.arange(chunk)
        positions = jnp.where(columns[None] < lengths[:, None], columns[None], -1)
        chunk_tokens = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
        hidden, decoder_cache, *routing = model_decode(model, params, chunk_tokens, positions,
                                                       cache["decoder"], keep_routing)
        if keep_routing:
            routing_all = jax.lax.dynamic_update_slice_in_dim(routing_all, routing[0], start,
                                                              axis=1)
        last = lengths - 1 - start
        in_chunk = (last >= 0) & (last < chunk)
        row = jnp.take_along_axis(hidden, jnp.clip(last, 0, chunk - 1)[:, None, None], axis=1)
        last_hidden = jnp.where(in_chunk[:, None], row[:, 0].astype(dtype), last_hidden)
        mtp_caches = list(cache["mtp"])
        previous = hidden
        mtp_positions = jnp.where(columns[None] < lengths[:, None] - mtp_heads, columns[None], -1)
        for head in range(mtp_heads):
            next_tokens = jax.lax.dynamic_slice_in_dim(tokens, start + head + 1, chunk, axis=1)
            previous, _, mtp_caches[head] = mtp_decode(model, params, head, previous,
                                                       next_tokens, mtp_positions,
                                                       mtp_caches[head])
        if keep_hidden:
            hidden_all = jax.lax.dynamic_update_slice_in_dim(
                hidden_all, hidden.astype(hidden_all.dtype), start, axis=1)
        return {"decoder": decoder_cache, "mtp": mtp_caches}, last_hidden, hidden_all, routing_all

    cache, last_hidden, hidden_all, routing_all = jax.lax.fori_loop(
        0, num_chunks, body, (cache, last_hidden, hidden_all, routing_all))
    last_logits = logits(model, params, last_hidden[:, None])[:, 0]
    return (last_logits, (hidden_all[:, :t] if keep_hidden else None), cache,
            (routing_all[:, :t] if keep_routing else None))
