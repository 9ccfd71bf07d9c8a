"""Shared pieces of the parallelism tests (imported by the tests and by the multi-process worker):
a 3-layer float32 model, a packed batch with padding, the objective, and quick-compile options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
import model_configs
# The parallel tests read QUICK_COMPILE from here.
from compile_options import QUICK_COMPILE  # noqa: F401  pylint: disable=unused-import
from mimo_jax.config import ModelConfig
from mimo_jax.train import losses

# A quicker model: a global dense layer and a sliding MoE layer, no MTP head.
SMALL = dict(num_layers=2, num_mtp_heads=0)
VOCAB = 256


def parallel_model_config(runtime: dict | None = None, **overrides) -> ModelConfig:
    """configs/tiny.py shrunk: 3 layers (global+dense, then 2 sliding+MoE), window 9 (longer than
    a context shard, so halos cross two shards), 8 experts top-2, one MTP head, float32.
    `overrides` replace model keys, `runtime` runtime keys (e.g. {"moe_impl": "dense"})."""
    runtime = {f"runtime.{key}": value for key, value in (runtime or {}).items()}
    return model_configs.tiny_model({
        "num_layers": 3, "vocab_size": VOCAB, "hidden_size": 32,
        "sliding.num_heads": 4, "sliding.num_kv_heads": 2, "sliding.qk_head_dim": 16,
        "sliding.v_head_dim": 8, "sliding.rope_dim": 8, "sliding.sliding_window": 9,
        "full.num_heads": 4, "full.num_kv_heads": 1, "full.qk_head_dim": 16, "full.v_head_dim": 8,
        "full.rope_dim": 8, "dense_intermediate_size": 64, "moe_intermediate_size": 16,
        "num_experts": 8, "num_experts_per_token": 2, "runtime.attention_chunk_size": 4,
        "num_mtp_heads": 1, **overrides, **runtime})


def packed_batch(batch: int = 8, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens; rows hold several documents (some crossing shard borders) and padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (batch, length)).astype(np.int32)
    segments = np.ones((batch, length), np.int32)
    segments[0, 5:] = 2
    segments[1, length - 4:] = 0
    segments[3, 7:] = 2
    segments[3, 11:] = 3
    segments[5, 2:] = 2
    segments[5, length - 1:] = 0
    return {"tokens": tokens, "segment_ids": segments}


def objective(model, params, batch) -> jax.Array:
    """Next-token + MTP cross-entropy (token means) + 0.01 x the balance loss."""
    out = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                      return_mtp=model.config.num_mtp_heads > 0)
    sums = losses.loss_sums(out, batch["tokens"], batch["segment_ids"])
    counts = losses.target_counts(batch["segment_ids"], sums.shape[0] - 1)
    return jnp.sum(sums / jnp.maximum(counts, 1.0)) + 1e-2 * out.balance_loss


def max_relative_error(got, want) -> float:
    """max over leaves of ||got - want|| / ||want|| (leaves of norm 0 compare absolutely)."""
    errors = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = np.linalg.norm(w)
        errors.append(np.linalg.norm(g - w) / (scale if scale > 0 else 1.0))
    return max(errors)


def random_params(model, seed: int = 1):
    """Random parameters of `model`'s shapes without compiling its init (normal(0, 0.1); norm
    scales 1 + normal(0, 0.1)); the correction biases random too, so routing is uneven."""
    from mimo_jax.model.transformer import init_params  # pylint: disable=import-outside-toplevel
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        values = rng.normal(0.0, 0.1, leaf.shape)
        if getattr(path[-1], "key", None) == "scale":
            values += 1.0
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def train_setup(moe_impl: str, seed: int = 1, **model_overrides):
    """The real pretraining step for the 3-layer model.

    Returns (model, train_step, initial state, batch, schedule): `train_step(state, batch,
    learning_rate)` is `mimo_jax.train.step`'s (AdamW, clipping, MTP and balance losses,
    router-bias updates; configs/tiny.py's train section), the state holds `random_params` and a
    fresh optimizer state, `schedule(step)` is the host-side learning rate. Keyword arguments
    override model config keys.
    """
    # pylint: disable=import-outside-toplevel
    from mimo_jax.model.transformer import MiMoV2Flash, positions_from_segments
    from mimo_jax.train.config import train_config_from_dict
    from mimo_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from mimo_jax.train.state import TrainState
    from mimo_jax.train.step import make_train_step

    model_config = parallel_model_config(dict(moe_impl=moe_impl), **model_overrides)
    model = MiMoV2Flash(model_config)
    train_config = train_config_from_dict(tiny.get_config().train)
    params = random_params(model, seed)
    optimizer = make_optimizer(train_config, params)
    step = make_train_step(model, model_config, train_config, optimizer)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))
    batch = packed_batch()
    batch["positions"] = np.asarray(positions_from_segments(jnp.asarray(batch["segment_ids"])))
    return model, step, state, batch, learning_rate_schedule(train_config)


def param_norms(params) -> jax.Array:
    """[leaves] float32 L2 norm of every parameter (a small, replicated summary)."""
    return jnp.stack([jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))
                      for x in jax.tree.leaves(params)])
