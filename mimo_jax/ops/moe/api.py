"""MoE dispatch: the entry point `dispatch` and the one registry of its backends.

Every backend runs the routed experts on the same inputs and returns the same result:
  dense            every expert on every token, combined by gate weight (`dense.py`): E/k times
                   the FLOPs but plain einsums; the obviously-correct twin.
  ragged           dropless sorted dispatch with grouped matmuls (`ragged.py`).
  blocked          dropless: the routed copies only, sorted into fixed-size blocks of one expert
                   each, with dense matmuls per block (`blocked.py`); fast on every backend.
  gathered         each token multiplies by its own k experts' gathered weights
                   (`gathered.py`): reads k of E experts per token; for decoding.
  expert_parallel  the experts split over mesh axes, token copies exchanged with all-to-all
                   (`expert_parallel.py`); without a mesh that splits the experts it is the
                   fastest one-device dispatch.
  auto             expert_parallel when the mesh axes split the experts, else the fastest
                   one-device dispatch for the backend (`local_choice.py`: blocked on CPU,
                   ragged on TPU and GPU). The default.
The model makes one call whatever the backend; the backend is a config value. Whatever it is,
a one-device call with so few tokens that T*k < E (decoding at small batch) runs `gathered`:
it reads only the chosen experts' weights, and weight reads are what such a call costs.

Legend: B batch, T length, D model dim, E experts, k experts per token, F expert ffn dim.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mimo_jax.ops.moe import expert_parallel
from mimo_jax.ops.moe.blocked import blocked_dispatch
from mimo_jax.ops.moe.dense import dense_dispatch
from mimo_jax.ops.moe.gathered import gathered_dispatch, reads_fewer_weights
from mimo_jax.ops.moe.local_choice import fastest_one_device_impl
from mimo_jax.ops.moe.ragged import ragged_dispatch


def _on_flat_tokens(local_dispatch, x, weights, indices, w_gate, w_up, w_down, token_mask):
    """A one-device dispatch over [T, D] applied to tokens [..., D]; padding outputs zeroed."""
    d, top_k = x.shape[-1], indices.shape[-1]
    y = local_dispatch(x.reshape(-1, d), weights.reshape(-1, top_k), indices.reshape(-1, top_k),
                       w_gate, w_up, w_down).reshape(x.shape)
    if token_mask is None:
        return y
    return jnp.where(token_mask[..., None], y, jnp.zeros((), y.dtype))


def _dense(x, weights, indices, w_gate, w_up, w_down, *, token_mask, mesh_axes, options):
    del mesh_axes, options  # all experts on one device
    return _on_flat_tokens(dense_dispatch, x, weights, indices, w_gate, w_up, w_down, token_mask)


def _ragged(x, weights, indices, w_gate, w_up, w_down, *, token_mask, mesh_axes, options):
    del mesh_axes, options  # all experts on one device
    return _on_flat_tokens(ragged_dispatch, x, weights, indices, w_gate, w_up, w_down, token_mask)


def _blocked(x, weights, indices, w_gate, w_up, w_down, *, token_mask, mesh_axes, options):
    del mesh_axes, options  # all experts on one device
    return _on_flat_tokens(blocked_dispatch, x, weights, indices, w_gate, w_up, w_down,
                           token_mask)


def _gathered(x, weights, indices, w_gate, w_up, w_down, *, token_mask, mesh_axes, options):
    del mesh_axes, options  # all experts on one device
    return _on_flat_tokens(gathered_dispatch, x, weights, indices, w_gate, w_up, w_down,
                           token_mask)


def _expert_parallel(x, weights, indices, w_gate, w_up, w_down, *, token_mask, mesh_axes,
                     options, with_drops=False):
    if x.ndim != 3:
        raise ValueError(f"expert-parallel dispatch needs tokens [B, T, D], got shape {x.shape}")
    token_spec, weight_spec = (P(), P()) if mesh_axes is None else mesh_axes
    return expert_parallel.dispatch(x, weights, indices, w_gate, w_up, w_down,
                                    token_mask=token_mask, token_spec=token_spec,
                                    weight_spec=weight_spec,
                                    options=options or expert_parallel.ExpertParallelOptions(),
                                    with_drops=with_drops)


# name -> fn(x, weights, indices, w_gate, w_up, w_down, *, token_mask, mesh_axes, options), the
# contract of `dispatch`.
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "dense": _dense,
    "ragged": _ragged,
    "blocked": _blocked,
    "gathered": _gathered,
    "expert_parallel": _expert_parallel,
    "auto": None,  # resolved per call by `resolve_impl`
}
IMPLS = tuple(IMPLEMENTATIONS)
# Backends with every expert on the one device, which `gathered` may stand in for.
_ONE_DEVICE = ("dense", "ragged", "blocked")


def resolve_impl(impl: str, mesh_axes: tuple | None) -> str:
    """The backend `impl` names for a call with these `mesh_axes`: "auto" becomes
    "expert_parallel" when the current mesh splits the experts (`mesh_axes[1]`'s first entry),
    else the fastest one-device dispatch for the backend; other names stay."""
    if impl != "auto":
        return impl
    if mesh_axes is not None and expert_parallel.splits_experts(mesh_axes[1]):
        return "expert_parallel"
    return fastest_one_device_impl()


def dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
             w_up: jax.Array, w_down: jax.Array, *, impl: str = "auto",
             token_mask: jax.Array | None = None, mesh_axes: tuple | None = None,
             options: expert_parallel.ExpertParallelOptions | None = None,
             with_drops: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs the routed experts: sum over a token's k experts of gate weight x SwiGLU expert.

    Args:
      x: [..., D] tokens ([T, D] or [B, T, D]; expert_parallel needs [B, T, D]).
      weights, indices: [..., k] gate weights and expert ids (from `routing.route`).
      w_gate, w_up: [E, D, F]; w_down: [E, F, D].
      impl: one of `IMPLS` ("auto" resolved by `resolve_impl`); a one-device backend gives way
        to `gathered` when T*k < E.
      token_mask: [...] bool, False for padding: its output is zero (and expert parallelism does
        not send it). None = every token is real.
      mesh_axes: optional (x, w_gate) mesh PartitionSpecs of [batch, length, embed] and
        [experts, embed, mlp] (from the logical axis rules); expert_parallel splits the experts
        over the axes of the second one's first entry. The one-device backends ignore it.
      options: expert_parallel's receive-buffer capacity and transport (the model's
        `RuntimeConfig`; None = dropless, transport by backend). The others ignore it.
      with_drops: also return how many token copies the expert capacity dropped ([] int32;
        always 0 for the one-device backends, which are dropless).
    Returns x's shape and dtype.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"MoE impl {impl!r} is not one of {IMPLS}")
    impl = resolve_impl(impl, mesh_axes)
    num_tokens = x.size // x.shape[-1]
    if impl in _ONE_DEVICE and reads_fewer_weights(num_tokens, indices.shape[-1],
                                                   w_gate.shape[0]):
        impl = "gathered"
    if impl == "expert_parallel":
        return _expert_parallel(x, weights, indices, w_gate, w_up, w_down, token_mask=token_mask,
                                mesh_axes=mesh_axes, options=options, with_drops=with_drops)
    y = IMPLEMENTATIONS[impl](x, weights, indices, w_gate, w_up, w_down,
                              token_mask=token_mask, mesh_axes=mesh_axes, options=options)
    return (y, jnp.zeros((), jnp.int32)) if with_drops else y
