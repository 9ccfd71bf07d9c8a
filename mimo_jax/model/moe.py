"""The MoE feed-forward block: sigmoid router with correction bias and SwiGLU experts.

The router's `e_score_correction_bias` lives in `params` (so a checkpoint is one tree) but is not a
trained weight: no gradient reaches it, the optimizer skips it, and the trainer moves it with
`mimo_jax.ops.moe.update_correction_bias` after each step.
Legend: B batch, T length, D model dim, E experts, k experts per token, F expert ffn dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimo_jax.model.layers import normal_init, param_with_axes
from mimo_jax.ops import fp8 as fp8_ops
from mimo_jax.ops import moe as moe_ops
from mimo_jax.ops.moe.expert_parallel import ExpertParallelOptions

CORRECTION_BIAS = "e_score_correction_bias"


class MoE(nn.Module):
    """Routed experts, top-k of E, no shared expert.

    fp8: tokens, expert weights and the output's gradient are rounded to block-scaled e4m3
    around the dispatch (`mimo_jax.ops.fp8.experts` lists which expert GEMM operands that makes
    e4m3); the router stays in float32.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    init_std: float
    routed_scaling_factor: float = 1.0
    impl: str = "dense"
    # Receive buffer and transport of the "expert_parallel" dispatch.
    expert_options: ExpertParallelOptions = ExpertParallelOptions()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array,
                 routing: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """x: [B, T, D]; segment_ids: [B, T] (0 = padding); routing: [B, T, k] int32 or None.

        `routing` replays a recorded expert choice (Rollout Routing Replay): each token runs the
        given experts, gated by their own sigmoid scores renormalised and scaled as the router
        does, so the gradient reaches the router through the replayed experts' scores. A token
        whose row holds a -1 keeps the router's choice. None = the router chooses.

        Returns y [B, T, D] and stats: `load` [E] (real token copies per expert) and
        `balance_loss` [] (the sequence-wise balance loss, before its coefficient), both of the
        router's own choice, which the correction bias and the balance loss steer whether or not
        a routing is replayed; `indices` [B, T, k] int32 the experts each token ran and
        `router_indices` [B, T, k] int32 the router's own choice (equal without replay), -1 on
        padding; `dropped` [] int32 the token copies the expert capacity dropped (always 0
        without expert parallelism or with capacity factor 0).
        """
        b, t, d = x.shape
        e, f, k = self.num_experts, self.intermediate_size, self.top_k
        init = normal_init(self.init_std)
        router = param_with_axes(self, "router", init, (d, e), ("embed", None), jnp.float32)
        bias = param_with_axes(self, CORRECTION_BIAS, nn.initializers.zeros, (e,), (None,),
                               jnp.float32)
        w_gate = param_with_axes(self, "gate", init, (e, d, f), ("experts", "embed", "mlp"),
                                 self.param_dtype)
        w_up = param_with_axes(self, "up", init, (e, d, f), ("experts", "embed", "mlp"),
                               self.param_dtype)
        w_down = param_with_axes(self, "down", init, (e, f, d), ("experts", "mlp", "embed"),
                                 self.param_dtype)

        tokens = x.reshape(b * t, d)
        # The router runs in float32 whatever the compute dtype (as in the report).
        logits = jnp.einsum("td,de->te", tokens.astype(jnp.float32), router)
        weights, chosen, scores = moe_ops.route(
            logits, bias, k, normalize=True, scaling=self.routed_scaling_factor)
        indices = chosen
        if routing is not None:
            if routing.shape != (b, t, k):
                raise ValueError(f"replayed routing must have shape {(b, t, k)} "
                                 f"[batch, length, experts per token], got {routing.shape}")
            indices = moe_ops.replayed_indices(routing.reshape(b * t, k), chosen)
            weights = moe_ops.gate_weights(scores, indices, normalize=True,
                                           scaling=self.routed_scaling_factor)
        experts_in = [x.astype(self.dtype)] + [w.astype(self.dtype) for w in (w_gate, w_up, w_down)]
        if self.fp8:
            # Outside the dispatch, so every backend multiplies the same e4m3 values. The
            # weights are rounded from the master weights; the compute dtype holds them exactly.
            experts_in = [fp8_ops.expert_tokens(experts_in[0])] + [
                fp8_ops.expert_weights(w).astype(self.dtype) for w in (w_gate, w_up, w_down)]
        tokens_in, gate_in, up_in, down_in = experts_in
        y, dropped = moe_ops.dispatch(
            tokens_in, weights.reshape(b, t, -1), indices.reshape(b, t, -1),
            gate_in, up_in, down_in,
            impl=self.impl, token_mask=segment_ids > 0,
            # Mesh axes under the current logical rules: the expert-parallel backend splits the
            # experts over them (without a mesh it is the local dispatch).
            mesh_axes=(nn.logical_to_mesh_axes(("batch", "length", "embed")),
                       nn.logical_to_mesh_axes(("experts", "embed", "mlp"))),
            options=self.expert_options, with_drops=True)
        if self.fp8:
            y = fp8_ops.expert_output(y)
        real = (segment_ids > 0)[..., None]
        stats = {
            "load": moe_ops.expert_load(chosen, (segment_ids > 0).reshape(-1), e),
            "balance_loss": moe_ops.sequence_balance_loss(
                scores.reshape(b, t, e), chosen.reshape(b, t, k), segment_ids, k),
            "indices": jnp.where(real, indices.reshape(b, t, k), -1),
            "router_indices": jnp.where(real, chosen.reshape(b, t, k), -1),
            "dropped": dropped,
        }
        return y, stats
