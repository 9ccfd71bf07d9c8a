"""The MTP shift on a sequence split over the context axis, with packed documents and padding
crossing shard borders. (Context-parallel attention runs in the shared attention cases,
tests/ops/attention/test_implementations.py.)"""

import jax.numpy as jnp
import numpy as np

from mimo_jax.model.mtp import shift_left
from mimo_jax.parallel import Parallelism, mesh_config_from_dict

B, T = 2, 32
# Row 0: five documents and padding, borders inside and on shard edges (shards of 8 or 4).
SEGMENTS = np.array([[1] * 5 + [2] * 14 + [3] * 5 + [4] * 5 + [0] * 3, [1] * 32], np.int32)


def test_mtp_shift_crosses_context_shard_borders():
    parallelism = Parallelism.from_config(
        mesh_config_from_dict(dict(ici="context=8", rules="fsdp_cp")))
    tokens = np.random.default_rng(0).integers(1, 100, (B, T)).astype(np.int32)
    sharding = parallelism.batch_shardings({"x": tokens})["x"]
    assert sharding.shard_shape(tokens.shape) == (B, 4)

    def shifts(tokens, segments):
        return [shift_left(tokens, segments, s) for s in (1, 2, 3, 5)]

    got = parallelism.jit(shifts, (sharding, sharding), None)(tokens, SEGMENTS)
    want = shifts(jnp.asarray(tokens), jnp.asarray(SEGMENTS))
    for (g, g_valid), (w, w_valid) in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        np.testing.assert_array_equal(np.asarray(g_valid), np.asarray(w_valid))
    # A target really comes from the next shard: position 3 (shard 0) -> 4 (shard 1) in row 1.
    assert int(got[0][0][1, 3]) == tokens[1, 4]
