"""Decoding MiMo-V2-Flash: KV cache, prefill, sampling, generation, MTP self-speculative decoding,
and the rollouts and token scores of on-policy post-training.

    from mimo_jax.inference import SamplingConfig, generate, speculative_generate

    out = generate(model, params, prompts, lengths, max_new_tokens=64)
    out = speculative_generate(model, params, prompts, lengths, max_new_tokens=64, num_draft=3)
    out.generated(0)                      # row 0's new tokens
    out.acceptance_length()               # tokens per main-model pass
    out = rollout(model, params, prompts, lengths, samples_per_prompt=4, max_new_tokens=64,
                  sampling=SamplingConfig(temperature=1.0), rng=key)   # + log mu, routing
    log_p = score_tokens(model, params, out.tokens, lengths=out.lengths, routing=out.routing)

Modules: `cache` (ring buffers for sliding-window layers, full length for global ones),
`decode` (cached forward passes, chunked prefill), `sampling` (greedy / temperature / top-k /
top-p), `generation` (one `while_loop` per generation), `speculative` (draft with the MTP heads,
verify in one main-model pass), `rollout` (several samples per prompt with sampling log-probs
and routed experts; one-forward token scoring with routing replay).
"""

from mimo_jax.inference.cache import init_cache
from mimo_jax.inference.generation import Generation, generate
from mimo_jax.inference.rollout import Rollout, rollout, score_tokens
from mimo_jax.inference.sampling import SamplingConfig
from mimo_jax.inference.speculative import speculative_generate

__all__ = ["Generation", "Rollout", "SamplingConfig", "generate", "init_cache", "rollout",
           "score_tokens", "speculative_generate"]
