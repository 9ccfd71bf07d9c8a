"""The train state: one pytree of step, parameters, optimizer state and RNG key."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mimo_jax.model.transformer import MiMoV2Flash, init_params


@flax.struct.dataclass
class TrainState:
    """step: [] int32 optimizer steps taken (skipped non-finite steps included, since their
    batch was consumed). params: the model parameters, router biases included. opt_state: the
    optax state. rng: [2] uint32 raw key, split once per step (kept so a resumed run continues
    any randomness exactly)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_state(model: MiMoV2Flash, optimizer: optax.GradientTransformation,
               seed: int) -> TrainState:
    """Fresh parameters from `seed` and a zero optimizer state (call under jit)."""
    init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(model, init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=rng)


def state_from_params(params: Any, optimizer: optax.GradientTransformation,
                      seed: int) -> TrainState:
    """A fresh run's state around given parameters (e.g. `init_from`'s): step 0, a zero
    optimizer state and the RNG key `init_state(seed)` would have (call under jit)."""
    _, rng = jax.random.split(jax.random.PRNGKey(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=rng)
