"""MiMo-V2-Flash: the decoder stack, its layer pattern, the LM head and the MTP heads.

Legend: B batch, T length, D model dim, V vocab, E experts, L MoE layers, k experts per token,
M MTP heads.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mimo_jax.config import DENSE, MOE, ModelConfig
from mimo_jax.model import layout
from mimo_jax.model.attention import Attention
from mimo_jax.model.layers import DenseSwiGLU, Embed, LMHead, RMSNorm, dtype_of
from mimo_jax.model.moe import MoE
from mimo_jax.model.mtp import MTPHead, shift_left
from mimo_jax.ops.attention.kv_cache import LayerCache
from mimo_jax.ops.moe.expert_parallel import ExpertParallelOptions

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class ModelOutput:
    """What the model returns.

    logits: [B, T, V] float32, next-token logits.
    hidden: [B, T, D] last decoder hidden state before the final norm (MTP depth 0).
    mtp_logits: [M, B, T, V] float32 or None; head k (0-based) at position t predicts token
      t + k + 2 of the same document.
    expert_load: [L, E] float32, real token copies routed to each expert in each MoE layer.
    balance_loss: [] float32, sum over MoE layers of the sequence-wise balance loss (no coefficient).
      Load and balance loss count the router's own choice, replayed routing or not.
    routing: [B, T, L, k] int32, the experts each token ran in each MoE layer (the replayed ones
      under routing replay), -1 on padding.
    router_choice: [B, T, L, k] int32, the router's own top-k (equal to `routing` without replay;
      `mimo_jax.ops.moe.replay_mismatch` compares the two), -1 on padding.
    dropped_copies: [L] int32, token copies each MoE layer's expert capacity dropped (0 unless
      expert parallelism runs with a capacity factor > 0).
    """

    logits: jax.Array
    hidden: jax.Array
    mtp_logits: jax.Array | None
    expert_load: jax.Array
    balance_loss: jax.Array
    routing: jax.Array
    router_choice: jax.Array
    dropped_copies: jax.Array


@flax.struct.dataclass
class LayerAux:
    """What a decoder layer returns beside its hidden state (a scan stacks it over the layers).

    moe_stats: the MoE block's stats (`load` [E], `balance_loss` [], `indices` and
      `router_indices` [B, T, k]), or {} for a dense layer.
    cache: the layer's updated KV cache when decoding, else None.
    """

    moe_stats: dict
    cache: LayerCache | None


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Per-document positions: 0 at each document start, counting up; 0 on padding. [B, T] int32."""
    t = segment_ids.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    last_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return jnp.where(segment_ids > 0, index - last_start, 0).astype(jnp.int32)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + Attn(Norm(x)), then + FFN(Norm(.)); FFN dense SwiGLU or MoE."""

    config: ModelConfig
    layer_type: str
    mlp_type: str

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array, cache: LayerCache | None = None,
                 routing: jax.Array | None = None) -> tuple[jax.Array, LayerAux]:
        """x: [B, T, D] -> (x [B, T, D], `LayerAux`: MoE stats and the new cache).

        With a KV `cache` (decoding; positions -1 mark padding) attention runs over it and the
        extended cache comes back in the `LayerAux`; without one its cache is None.
        routing: [B, T, k] int32 experts to replay in an MoE layer (see `MoE`), or None.
        """
        cfg, runtime = self.config, self.config.runtime
        dtype, param_dtype = dtype_of(runtime.dtype), dtype_of(cfg.param_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        normed = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name="input_norm")(x)
        attention = Attention(cfg.attention(self.layer_type), cfg.hidden_size, cfg.value_scale,
                              cfg.init_std, impl=runtime.attention_impl,
                              chunk_size=runtime.attention_chunk_size, dtype=dtype,
                              param_dtype=param_dtype, fp8=cfg.fp8, name="attention")
        if cache is None:
            x = x + attention(normed, positions, segment_ids).astype(x.dtype)
        else:
            attended, cache = attention.decode(normed, positions, cache)
            x = x + attended.astype(x.dtype)
        normed = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                         name="post_attention_norm")(x)
        if self.mlp_type == DENSE:
            ffn_out = DenseSwiGLU(cfg.dense_intermediate_size, cfg.init_std, dtype=dtype,
                                  param_dtype=param_dtype, fp8=cfg.fp8, name="mlp")(normed)
            stats = {}
        else:
            ffn_out, stats = MoE(cfg.num_experts, cfg.num_experts_per_token,
                                 cfg.moe_intermediate_size, cfg.init_std,
                                 routed_scaling_factor=cfg.routed_scaling_factor,
                                 impl=runtime.moe_impl, expert_options=ExpertParallelOptions(
                                     capacity_factor=runtime.expert_capacity_factor,
                                     transport=runtime.expert_transport),
                                 dtype=dtype, param_dtype=param_dtype, fp8=cfg.fp8,
                                 name="moe")(normed, segment_ids, routing)
        x = x + ffn_out.astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, LayerAux(moe_stats=stats, cache=cache)


def _layer_class(config: ModelConfig):
    if config.runtime.remat_policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=REMAT_POLICIES[config.runtime.remat_policy],
                    prevent_cse=not config.scan_layers)


def _first_of_run(layer_cls):
    """`layer_cls` reading its parameters as entry 0 of a scanned run's stacked [1, ...] arrays.

    For a cached step through a run of one layer (every global layer of the full model): a
    length-1 scan stays a loop whose inputs and outputs copy the layer's whole full-length
    cache every step, where a plain call updates it in place. Decoding only: no init.
    """
    return nn.map_variables(layer_cls, "params",
                            trans_in_fn=lambda tree: jax.tree.map(lambda a: a[0], tree),
                            trans_out_fn=lambda tree: jax.tree.map(lambda a: a[None], tree))


class Decoder(nn.Module):
    """The 48 (or `num_layers`) decoder layers, scanned over runs of identical layers."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array, cache: dict | None = None,
                 routing: jax.Array | None = None
                 ) -> tuple[jax.Array, list[dict], dict | None]:
        """x: [B, T, D] -> (x [B, T, D], per-MoE-layer stats in layer order, new cache or None).

        `cache` is the KV cache when decoding: a dict keyed by block name, scanned runs of several
        layers carrying a leading [run length] axis (see `mimo_jax.inference.cache`). Without one
        the third value is None.
        `routing` [B, T, L, k] int32 replays an expert choice in the L MoE layers (in layer
        order; a scanned run takes its slice of L as its stacked axis); None = the router
        chooses. Not with a cache.
        """
        cfg = self.config
        if routing is not None and cache is not None:
            raise ValueError("routing replay is for the full forward, not for cached decoding")
        layer_cls = _layer_class(cfg)
        moe_stats = []
        new_cache = {}
        for r, run in enumerate(layout.layer_runs(cfg)):
            # This run's share of the replayed routing: [B, T, run length, k], or None.
            run_routing = None
            if routing is not None and run.mlp_type == MOE:
                run_routing = routing[:, :, len(moe_stats):len(moe_stats) + run.length]
            if cfg.scan_layers and (cache is None or run.length > 1):
                cached = cache is not None
                replay = run_routing is not None
                name = layout.block_name(cfg, r, run.start)
                # The cache is scanned over its run axis and the routing over its layer axis
                # (moved first); replay never comes with a cache (checked above).
                if cached:
                    extra, extra_axes = (cache[name],), (0,)
                elif replay:
                    extra, extra_axes = (None, jnp.moveaxis(run_routing, 2, 0)), (nn.broadcast, 0)
                else:
                    extra, extra_axes = (), ()
                # A decode step is a few tokens deep, so a rolled loop's per-layer dynamic slices
                # of the stacked weights and caches (copies, every step) outweigh its arithmetic.
                # Unrolled, tiny-config decoding on CPU runs 1.4x faster.
                scanned = nn.scan(
                    layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast) + extra_axes,
                    length=run.length, metadata_params={nn.PARTITION_NAME: "layers"},
                    unroll=run.length if cached else 1)
                x, aux = scanned(cfg, run.layer_type, run.mlp_type, name=name)(
                    x, positions, segment_ids, *extra)
                if cached:
                    new_cache[name] = aux.cache
                if run.mlp_type == MOE:
                    moe_stats.extend(jax.tree.map(lambda s, j=j: s[j], aux.moe_stats)
                                     for j in range(run.length))
            else:
                # Decoding a scanned run of one layer (each global layer) without its scan keeps
                # its cache out of the scan's stacked inputs and outputs (see `_first_of_run`).
                cls = _first_of_run(layer_cls) if cfg.scan_layers else layer_cls
                for j, i in enumerate(run.layers):
                    name = layout.block_name(cfg, r, i)
                    x, aux = cls(cfg, run.layer_type, run.mlp_type, name=name)(
                        x, positions, segment_ids, cache[name] if cache is not None else None,
                        run_routing[:, :, j] if run_routing is not None else None)
                    if cache is not None:
                        new_cache[name] = aux.cache
                    if run.mlp_type == MOE:
                        moe_stats.append(aux.moe_stats)
        return x, moe_stats, (new_cache if cache is not None else None)


