"""The tiny model (configs/tiny.py) end to end with the Pallas attention kernels, interpreted on
CPU, against the same model with the dense reference attention: logits and MTP logits.

Inputs and weights are fresh random draws each run (the seed is in every failure message).
"""

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from mimo_jax.config import model_config_from_dict, with_runtime
from mimo_jax.model.transformer import MiMoV2Flash, init_params
from attention_inputs import relative_error


def _random_params(model: MiMoV2Flash, seed: int) -> dict:
    """Random weights of the model's parameter shapes, drawn with numpy (tracing init and drawing
    on the host costs far less than compiling init). Norm scales near 1; sinks of order 1, so the
    sink path carries weight."""
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    params = []
    for path, leaf in leaves:
        name = getattr(path[-1], "key", "")
        noise = rng.standard_normal(leaf.shape)
        value = 1.0 + 0.1 * noise if name == "scale" else noise if name == "sinks" else 0.02 * noise
        params.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, params)


def test_tiny_model_with_pallas_attention_matches_reference(seed):
    config = model_config_from_dict(tiny.get_config().model)
    params = _random_params(MiMoV2Flash(config), seed)
    batch, length = 2, 160  # more than one 128 block: the window of 33 crosses block edges
    tokens = jnp.asarray(np.random.default_rng(seed + 1).integers(1, config.vocab_size,
                                                                  (batch, length)), jnp.int32)
    segment_ids = jnp.asarray(
        [[1] * 50 + [2] * 70 + [3] * 25 + [0] * 15, [1] * 130 + [0] * 30], jnp.int32)

    def run(impl: str):
        model = MiMoV2Flash(with_runtime(config, attention_impl=impl))
        return jax.jit(lambda p: model.apply({"params": p}, tokens, segment_ids=segment_ids,
                                             return_mtp=True))(params)

    pallas, reference = run("pallas"), run("reference")
    assert "sinks" in str(jax.tree_util.tree_structure(params))
    for name in ("logits", "mtp_logits"):
        err = relative_error(getattr(pallas, name), getattr(reference, name))
        assert err <= 1e-5, f"{name} error {err:.2e} (seed {seed})"
