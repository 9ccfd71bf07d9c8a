"""Self-speculative decoding: the MTP heads draft k tokens, the main model checks them in one pass.

One step, for a row whose newest token t_n sits at position n (the main cache holds positions < n):
  1. draft   head h (1-based) at position j reads the previous depth's hidden state at j and the
             token at j+h, as in training. The heads run over positions [m-k+1, n-1], m being the
             previous step's newest position: the k-1 positions before m again, because last time
             their inputs included draft tokens. Head h's output at n-1 gives draft d_h, written
             into the token buffer before head h+1 reads it. The main hidden states of the last 2k
             positions are carried from step to step for this.
  2. verify  the main model runs on [t_n, d_1 .. d_k] at positions n .. n+k; its logits at n+i are
             the target distribution p_i for position n+i+1.
  3. accept  greedy: the longest prefix of drafts equal to the argmax, then the argmax after it.
             Sampling: draft d_i (drawn from q_i) is kept with probability
             min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from
             max(p_i - q_i, 0) normalised, and if all k are kept a bonus token is drawn from p_k.
             Each kept token is then distributed exactly as under the model's own sampling
             (Leviathan et al. 2023; Chen et al. 2023).
Rejected drafts leave their keys in the main cache past the new newest position. Those slots are
invisible (`ops.attention.kv_cache.attend` shows old slots only before a chunk's start) until the
real tokens of those positions overwrite them.

Everything after the prefill is one `jax.lax.while_loop`: one compiled program per generation.
Legend: B batch, k drafts, C = 2k MTP chunk, D model dim, V vocab, S buffer length.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp

from mimo_jax.config import ModelConfig
from mimo_jax.inference import cache as kv_cache
from mimo_jax.inference import decode, on_mesh
from mimo_jax.inference.generation import (Generation, StreamFn, check_generation_args,
                                           commit_count, start_generation, stop_array,
                                           stream_step)
from mimo_jax.inference.sampling import (SamplingConfig, probabilities, sample,
                                         sample_from_probs)
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import Parallelism


@flax.struct.dataclass
class _State:
    tokens: jax.Array  # [B, S] committed tokens, then the current drafts
    frontier: jax.Array  # [B] newest committed position; frontier + 1 - length = tokens generated
    window: jax.Array  # [B, 2k, D] main hidden states at window_start .. window_start+2k-1
    window_start: jax.Array  # [B]
    done: jax.Array  # [B]
    steps: jax.Array  # [B] verification passes
    committed: jax.Array  # [B] tokens those passes produced (before truncation)
    cache: dict
    rng: jax.Array


def _draft(model: MiMoV2Flash, params: Any, tokens: jax.Array, hidden: jax.Array,
           start: jax.Array, frontier: jax.Array, done: jax.Array, mtp_caches: list,
           rng: jax.Array, sampling: SamplingConfig):
    """Runs the k MTP heads over positions start .. start+C-1 and drafts k tokens.

    hidden: [B, C, D] main hidden states at those positions; positions past frontier-1 (and
    before 0) are padding. Returns the token buffer with drafts at frontier+1 .. frontier+k, the
    draft distributions [B, k, V] and the heads' caches.
    """
    num_draft = len(mtp_caches)
    b, c = hidden.shape[:2]
    positions = start[:, None] + jnp.arange(c)
    positions = jnp.where((positions >= 0) & (positions < frontier[:, None]) & ~done[:, None],
                          positions, -1)
    out_row = jnp.clip(frontier - 1 - start, 0, c - 1)[:, None, None]
    previous, caches, probs = hidden, [], []
    for head, head_rng in zip(range(num_draft), jax.random.split(rng, num_draft)):
        next_tokens = decode.gather_rows(tokens, start + head + 1, c)
        previous, normed, head_cache = decode.mtp_decode(model, params, head, previous,
                                                         next_tokens, positions,
                                                         mtp_caches[head])
        normed = jnp.take_along_axis(normed, out_row, axis=1)  # [B, 1, D]
        logits = decode.mtp_logits(model, params, normed)[:, 0]  # [B, V]
        draft = sample(head_rng, logits, sampling)
        if not sampling.greedy:
            probs.append(probabilities(logits, sampling))
        tokens = decode.write_rows(tokens, frontier + head + 1, draft[:, None],
                                   (~done).astype(jnp.int32))
        caches.append(head_cache)
    draft_probs = (jnp.stack(probs, axis=1) if probs
                   else jnp.zeros((b, num_draft, 0), jnp.float32))
    return tokens, draft_probs, caches


def _accept(logits: jax.Array, drafts: jax.Array, draft_probs: jax.Array, rng: jax.Array,
            sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """The verification rule. logits: [B, k+1, V]; drafts: [B, k]; draft_probs: [B, k, V].

    Returns the step's tokens [B, k+1] (the accepted drafts, then the corrected or bonus token)
    and the number of accepted drafts a [B]; the first a+1 tokens are the output.
    """
    b, k = drafts.shape
    if sampling.greedy:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, k+1]
        accepted = jnp.sum(jnp.cumprod(drafts == target[:, :k], axis=1), axis=1)
        return target, accepted.astype(jnp.int32)
    uniform_rng, token_rng = jax.random.split(rng)
    p = probabilities(logits, sampling)  # [B, k+1, V]
    p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    uniform = jax.random.uniform(uniform_rng, (b, k))
    keep = uniform * q_draft < p_draft  # accept with probability min(1, p/q)
    accepted = jnp.sum(jnp.cumprod(keep, axis=1), axis=1).astype(jnp.int32)
    residual = jnp.maximum(p[:, :k] - draft_probs, 0.0)
    # p == q leaves no residual, and then no rejection can happen: fall back to p.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p[:, :k])
    fix_dist = jnp.concatenate([residual, p[:, k:]], axis=1)  # [B, k+1, V]
    fix_dist = jnp.take_along_axis(fix_dist, accepted[:, None, None], axis=1)[:, 0]
    fix = sample_from_probs(token_rng, fix_dist)
    index = jnp.arange(k + 1)[None]
    padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
    return jnp.where(index < accepted[:, None], padded, fix[:, None]), accepted


@functools.partial(jax.jit, static_argnames=("config", "num_draft", "max_new_tokens", "sampling",
                                             "prefill_chunk", "stream"))
def _generate(params: Any, prompts: jax.Array, lengths: jax.Array, rng: jax.Array,
              stops: jax.Array, *,
              config: ModelConfig, num_draft: int, max_new_tokens: int, sampling: SamplingConfig,
              prefill_chunk: int, stream: StreamFn | None) -> Generation:
    model = MiMoV2Flash(config)
    k = num_draft
    b, t = prompts.shape
    # Drafts are written up to k places past the newest token, and verification caches k keys.
    total = t + max_new_tokens + k + 1
    cache = kv_cache.init_cache(config, b, total, extra_slots=max(k - 1, 0), num_mtp_heads=k)
    last_logits, hidden, cache, _ = decode.prefill(model, params, prompts, lengths, cache,
                                                   chunk_size=prefill_chunk, mtp_heads=k,
                                                   keep_hidden=True)
    buffer, _, count, done, rng = start_generation(
        rng, last_logits, prompts, lengths, total, sampling, max_new_tokens=max_new_tokens,
        stop_tokens=stops, stream=stream)
    zeros = jnp.zeros((b,), jnp.int32)
    # The heads' window is set up as a verification step that kept one token would leave it:
    # main hidden states at positions L-k .. L+k-1 (those past the prompt are never read).
    window_start = lengths - k
    window = decode.gather_rows(hidden, window_start, 2 * k)
    window = jnp.where((window_start[:, None] + jnp.arange(2 * k) >= 0)[..., None], window, 0)
    state = _State(tokens=buffer, frontier=lengths - 1 + count, window=window,
                   window_start=window_start, done=done, steps=zeros,
                   committed=zeros, cache=cache, rng=rng)

    def step(state: _State) -> _State:
        rng, accept_rng, draft_rng = jax.random.split(state.rng, 3)
        n = state.frontier
        active = ~state.done
        tokens, draft_probs, mtp_caches = _draft(
            model, params, state.tokens, state.window, state.window_start, n, state.done,
            state.cache["mtp"], draft_rng, sampling)
        chunk = decode.gather_rows(tokens, n, k + 1)  # [t_n, d_1 .. d_k]
        positions = jnp.where(active[:, None], n[:, None] + jnp.arange(k + 1), -1)
        hidden, decoder_cache = decode.model_decode(model, params, chunk, positions,
                                                    state.cache["decoder"])
        logits = decode.logits(model, params, hidden)
        new, accepted = _accept(logits, chunk[:, 1:], draft_probs, accept_rng, sampling)
        count, done = commit_count(new, accepted + 1, n + 1 - lengths, state.done,
                                   max_new_tokens=max_new_tokens, stop_tokens=stops)
        stream_step(stream, new, count)
        # Next window: main hidden states at n-k+1 .. n-1 (from this window), then n .. n+k.
        tail = decode.gather_rows(state.window, n - k + 1 - state.window_start, k - 1)
        window = jnp.concatenate([tail, hidden.astype(tail.dtype)], axis=1)
        return _State(tokens=decode.write_rows(tokens, n + 1, new, count), frontier=n + count,
                      window=window, window_start=n - k + 1, done=done,
                      steps=state.steps + active,
                      committed=state.committed + active * (accepted + 1),
                      cache={"decoder": decoder_cache, "mtp": mtp_caches}, rng=rng)

    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)
    return Generation(tokens=state.tokens, lengths=state.frontier + 1, prompt_lengths=lengths,
                      num_generated=state.frontier + 1 - lengths, steps=state.steps,
                      committed=state.committed)


def speculative_generate(model: MiMoV2Flash, params: Any, prompts: jax.Array,
                         lengths: jax.Array, *, max_new_tokens: int, num_draft: int | None = None,
                         sampling: SamplingConfig = SamplingConfig(),
                         rng: jax.Array | None = None, stop_tokens: Sequence[int] = (),
                         prefill_chunk: int = 256, unstack_layers: bool | None = None,
                         stream: StreamFn | None = None,
                         parallelism: Parallelism | None = None) -> Generation:
    """`generate` with MTP self-speculative decoding; same arguments and result.

    num_draft: drafts per step, 1 <= k <= the model's MTP heads (default: all heads). Greedy
    output equals plain greedy decoding; sampled output has the same distribution.
    """
    heads = model.config.num_mtp_heads
    num_draft = heads if num_draft is None else num_draft
    if not 1 <= num_draft <= heads:
        raise ValueError(f"num_draft={num_draft} must be in [1, num_mtp_heads={heads}]"
                         + (" (this model has no MTP heads)" if heads == 0 else ""))
    prompts, lengths = jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32)
    check_generation_args(model.config, prompts, lengths, max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    config, params, (prompts, lengths, stops) = on_mesh.prepare(
        model, params, (prompts, lengths, stop_array(stop_tokens)), parallelism)
    with on_mesh.decoding(parallelism):
        config, params = decode.loop_layout(config, params, unstack_layers)
        return _generate(params, prompts, lengths, rng, stops, config=config,
                         num_draft=num_draft, max_new_tokens=max_new_tokens, sampling=sampling,
                         prefill_chunk=prefill_chunk, stream=stream)
