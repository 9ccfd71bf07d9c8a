"""Cached decoding against recomputing the full forward, ring-buffer rollback, stop tokens, cache
shapes."""

import dataclasses
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.config import GA, SWA
from mimo_jax.inference import cache as kv_cache
from mimo_jax.inference import decode
from mimo_jax.inference.generation import generate
from mimo_jax.inference.speculative import speculative_generate
from mimo_jax.model import layout
from mimo_jax.model.transformer import MiMoV2Flash

LENGTHS = [23, 5, 14]  # prompts of different lengths, right-padded into one batch
NEW_TOKENS = 40  # every row ends past position 44: five windows of 9


def _full_forward(model):
    return jax.jit(lambda p, t: model.apply({"params": p}, t).logits)


def _greedy_by_recompute(model, params, tokens, lengths, new_tokens):
    """Greedy decoding that reruns the whole forward on the whole buffer for every token (causal:
    what follows a row's frontier cannot change the logits at it)."""
    forward = _full_forward(model)
    width = tokens.shape[1] + new_tokens
    buffer = np.zeros((len(lengths), width), np.int32)
    buffer[:, :tokens.shape[1]] = tokens
    frontier = np.asarray(lengths) - 1
    rows = np.arange(len(lengths))
    for _ in range(new_tokens):
        logits = np.asarray(forward(params, jnp.asarray(buffer)))
        buffer[rows, frontier + 1] = logits[rows, frontier].argmax(-1)
        frontier += 1
    return [buffer[b, n:n + new_tokens].tolist() for b, n in enumerate(lengths)]


def test_greedy_cached_decoding_equals_full_recompute(decode_model, prompts):
    model, params = decode_model
    tokens, lengths = prompts(LENGTHS, model.config.vocab_size, seed=1)
    out = generate(model, params, tokens, lengths, max_new_tokens=NEW_TOKENS, prefill_chunk=8)
    expected = _greedy_by_recompute(model, params, tokens, lengths, NEW_TOKENS)
    for row in range(len(LENGTHS)):
        assert out.generated(row) == expected[row], f"row {row}"
        np.testing.assert_array_equal(np.asarray(out.tokens[row, :LENGTHS[row]]),
                                      tokens[row, :LENGTHS[row]])
    np.testing.assert_array_equal(out.num_generated, NEW_TOKENS)
    np.testing.assert_array_equal(out.lengths, np.asarray(LENGTHS) + NEW_TOKENS)
    np.testing.assert_array_equal(out.steps, NEW_TOKENS - 1)  # the first comes from the prefill
    assert len(set(map(tuple, expected))) == len(LENGTHS)  # rows differ


def test_chunked_steps_and_rollback_match_full_forward(decode_config, random_params,
                                                       logits_step):
    """Teacher-forced logits to 1e-5 with unscanned layers (a cache entry per layer): prompts fed
    4 tokens at a time, single-token steps, a 4-token chunk, a rollback of its last 2 positions
    (as after rejected drafts) and a 3-token chunk over them; every step is a 4-wide chunk with
    padding, and the two rows are at different positions throughout."""
    model = MiMoV2Flash(decode_config(scan_layers=False))
    params = random_params(model, 1)
    rng = np.random.default_rng(2)
    lengths = np.asarray([13, 6], np.int32)
    final = rng.integers(0, model.config.vocab_size, (2, 48)).astype(np.int32)
    cache = kv_cache.init_cache(model.config, 2, 48, extra_slots=3)
    assert set(cache["decoder"]) == {f"layer_{i}" for i in range(4)}
    expected = np.asarray(_full_forward(model)(params, jnp.asarray(final)))
    step = logits_step(model)
    decoder_cache = cache["decoder"]
    frontier = np.zeros(2, np.int32)  # the next position to feed, per row

    def feed(source, count, check=True):
        nonlocal decoder_cache
        count = np.broadcast_to(count, (2,))
        positions = frontier[:, None] + np.arange(4)
        chunk = np.take_along_axis(source, positions, 1)
        positions = np.where(np.arange(4) < count[:, None], positions, -1)
        logits, decoder_cache = step(params, jnp.asarray(chunk),
                                     jnp.asarray(positions, jnp.int32), decoder_cache)
        if check:
            want = np.take_along_axis(expected, np.maximum(positions, 0)[..., None], 1)
            valid = positions >= 0
            np.testing.assert_allclose(np.asarray(logits)[valid], want[valid], atol=1e-5, rtol=0)

    while np.any(frontier < lengths):  # the prompts, 4 tokens at a time
        count = np.minimum(lengths - frontier, 4)
        feed(final, count)
        frontier += count
    for _ in range(12):
        feed(final, 1)
        frontier += 1
    # A 4-token chunk whose last 2 tokens are wrong: their keys land in the cache ...
    mixed = final.copy()
    for row, start in enumerate(frontier):
        mixed[row, start + 2:start + 4] = (final[row, start + 2:start + 4] + 1) % 64
    feed(mixed, 4, check=False)
    # ... and must be invisible once the sequence goes on from the first wrong position.
    frontier += 2
    feed(final, 3)
    frontier += 3
    for _ in range(12):
        feed(final, 1)
        frontier += 1


