"""Decoding over a mesh of 8 simulated devices (`inference.on_mesh`): tensor-parallel heads,
expert-parallel MoE (the `all_to_all` stand-in of `ragged_all_to_all` on CPU) and the KV cache
split over the batch rows give the tokens, routing and log-probs of one device."""

import jax
import numpy as np
import pytest

from mimo_jax.inference import generate, rollout, speculative_generate
from mimo_jax.inference.sampling import SamplingConfig
from mimo_jax.parallel import Parallelism, mesh_config_from_dict

MESH = dict(ici="tensor=2,expert=4", rules="fsdp_tp_ep")  # rows split 4 ways, heads 2 ways


@pytest.fixture(name="parallelism", scope="module")
def fixture_parallelism():
    return Parallelism.from_config(mesh_config_from_dict(MESH))


def test_greedy_generation_on_a_mesh_equals_one_device(decode_model, prompts, parallelism):
    model, params = decode_model
    tokens, lengths = prompts([7, 3, 5, 1], model.config.vocab_size, seed=4)
    one = generate(model, params, tokens, lengths, max_new_tokens=10, stop_tokens=(5,),
                   return_routing=True)
    mesh = generate(model, params, tokens, lengths, max_new_tokens=10, stop_tokens=(5,),
                    return_routing=True, parallelism=parallelism)
    np.testing.assert_array_equal(np.asarray(mesh.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(mesh.lengths), np.asarray(one.lengths))
    np.testing.assert_array_equal(np.asarray(mesh.routing), np.asarray(one.routing))
    # The program really ran on the mesh, the rows split over the batch axes.
    assert mesh.tokens.sharding.mesh.shape == parallelism.mesh.shape
    assert mesh.tokens.sharding.spec[0] is not None


def test_speculative_generation_on_a_mesh_equals_one_device(decode_model, prompts,
                                                            parallelism):
    model, params = decode_model
    tokens, lengths = prompts([6, 2, 4, 6], model.config.vocab_size, seed=5)
    one = speculative_generate(model, params, tokens, lengths, max_new_tokens=9, num_draft=3)
    mesh = speculative_generate(model, params, tokens, lengths, max_new_tokens=9, num_draft=3,
                                parallelism=parallelism)
    np.testing.assert_array_equal(np.asarray(mesh.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(mesh.steps), np.asarray(one.steps))


def test_rollout_on_a_mesh_records_the_same_log_probs(decode_model, prompts, parallelism):
    """Greedy rollouts (temperature ~0 keeps the tokens equal whatever the rounding): same
    tokens, routing, and sampling log-probs within float32 rounding."""
    model, params = decode_model
    tokens, lengths = prompts([5, 3], model.config.vocab_size, seed=6)
    kwargs = dict(samples_per_prompt=2, max_new_tokens=6, rng=jax.random.key(1),
                  sampling=SamplingConfig(temperature=1e-3))
    one = rollout(model, params, tokens, lengths, **kwargs)
    mesh = rollout(model, params, tokens, lengths, parallelism=parallelism, **kwargs)
    np.testing.assert_array_equal(np.asarray(mesh.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(mesh.routing), np.asarray(one.routing))
    np.testing.assert_allclose(np.asarray(mesh.logprobs), np.asarray(one.logprobs),
                               rtol=1e-4, atol=1e-4)


def test_a_batch_that_does_not_split_is_refused(decode_model, prompts, parallelism):
    model, params = decode_model
    tokens, lengths = prompts([4, 2, 3], model.config.vocab_size)
    with pytest.raises(ValueError, match=r"batch 3 does not split over the batch axes "
                                         r"\('data', 'fsdp', 'expert'\) \(4 pieces\)"):
        generate(model, params, tokens, lengths, max_new_tokens=2, parallelism=parallelism)
