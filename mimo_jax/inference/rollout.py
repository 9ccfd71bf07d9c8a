"""What on-policy post-training (MOPD, GRPO) reads from the model: rollouts and token scores.

`rollout` samples several responses per prompt with the compiled decoder and records, for every
token, what the update needs: the log-probability mu of each sampled token under the distribution
it was drawn from, and the experts each token ran (Rollout Routing Replay, report section 4.6.1).
`score_tokens` is one full forward that gives log p(token | prefix) for every token: the teacher's
scores of a rollout, and the student's recompute of its own (with the rollout's routing replayed).

    out = rollout(model, params, prompts, lengths, samples_per_prompt=4, max_new_tokens=64,
                  sampling=SamplingConfig(temperature=1.0), rng=key, stop_tokens=[eos])
    teacher = score_tokens(teacher_model, teacher_params, out.tokens, lengths=out.lengths)
    student = score_tokens(model, params, out.tokens, lengths=out.lengths, routing=out.routing)

Legend: Q prompts, Y samples per prompt, B = Q * Y rows, T prompt length,
S row length (T + max_new_tokens), V vocab, L MoE layers, k experts per token.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp

from mimo_jax.inference.generation import generate
from mimo_jax.inference.sampling import SamplingConfig
from mimo_jax.model.transformer import MiMoV2Flash, ModelOutput
from mimo_jax.parallel import Parallelism
from mimo_jax.train.mopd_objective import token_log_probs


@flax.struct.dataclass
class Rollout:
    """Sampled responses, Y per prompt; row q * Y + y is sample y of prompt q.

    tokens: [B, S] int32 prompt then response, right-padded (entries at or past `lengths` are
      meaningless).
    prompt_lengths, lengths: [B] int32 prompt and prompt + response lengths.
    response_mask: [B, S] int32, 1 on the response's tokens (a final stop token included).
    logprobs: [B, S] float32 log mu(token) on the response, 0 elsewhere.
    routing: [B, S, L, k] int32 experts each token ran; -1 on padding and on each row's last
      token (never run through the model; replay lets the router choose there).
    """

    tokens: jax.Array
    prompt_lengths: jax.Array
    lengths: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    routing: jax.Array


def rollout(model: MiMoV2Flash, params: Any, prompts: jax.Array, lengths: jax.Array, *,
            samples_per_prompt: int, max_new_tokens: int, sampling: SamplingConfig,
            rng: jax.Array, stop_tokens: Sequence[int] = (), prefill_chunk: int = 256,
            unstack_layers: bool | None = None,
            parallelism: Parallelism | None = None) -> Rollout:
    """Samples `samples_per_prompt` responses to every prompt in one compiled generation.

    Args:
      model, params: the policy.
      prompts: [Q, T] int32 right-padded; lengths: [Q] int32 prompt lengths (>= 1).
      samples_per_prompt: Y >= 1 responses per prompt (rows q * Y .. q * Y + Y - 1).
      max_new_tokens: the longest response; sampling: temperature / top-k / top-p (greedy gives
        Y identical responses); rng: a PRNG key; stop_tokens: a response ends after any of them.
      prefill_chunk, unstack_layers, parallelism: as in `generate` (on a mesh, Q x Y must
        split over its batch axes).
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt} must be >= 1")
    prompts = jnp.repeat(jnp.asarray(prompts, jnp.int32), samples_per_prompt, axis=0)
    lengths = jnp.repeat(jnp.asarray(lengths, jnp.int32), samples_per_prompt, axis=0)
    out = generate(model, params, prompts, lengths, max_new_tokens=max_new_tokens,
                   sampling=sampling, rng=rng, stop_tokens=stop_tokens,
                   prefill_chunk=prefill_chunk, unstack_layers=unstack_layers,
                   return_logprobs=True, return_routing=True, parallelism=parallelism)
    columns = jnp.arange(out.tokens.shape[1])[None]
    response = (columns >= out.prompt_lengths[:, None]) & (columns < out.lengths[:, None])
    return Rollout(tokens=out.tokens, prompt_lengths=out.prompt_lengths, lengths=out.lengths,
                   response_mask=response.astype(jnp.int32), logprobs=out.logprobs,
                   routing=out.routing)


def segments_from_lengths(lengths: jax.Array, length: int) -> jax.Array:
    """One document per row: 1 on each row's first `lengths` positions, 0 (padding) after.
    [B] -> [B, S] int32."""
    return (jnp.arange(length)[None] < jnp.asarray(lengths)[:, None]).astype(jnp.int32)


def score_tokens(model: MiMoV2Flash, params: Any, tokens: jax.Array, *,
                 lengths: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, temperature: float = 1.0,
                 routing: jax.Array | None = None, with_output: bool = False):
    """log p(tokens[t] | tokens[<t]) of every token, from one full forward (differentiable).

    Args:
      model, params: the scorer (a teacher, or the student recomputing its own log-probs).
      tokens: [B, S] int32.
      lengths: [B] int32, one document per row of that length (the rest padding); or
      segment_ids: [B, S] int32 packed documents (1, 2, ..., 0 = padding); neither = every row
        one whole document. positions: [B, S] int32 (None: per-document, from the segments).
      temperature: the scores are log softmax(logits / temperature).
      routing: [B, S, L, k] int32 experts to replay (a rollout's `routing`; see `MiMoV2Flash`),
        or None for the router's own choice.
      with_output: also return the model's `ModelOutput` (routing statistics, balance loss).
    Returns [B, S] float32 (and the `ModelOutput` when `with_output`): position t holds the
    log-probability of tokens[t] given the tokens before it in its document; 0 at each
    document's first token and on padding.
    """
    if lengths is not None and segment_ids is not None:
        raise ValueError("give lengths or segment_ids, not both")
    if not temperature > 0:
        raise ValueError(f"score temperature={temperature!r} must be > 0")
    tokens = jnp.asarray(tokens, jnp.int32)
    if lengths is not None:
        segment_ids = segments_from_lengths(lengths, tokens.shape[1])
    elif segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    output: ModelOutput = model.apply({"params": params}, tokens, segment_ids=segment_ids,
                                      positions=positions, routing=routing)
    # logits[t - 1] predict tokens[t]; a token scores only when its predecessor is in its document.
    scores = token_log_probs(output.logits[:, :-1], tokens[:, 1:], temperature)
    same_document = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    scores = jnp.where(same_document, scores, 0.0)
    scores = jnp.pad(scores, ((0, 0), (1, 0)))
    return (scores, output) if with_output else scores