def test_stop_tokens_end_rows_independently(decode_model, prompts):
    model, params = decode_model
    tokens, lengths = prompts(LENGTHS, model.config.vocab_size, seed=1)
    free = generate(model, params, tokens, lengths, max_new_tokens=NEW_TOKENS, prefill_chunk=8)
    stop = free.generated(0)[4]
    out = generate(model, params, tokens, lengths, max_new_tokens=NEW_TOKENS, prefill_chunk=8,
                   stop_tokens=(stop,))
    for row in range(len(LENGTHS)):
        full = free.generated(row)
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert out.generated(row) == full[:cut]
    assert len(out.generated(0)) <= 5
    assert len(out.generated(1)) > 5 or len(out.generated(2)) > 5  # the others went on


def test_scanned_and_unstacked_layers_decode_the_same_tokens(decode_model, prompts):
    """Generation runs scanned runs as they are (accelerators) or one module per layer (the CPU
    default); both give the same tokens, plain and speculative, and the relayout is exact."""
    model, params = decode_model
    unstacked = layout.relayout_decoder(params, model.config, scan_layers=False)
    assert sorted(unstacked["decoder"]) == [f"layer_{i}" for i in range(4)]
    per_layer_config = dataclasses.replace(model.config, scan_layers=False)
    back = layout.relayout_decoder(unstacked, per_layer_config, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    tokens, lengths = prompts(LENGTHS, model.config.vocab_size, seed=3)
    outputs = [generate(model, params, tokens, lengths, max_new_tokens=NEW_TOKENS,
                        prefill_chunk=8, unstack_layers=unstack) for unstack in (False, True)]
    outputs.append(speculative_generate(model, params, tokens, lengths,
                                        max_new_tokens=NEW_TOKENS, prefill_chunk=8,
                                        unstack_layers=False))
    for row in range(len(LENGTHS)):
        assert outputs[1].generated(row) == outputs[0].generated(row), f"row {row}"
        assert outputs[2].generated(row) == outputs[0].generated(row), f"row {row}"


def test_per_layer_copy_is_made_once_per_params(decode_model):
    """`decode.loop_layout` copies the scanned runs once per params: the same arrays get the same
    copy back, other arrays (even equal ones) a new one, and the copy goes with its source."""
    model, params = decode_model
    params = jax.tree.map(jnp.copy, params)  # arrays this test alone holds
    config, first = decode.loop_layout(model.config, params, True)
    assert not config.scan_layers
    jax.tree.map(np.testing.assert_array_equal, first,
                 layout.relayout_decoder(params, model.config, scan_layers=False))
    assert decode.loop_layout(model.config, params, True)[1] is first
    other = jax.tree.map(jnp.copy, params)
    assert decode.loop_layout(model.config, other, True)[1] is not first
    assert decode.loop_layout(model.config, params, False) == (model.config, params)
    copy_ref = weakref.ref(jax.tree.leaves(decode.loop_layout(model.config, other, True)[1])[0])
    del other
    gc.collect()
    assert copy_ref() is None  # the copy was freed with the arrays it came from


def test_cache_shapes_ring_and_full_length(decode_config):
    config = decode_config()
    shapes = kv_cache.cache_shapes(config, batch=3, max_length=100)
    window = config.sliding.sliding_window
    run = shapes["decoder"]["run_1"]  # the two scanned SWA layers
    assert run.keys.shape == (2, 3, config.sliding.num_kv_heads, window,
                              config.sliding.qk_head_dim)
    assert run.values.shape == (2, 3, config.sliding.num_kv_heads, config.sliding.v_head_dim,
                                window)
    # A run of one global layer: full length, and no [1] run axis.
    assert shapes["decoder"]["run_0"].keys.shape == (3, config.full.num_kv_heads, 100,
                                                     config.full.qk_head_dim)
    assert [c.positions.shape for c in shapes["mtp"]] == [(3, window)] * 3
    wider = kv_cache.cache_shapes(config, batch=3, max_length=100, extra_slots=2)
    assert wider["decoder"]["run_1"].positions.shape == (2, 3, window + 2)
    per_token = {t: 4 * a.num_kv_heads * (a.qk_head_dim + a.v_head_dim) + 4
                 for t, a in ((SWA, config.sliding), (GA, config.full))}
    expected = 3 * (2 * 100 * per_token[GA] + (2 + 3) * window * per_token[SWA])
    assert kv_cache.cache_bytes(shapes) == expected


def test_bad_prompts_raise_clear_errors(decode_model):
    model, params = decode_model
    with pytest.raises(ValueError, match="prompt lengths must be in"):
        generate(model, params, np.zeros((2, 4), np.int32), np.asarray([4, 0]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(model, params, np.zeros((2, 4), np.int32), np.asarray([4, 1]), max_new_tokens=0)
