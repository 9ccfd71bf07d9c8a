"""Cached decoding against transformers' `MiMoV2FlashForCausalLM` with its own KV cache.

A tiny random torch model is saved with `save_pretrained` and read with `mimo_jax.convert.hf.load`.
Both sides prefill a prompt and then decode token by token (and once a 3-token chunk) with their
caches, well past several sliding windows; every step's logits must agree to 1e-4 in float32.
Our side decodes both prompts in one right-padded batch; transformers runs each alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import hf_reference
from mimo_jax.convert import hf
from mimo_jax.inference import cache as kv_cache
from mimo_jax.inference import decode

VOCAB = 96
WINDOW = hf_reference.WINDOW
PROMPTS = [11, 4]  # prompt lengths
CHUNKS = [1] * 12 + [3] + [1] * 20  # tokens fed per step after the prompt
TOL = 1e-4


def _reference_logits(model, tokens: np.ndarray, prompt: int) -> list[np.ndarray]:
    """transformers with its cache: the prompt, then CHUNKS. Logits of every fed token [T, V]."""
    out, start, cache = [], 0, None
    with torch.no_grad():
        for size in [prompt] + CHUNKS:
            ids = torch.tensor(tokens[None, start:start + size], dtype=torch.long)
            result = model(input_ids=ids, cache=cache, use_cache=True)
            cache = result.cache
            out.append(result.logits[0].numpy())
            start += size
    return out


def test_cached_decoding_logits_match_transformers(tmp_path, logits_step):
    torch_model = hf_reference.random_model(hf_reference.tiny_config(VOCAB), str(tmp_path))
    model, params = hf.load(str(tmp_path))
    assert model.config.sliding.sliding_window == WINDOW
    total = max(PROMPTS) + sum(CHUNKS)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, VOCAB, (len(PROMPTS), total + 2)).astype(np.int32)
    lengths = np.asarray(PROMPTS, np.int32)
    width = max(PROMPTS)
    cache = kv_cache.init_cache(model.config, len(PROMPTS), total, num_mtp_heads=0)
    last, _, cache, _ = jax.jit(
        lambda p, t, n, c: decode.prefill(model, p, t, n, c, chunk_size=4))(
        params, jnp.asarray(tokens[:, :width]), jnp.asarray(lengths), cache)
    step = logits_step(model)
    ours = [[np.asarray(last[b])[None]] for b in range(len(PROMPTS))]
    frontier = lengths.copy()
    decoder_cache = cache["decoder"]
    for size in CHUNKS:
        positions = frontier[:, None] + np.arange(3)
        chunk = np.take_along_axis(tokens, positions, 1)
        positions = np.where(np.arange(3) < size, positions, -1)  # every step 3 wide, padded
        logits, decoder_cache = step(params, jnp.asarray(chunk),
                                     jnp.asarray(positions, jnp.int32), decoder_cache)
        for b in range(len(PROMPTS)):
            ours[b].append(np.asarray(logits[b, :size]))
        frontier += size
    for b, prompt in enumerate(PROMPTS):
        reference = _reference_logits(torch_model, tokens[b], prompt)
        assert np.abs(reference[-1]).max() > 0.3  # not a comparison between near-zeros
        np.testing.assert_allclose(ours[b][0], reference[0][-1:], atol=TOL, rtol=0)
        for step_index, (got, want) in enumerate(zip(ours[b][1:], reference[1:])):
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0,
                                       err_msg=f"row {b}, step {step_index}")
