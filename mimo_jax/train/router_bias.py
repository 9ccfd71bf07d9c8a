"""Applies the model's aux-loss-free bias rule to every MoE layer of a parameter tree.

The model reports `expert_load` as [L, E] for its L MoE layers in layer order; the biases sit in
the tree per layer (`decoder/layer_{i}/moe/...`) or per scanned run (`decoder/run_{r}/moe/...`,
[run length, E]). This module only routes rows to leaves; the update itself is
`mimo_jax.ops.moe.update_correction_bias`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax.config import MOE, ModelConfig
from mimo_jax.model import layout
from mimo_jax.model.moe import CORRECTION_BIAS
from mimo_jax.ops.moe import update_correction_bias


def bias_locations(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(decoder block name, first row of expert_load, rows) for each block holding biases."""
    out, row = [], 0
    for r, run in enumerate(layout.layer_runs(config)):
        if run.mlp_type != MOE:
            continue
        if config.scan_layers:
            out.append((layout.block_name(config, r, run.start), row, run.length))
        else:
            out.extend((layout.block_name(config, r, i), row + j, 1)
                       for j, i in enumerate(run.layers))
        row += run.length
    return out


def update_biases(params: dict, expert_load: jax.Array, rate: float,
                  config: ModelConfig) -> dict:
    """A copy of `params` with every MoE layer's correction bias moved by its load ([L, E])."""
    decoder = dict(params["decoder"])
    for name, row, rows in bias_locations(config):
        block = dict(decoder[name])
        moe = dict(block["moe"])
        load = expert_load[row: row + rows]
        if not config.scan_layers:
            load = load[0]
        moe[CORRECTION_BIAS] = update_correction_bias(moe[CORRECTION_BIAS], load, rate)
        block["moe"] = moe
        decoder[name] = block
    out = dict(params)
    out["decoder"] = decoder
    return out


def get_biases(params: dict, config: ModelConfig) -> jax.Array:
    """[L, E] correction biases of all MoE layers in layer order (for logging and tests)."""
    rows = []
    for name, _, _ in bias_locations(config):
        bias = params["decoder"][name]["moe"][CORRECTION_BIAS]
        rows.append(bias if config.scan_layers else bias[None])
    if not rows:
        return jnp.zeros((0, config.num_experts), jnp.float32)
    return jnp.concatenate(rows, axis=0)

