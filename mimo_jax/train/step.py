"""The train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

train_step(state, batch, learning_rate) -> (state, metrics):
  1. split the batch into `grad_accum_steps` micro-batches and sum their gradients (a scan, so
     memory holds one micro-batch of activations); under the batch ramp, a micro-batch that is
     all padding is skipped (a `lax.cond`), not computed;
  2. one AdamW update at `learning_rate` (a traced scalar, so the schedule never recompiles the
     step; the correction biases get a zero update);
  3. the router-bias rule with the summed expert load;
  4. if the loss or the gradient norm is not finite, the whole update is dropped: the state keeps
     its parameters and optimizer state and only `step` advances. `metrics["finite"]` says so.

One step builder serves every trainer. A batch that carries a `loss_mask` ([B, T], SFT) is
scored on its marked targets only (`sft_loss`); a batch without one (pretraining) on every
target of its documents, exactly as before the mask existed. The choice is made when the step is
traced, from the batch's keys.
Legend: B batch, T length, A micro-batches.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mimo_jax.config import ModelConfig, with_runtime
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.train import losses, sft_loss
from mimo_jax.train.config import TrainConfig
from mimo_jax.train.optimizer import FROZEN, param_labels, scale_updates
from mimo_jax.train.router_bias import update_biases
from mimo_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def _micro_batches(batch: Batch, count: int) -> Batch:
    """[B, T] -> [A, B / A, T]; micro-batch a holds rows a, a + A, ... so that each device's rows
    of the data-parallel split feed every micro-batch equally."""
    def split(x):
        return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def _loss_sums(output: Any, batch: Batch) -> jax.Array:
    """[1 + M] summed cross-entropies of a (micro-)batch: on the `loss_mask` targets when the
    batch has one, else on every target of its documents."""
    if "loss_mask" in batch:
        return sft_loss.sft_loss_sums(output, batch["tokens"], batch["segment_ids"],
                                      batch["loss_mask"])
    return losses.loss_sums(output, batch["tokens"], batch["segment_ids"])


def _target_counts(batch: Batch, num_mtp_heads: int) -> jax.Array:
    """[1 + M] targets of the main head and of each MTP head, counted as `_loss_sums` scores."""
    if "loss_mask" in batch:
        return sft_loss.sft_target_counts(batch["segment_ids"], batch["loss_mask"],
                                          num_mtp_heads)
    return losses.target_counts(batch["segment_ids"], num_mtp_heads)


def zero_grad_params(grads: Any) -> jax.Array:
    """[] float32: how many trained parameters have a gradient of exactly 0.

    The router's correction biases are left out: no gradient ever reaches them (see
    `optimizer.param_labels`). Each leaf is counted in int32 along its last axis (no row
    overflows) and the row counts are added in float32, since the full model's 309B parameters
    overflow int32: exact below 2**24 parameters, within a relative 1e-6 above.
    """
    labels = param_labels(grads)
    total = jnp.zeros((), jnp.float32)
    for grad, label in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)):
        if label == FROZEN:
            continue
        rows = (grad == 0).reshape(-1, grad.shape[-1] if grad.ndim else 1)
        total += jnp.sum(jnp.sum(rows, axis=-1, dtype=jnp.int32).astype(jnp.float32))
    return total


def document_count(segment_ids: jax.Array) -> jax.Array:
    """Documents in a packed batch: [B, T] segment ids (0 = padding) -> [] float32.

    A document is a run of one nonzero id in a row (packing writes each document whole and in
    one piece), as `sequence_balance_loss` counts them.
    """
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), starts], axis=1)
    return jnp.sum(starts & (segment_ids > 0), dtype=jnp.float32)


def make_train_step(model: MiMoV2Flash, model_config: ModelConfig, train_config: TrainConfig,
                    optimizer: optax.GradientTransformation, *, count_zero_grads: bool = False
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple]:
    """The un-jitted train step for this model and config.

    count_zero_grads: also report `metrics["zero_grad_params"]` (see `zero_grad_params`), the
    report's stability metric for post-training.
    """
    num_heads = model_config.num_mtp_heads
    accum = train_config.grad_accum_steps
    # Under the batch ramp some micro-batches are all padding (`batch_ramp.RampedBatches`).
    skip_empty = train_config.batch_ramp_steps > 0

    def micro_loss(params, micro: Batch, counts: jax.Array, documents: jax.Array):
        output = model.apply({"params": params}, micro["tokens"],
                             segment_ids=micro["segment_ids"], positions=micro["positions"],
                             return_mtp=num_heads > 0)
        sums = _loss_sums(output, micro)
        # Dividing by full-batch counts here makes the summed micro-gradients exactly the
        # gradient of the full-batch objective: token counts for the cross-entropies, document
        # counts for the balance loss (a mean over the batch's documents).
        balance = output.balance_loss * document_count(micro["segment_ids"]) / documents
        objective, _ = losses.total_loss(sums, counts, balance, train_config.mtp_loss_weight,
                                         train_config.balance_loss_weight)
        return objective, (sums, balance, output.expert_load, output.dropped_copies)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch,
                   learning_rate: jax.Array) -> tuple[TrainState, dict]:
        counts = _target_counts(batch, num_heads)
        documents = jnp.maximum(document_count(batch["segment_ids"]), 1.0)
        if accum == 1:
            (_, (sums, balance, load, dropped)), grads = grad_fn(state.params, batch, counts,
                                                                 documents)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            layers = len(model_config.moe_layers)
            init = (zeros, jnp.zeros((num_heads + 1,), jnp.float32), jnp.zeros((), jnp.float32),
                    jnp.zeros((layers, model_config.num_experts), jnp.float32),
                    jnp.zeros((layers,), jnp.int32))

            def micro_step(micro):
                (_, aux), grads = grad_fn(state.params, micro, counts, documents)
                return grads, *aux

            def body(carry, micro):
                if skip_empty:  # a ramp step's padding micro-batches cost nothing
                    out = jax.lax.cond(jnp.any(micro["segment_ids"] > 0), micro_step,
                                       lambda _: init, micro)
                else:
                    out = micro_step(micro)
                return jax.tree.map(jnp.add, carry, out), None

            (grads, sums, balance, load, dropped), _ = jax.lax.scan(
                body, init, _micro_batches(batch, accum))
        loss, parts = losses.total_loss(sums, counts, balance, train_config.mtp_loss_weight,
                                        train_config.balance_loss_weight)
        new_state, grad_norm, finite = apply_gradients(
            state, grads, loss, load, learning_rate, optimizer=optimizer,
            model_config=model_config, train_config=train_config)
        metrics = dict(parts, loss=loss, grad_norm=grad_norm, finite=finite,
                       learning_rate=learning_rate,
                       tokens=jnp.sum(batch["segment_ids"] > 0, dtype=jnp.int32),
                       expert_load=load, max_load_violation=_max_load_violation(load),
                       dropped_copies=jnp.sum(dropped))
        if count_zero_grads:
            metrics["zero_grad_params"] = zero_grad_params(grads)
        return new_state, metrics

    return train_step


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array, expert_load: jax.Array,
                    learning_rate: jax.Array, *, optimizer: optax.GradientTransformation,
                    model_config: ModelConfig, train_config: TrainConfig
                    ) -> tuple[TrainState, jax.Array, jax.Array]:
    """One AdamW update at `learning_rate`, then the router-bias rule with `expert_load` [L, E];
    a non-finite loss or gradient norm drops the whole update (only `step` advances and the RNG
    key moves on). Returns (new state, gradient norm [], finite [] bool). Every trainer's step
    ends here."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, scale_updates(updates, learning_rate))
    params = update_biases(params, expert_load, train_config.bias_update_rate, model_config)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(step=state.step + 1,
                           params=jax.tree.map(keep, params, state.params),
                           opt_state=jax.tree.map(keep, opt_state, state.opt_state),
                           rng=rng)
    return new_state, grad_norm, finite


def _max_load_violation(load: jax.Array) -> jax.Array:
    """max over layers of (max expert load / mean load - 1): 0 is perfect balance."""
    if load.shape[0] == 0:
        return jnp.zeros((), jnp.float32)
    mean = jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
    return jnp.max(jnp.max(load, axis=-1) / mean - 1.0)


def make_eval_step(model: MiMoV2Flash, model_config: ModelConfig) -> Callable[[Any, Batch], dict]:
    """eval_step(params, batch) -> {"sums": [1 + M], "counts": [1 + M]} for summing over batches
    (response targets only when the batch has a `loss_mask`). Evaluation is dropless: the expert
    capacity, which training may clip, is lifted (capacity factor 0)."""
    num_heads = model_config.num_mtp_heads
    model = model.clone(config=with_runtime(model.config, expert_capacity_factor=0.0))

    def eval_step(params, batch: Batch) -> dict:
        output = model.apply({"params": params}, batch["tokens"],
                             segment_ids=batch["segment_ids"], positions=batch["positions"],
                             return_mtp=num_heads > 0)
        return {"sums": _loss_sums(output, batch), "counts": _target_counts(batch, num_heads)}

    return eval_step