class MiMoV2Flash(nn.Module):
    """The causal LM. `apply({"params": p}, tokens)` returns a `ModelOutput`."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = dtype_of(cfg.runtime.dtype), dtype_of(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, cfg.init_std, dtype=dtype,
                           param_dtype=param_dtype)
        self.decoder = Decoder(cfg)
        self.final_norm = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = LMHead(cfg.vocab_size, cfg.init_std, dtype=dtype, param_dtype=param_dtype)
        self.mtp_heads = [MTPHead(cfg, name=f"mtp_{k}") for k in range(cfg.num_mtp_heads)]

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, return_mtp: bool = False,
                 routing: jax.Array | None = None) -> ModelOutput:
        """Runs the model on a (possibly packed) batch.

        Args:
          tokens: [B, T] int32.
          segment_ids: [B, T] int32; packed documents carry ids 1, 2, ... and padding 0. None means
            one document per row.
          positions: [B, T] int32 per-document positions; None derives them from segment_ids.
          return_mtp: also run the MTP heads (their logits are in `mtp_logits`).
          routing: [B, T, L, k] int32 expert choice to replay in the L MoE layers (Rollout
            Routing Replay, e.g. a rollout's `routing`): each MoE layer runs these experts, gated
            by their renormalised sigmoid scores, so gradients reach the router through the
            replayed experts' scores; a token whose row holds a -1 keeps the router's choice.
            None = the router chooses. The router's own choice is in `router_choice` either way.
        """
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        cfg = self.config
        expected = tokens.shape + (len(cfg.moe_layers), cfg.num_experts_per_token)
        if routing is not None and routing.shape != expected:
            raise ValueError(f"routing must have shape {expected} [batch, length, MoE layers, "
                             f"experts per token], got {routing.shape}")
        x = self.embed(tokens)
        hidden, moe_stats, _ = self.decoder(x, positions, segment_ids, routing=routing)
        logits = self.logits(hidden)
        mtp_logits = None
        if return_mtp and self.mtp_heads:
            # One LM-head product over all heads: its gradient is then one [M, B, T, V] array
            # that the weight gradient reads in whatever layout it likes, where a stack of
            # per-head products makes XLA:CPU copy each head's gradient into a transposed one.
            normed = jnp.stack(self.mtp_hidden(hidden, tokens, positions, segment_ids))
            heads, batch = normed.shape[:2]
            mtp_logits = self.mtp_logits(normed.reshape((heads * batch,) + normed.shape[2:]))
            mtp_logits = mtp_logits.reshape((heads, batch) + mtp_logits.shape[1:])
        if moe_stats:
            load = jnp.stack([s["load"] for s in moe_stats])
            balance = sum(s["balance_loss"] for s in moe_stats)
            dropped = jnp.stack([s["dropped"] for s in moe_stats])
        else:
            load = jnp.zeros((0, cfg.num_experts), jnp.float32)
            balance = jnp.zeros((), jnp.float32)
            dropped = jnp.zeros((0,), jnp.int32)
        return ModelOutput(logits=logits, hidden=hidden, mtp_logits=mtp_logits,
                           expert_load=load, balance_loss=balance,
                           routing=self._stack_routing(moe_stats, "indices", tokens.shape),
                           router_choice=self._stack_routing(moe_stats, "router_indices",
                                                             tokens.shape),
                           dropped_copies=dropped)

    def _stack_routing(self, moe_stats: list[dict], key: str, shape: tuple) -> jax.Array:
        """Per-layer [B, T, k] expert ids `key` of the stats -> [B, T, L, k] int32."""
        if not moe_stats:
            return jnp.full(shape + (0, self.config.num_experts_per_token), -1, jnp.int32)
        return jnp.stack([s[key] for s in moe_stats], axis=2)

    def mtp_hidden(self, hidden: jax.Array, tokens: jax.Array, positions: jax.Array,
                   segment_ids: jax.Array) -> list[jax.Array]:
        """Normed outputs of the MTP heads in depth order, each [B, T, D].

        Head k (1-based) reads the embedding of token t+k, shifted within each document.
        """
        outputs = []
        previous = hidden
        for k, head in enumerate(self.mtp_heads, start=1):
            next_tokens, _ = shift_left(tokens, segment_ids, k)
            previous, normed, _ = head(previous, self.embed(next_tokens), positions, segment_ids)
            outputs.append(normed)
        return outputs

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: dict,
               return_routing: bool = False):
        """One cached forward over a chunk of new tokens (prefill or decode step).

        Args:
          tokens: [B, T] int32.
          positions: [B, T] int32 absolute positions; -1 marks padding.
          cache: the decoder's KV cache, `mimo_jax.inference.cache.init_cache(...)["decoder"]`.
          return_routing: also return the experts each token ran.
        Returns the hidden states [B, T, D] (before the final norm; `logits` turns the rows that
        are needed into logits) and the new cache; with `return_routing` also the routing
        [B, T, L, k] int32 (-1 on padding).
        """
        segment_ids = (positions >= 0).astype(jnp.int32)
        hidden, moe_stats, cache = self.decoder(self.embed(tokens), positions, segment_ids, cache)
        if return_routing:
            return hidden, cache, self._stack_routing(moe_stats, "indices", tokens.shape)
        return hidden, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm and LM head: hidden [B, T, D] -> logits [B, T, V] float32."""
        return self.lm_head(self.final_norm(hidden))

    def mtp_decode(self, head: int, previous_hidden: jax.Array, next_tokens: jax.Array,
                   positions: jax.Array, cache: LayerCache
                   ) -> tuple[jax.Array, jax.Array, LayerCache]:
        """MTP head `head` (0-based) over a chunk, with its KV cache.

        previous_hidden: [B, T, D] (the main hidden state for head 0, else the previous head's);
        next_tokens: [B, T] the token `head + 1` places after each position; positions: [B, T]
        (-1 = padding). Returns the head's hidden [B, T, D], its normed output [B, T, D] (the LM
        head's input, see `mtp_logits`) and its cache.
        """
        segment_ids = (positions >= 0).astype(jnp.int32)
        return self.mtp_heads[head](previous_hidden, self.embed(next_tokens), positions,
                                    segment_ids, cache)

    def mtp_logits(self, normed: jax.Array) -> jax.Array:
        """The shared LM head on an MTP head's normed output: [B, T, D] -> [B, T, V] float32."""
        return self.lm_head(normed)


def init_params(model: MiMoV2Flash, rng: jax.Array, batch: int = 1, length: int = 8,
                boxed: bool = False) -> dict:
    """Initialises the parameters (MTP heads included). Returns `params`, unboxed unless `boxed`
    (boxed leaves carry logical axis names for `mimo_jax.parallel`)."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    variables = jax.jit(functools.partial(model.init, return_mtp=True))(rng, tokens)
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)
