"""Mixture-of-experts math as pure functions: routing and balancing, and the dispatch backends.

    from mimo_jax.ops import moe as moe_ops
    weights, indices, scores = moe_ops.route(logits, correction_bias, top_k)
    y = moe_ops.dispatch(x, weights, indices, w_gate, w_up, w_down, impl="auto")

Modules: `routing` (router, routing replay, expert load, balance loss, correction-bias update),
`api` (the `dispatch` entry point and the registry of backends), `dense` (the dense twin),
`ragged` (dropless sorted dispatch), `blocked` (routed copies in fixed-size blocks),
`gathered` (each token's own experts' weights, for decoding), `expert_parallel` (experts split
over mesh axes, all-to-all exchange), `local_choice` (the rule of `impl="auto"`).
"""

from mimo_jax.ops.moe.api import IMPLEMENTATIONS, IMPLS, dispatch, resolve_impl
from mimo_jax.ops.moe.dense import dense_dispatch
from mimo_jax.ops.moe.ragged import ragged_dispatch, sort_by_expert
from mimo_jax.ops.moe.routing import (expert_load, gate_weights, replay_mismatch,
                                      replayed_indices, route, sequence_balance_loss,
                                      update_correction_bias)

__all__ = ["IMPLEMENTATIONS", "IMPLS", "dense_dispatch", "dispatch", "expert_load",
           "gate_weights", "ragged_dispatch", "replay_mismatch", "replayed_indices",
           "resolve_impl", "route", "sequence_balance_loss", "sort_by_expert",
           "update_correction_bias"]
