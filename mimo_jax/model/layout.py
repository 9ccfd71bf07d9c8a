"""How the decoder layers sit in the parameter tree.

Consecutive layers with the same (attention type, FFN type) form a run. With `scan_layers` each run
is one `nn.scan` module named `run_{r}` whose parameters carry a leading [run length] axis, so the
48-layer model compiles 17 layer bodies instead of 48; without it each layer is `layer_{i}`. These
helpers move between that tree and a plain per-layer list (checkpoint conversion uses them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """Layers [start, start + length) share `layer_type` and `mlp_type`."""

    start: int
    length: int
    layer_type: str
    mlp_type: str

    @property
    def layers(self) -> range:
        return range(self.start, self.start + self.length)


def layer_runs(config: ModelConfig) -> list[LayerRun]:
    """Maximal runs of identical consecutive layers, in order."""
    runs: list[LayerRun] = []
    for i, kinds in enumerate(zip(config.layer_types, config.mlp_types)):
        last = runs[-1] if runs else None
        if last is not None and (last.layer_type, last.mlp_type) == kinds:
            runs[-1] = dataclasses.replace(last, length=last.length + 1)
        else:
            runs.append(LayerRun(i, 1, *kinds))
    return runs


def block_name(config: ModelConfig, run_index: int, layer_index: int) -> str:
    """The module name that holds a layer: `run_{r}` when scanning, else `layer_{i}`."""
    return f"run_{run_index}" if config.scan_layers else f"layer_{layer_index}"


def unstack_layers(decoder_params: dict[str, Any], config: ModelConfig) -> list[dict[str, Any]]:
    """The decoder's parameter subtree -> one parameter dict per layer, in layer order."""
    layers = []
    for r, run in enumerate(layer_runs(config)):
        for j, i in enumerate(run.layers):
            if config.scan_layers:
                layers.append(jax.tree.map(lambda x, j=j: _index(x, j), decoder_params[f"run_{r}"]))
            else:
                layers.append(decoder_params[f"layer_{i}"])
    return layers


def _index(x: Any, j: int) -> Any:
    """x[j], also for the shape-only leaves of `jax.eval_shape`."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[j]


def stack_layers(layers: list[dict[str, Any]], config: ModelConfig,
                 stack=None) -> dict[str, Any]:
    """The inverse of `unstack_layers`. `stack` joins arrays along a new axis 0 (numpy or jnp)."""
    if len(layers) != config.num_layers:
        raise ValueError(f"expected {config.num_layers} layers, got {len(layers)}")
    if stack is None:
        stack = np.stack
    out = {}
    for r, run in enumerate(layer_runs(config)):
        if config.scan_layers:
            out[f"run_{r}"] = jax.tree.map(lambda *xs: stack(xs), *[layers[i] for i in run.layers])
        else:
            out.update({f"layer_{i}": layers[i] for i in run.layers})
    return out


def relayout_decoder(params: dict[str, Any], config: ModelConfig,
                     scan_layers: bool) -> dict[str, Any]:
    """`params` (laid out for `config`) with the decoder in the layout `scan_layers` asks for.

    Decoding on CPU is faster with one module per layer (no stacked weights to slice), while
    training compiles faster scanned; this moves a checkpoint between the two.
    """
    if config.scan_layers == scan_layers:
        return params
    target = dataclasses.replace(config, scan_layers=scan_layers)
    layers = unstack_layers(params["decoder"], config)
    return {**params, "decoder": stack_layers(layers, target, stack=jnp.stack)}
