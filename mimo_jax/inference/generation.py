"""Plain autoregressive generation: prefill, then one cached decode step per token, all inside one
`jax.lax.while_loop`, so that a whole generation is one compiled program.

Rows finish on their own (a stop token, or `max_new_tokens`); finished rows stop writing to the
cache and the loop ends when every row has finished. On request a generation also records what
on-policy training needs: the log-probability of each sampled token under the distribution it was
drawn from, and the experts every token ran (for Rollout Routing Replay).
Legend: B batch, T prompt length, S buffer length (T + max_new_tokens [+ look-ahead]), V vocab,
L MoE layers, k experts per token.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp

from mimo_jax.config import ModelConfig
from mimo_jax.inference import cache as kv_cache
from mimo_jax.inference import decode, on_mesh
from mimo_jax.inference.sampling import SamplingConfig, sample_with_log_prob
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import Parallelism

StreamFn = Callable[[Any, Any], None]


@flax.struct.dataclass
class Generation:
    """The result of a generation.

    tokens: [B, S] prompt then generated tokens; entries at or past `lengths` are meaningless.
    lengths: [B] prompt + generated length of each row.
    prompt_lengths: [B]; num_generated: [B] new tokens per row (a stop token included).
    steps: [B] main-model decode passes after the prefill (verification passes when speculative).
    committed: [B] tokens those passes produced before stop/length truncation; committed / steps
      is the mean acceptance length (1 for plain decoding, up to k + 1 with k drafts).
    logprobs: [B, S] float32 (`return_logprobs`, else None): log mu(token), the log-probability
      of each generated token under the distribution it was sampled from (after temperature,
      top-k and top-p; 0 = log 1 when greedy); 0 on prompt and padding positions.
    routing: [B, S, L, k] int32 (`return_routing`, else None): the experts each token ran in each
      MoE layer, prompt and generated tokens alike; -1 on padding and on each row's last token,
      which no forward pass ran (its experts reach no later token's log-prob).
    """

    tokens: jax.Array
    lengths: jax.Array
    prompt_lengths: jax.Array
    num_generated: jax.Array
    steps: jax.Array
    committed: jax.Array
    logprobs: jax.Array | None = None
    routing: jax.Array | None = None

    def acceptance_length(self) -> float:
        """Mean tokens per main-model decode pass over the whole batch."""
        steps = int(jnp.sum(self.steps))
        return float(jnp.sum(self.committed)) / steps if steps else 0.0

    def generated(self, row: int) -> list[int]:
        """Row `row`'s new tokens as a Python list."""
        start, end = int(self.prompt_lengths[row]), int(self.lengths[row])
        return [int(t) for t in jax.device_get(self.tokens[row, start:end])]


def commit_count(new_tokens: jax.Array, proposed: jax.Array, generated: jax.Array,
                 done: jax.Array, *, max_new_tokens: int,
                 stop_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """How many of a step's proposed tokens each row keeps, and which rows are now finished.

    new_tokens: [B, C] the step's tokens in order; proposed: [B] how many of them are valid.
    A row keeps tokens up to and including its first stop token, never past `max_new_tokens`
    in total, and nothing once finished. Returns (count [B] int32, done [B] bool).
    """
    c = new_tokens.shape[1]
    count = jnp.minimum(proposed, max_new_tokens - generated)
    in_range = jnp.arange(c)[None] < count[:, None]
    is_stop = jnp.isin(new_tokens, stop_tokens) & in_range
    hit = jnp.any(is_stop, axis=1)
    count = jnp.where(hit, jnp.argmax(is_stop, axis=1) + 1, count)
    count = jnp.where(done, 0, count).astype(jnp.int32)
    return count, done | hit | (generated + count >= max_new_tokens)


def stop_array(stop_tokens: Sequence[int]) -> jax.Array:
    """Stop tokens as an int32 array (a traced argument, so changing them does not recompile);
    -1, which no token equals, when there are none."""
    stops = [int(s) for s in stop_tokens]
    if any(s < 0 for s in stops):
        raise ValueError(f"stop tokens must be token ids >= 0, got {stops}")
    return jnp.asarray(stops or [-1], jnp.int32)


def stream_step(stream: StreamFn | None, new_tokens: jax.Array, count: jax.Array) -> None:
    """Hands a step's kept tokens ([B, C] and counts [B]) to the host, in order."""
    if stream is not None:
        jax.debug.callback(stream, new_tokens, count, ordered=True)


@flax.struct.dataclass
class _State:
    tokens: jax.Array  # [B, S]
    frontier: jax.Array  # [B] newest position; frontier + 1 - length = tokens generated
    done: jax.Array  # [B]
    steps: jax.Array  # [B]
    cache: dict
    rng: jax.Array
    log_probs: jax.Array | None  # [B, S] or None
    routing: jax.Array | None  # [B, S, L, k] or None


def start_generation(rng: jax.Array, last_logits: jax.Array, prompts: jax.Array,
                     lengths: jax.Array, buffer_length: int, sampling: SamplingConfig, *,
                     max_new_tokens: int, stop_tokens: jax.Array, stream: StreamFn | None):
    """Samples each row's first token from the prefill logits and writes it after the prompt.

    prompts: [B, T] right-padded; lengths: [B]; last_logits: [B, V]. Returns the token buffer
    [B, buffer_length], the log-prob buffer [B, buffer_length] (the first token's log mu, 0
    elsewhere; unused work compiles away), tokens committed per row [B], rows done [B] and the
    remaining rng.
    """
    b, t = prompts.shape
    rng, first_rng = jax.random.split(rng)
    first, first_log_prob = sample_with_log_prob(first_rng, last_logits, sampling)
    first = first[:, None]
    count, done = commit_count(first, jnp.ones((b,), jnp.int32), jnp.zeros((b,), jnp.int32),
                               jnp.zeros((b,), bool), max_new_tokens=max_new_tokens,
                               stop_tokens=stop_tokens)
    stream_step(stream, first, count)
    buffer = jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, buffer_length - t)))
    log_probs = decode.write_rows(jnp.zeros((b, buffer_length), jnp.float32), lengths,
                                  first_log_prob[:, None], count)
    return decode.write_rows(buffer, lengths, first, count), log_probs, count, done, rng


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling",
                                             "prefill_chunk", "stream",
                                             "return_logprobs", "return_routing"))
def _generate(params: Any, prompts: jax.Array, lengths: jax.Array, rng: jax.Array,
              stops: jax.Array, *,
              config: ModelConfig, max_new_tokens: int, sampling: SamplingConfig,
              prefill_chunk: int, stream: StreamFn | None, return_logprobs: bool,
              return_routing: bool) -> Generation:
    model = MiMoV2Flash(config)
    b, t = prompts.shape
    total = t + max_new_tokens
    cache = kv_cache.init_cache(config, b, total, num_mtp_heads=0)
    last_logits, _, cache, routing = decode.prefill(model, params, prompts, lengths, cache,
                                                    chunk_size=prefill_chunk,
                                                    keep_routing=return_routing)
    buffer, log_probs, count, done, rng = start_generation(
        rng, last_logits, prompts, lengths, total, sampling, max_new_tokens=max_new_tokens,
        stop_tokens=stops, stream=stream)
    if return_routing:
        routing = jnp.pad(routing, ((0, 0), (0, total - t), (0, 0), (0, 0)), constant_values=-1)
    zeros = jnp.zeros((b,), jnp.int32)
    state = _State(tokens=buffer, frontier=lengths - 1 + count, done=done, steps=zeros,
                   cache=cache, rng=rng, log_probs=log_probs if return_logprobs else None,
                   routing=routing)

    def step(state: _State) -> _State:
        rng, step_rng = jax.random.split(state.rng)
        current = decode.gather_rows(state.tokens, state.frontier, 1)
        positions = jnp.where(state.done, -1, state.frontier)[:, None]
        hidden, decoder_cache, *step_routing = decode.model_decode(
            model, params, current, positions, state.cache["decoder"], return_routing)
        logits = decode.logits(model, params, hidden)
        new, new_log_prob = sample_with_log_prob(step_rng, logits[:, 0], sampling)
        new, new_log_prob = new[:, None], new_log_prob[:, None]
        active = ~state.done
        count, done = commit_count(new, jnp.ones((b,), jnp.int32), state.frontier + 1 - lengths,
                                   state.done, max_new_tokens=max_new_tokens, stop_tokens=stops)
        stream_step(stream, new, count)
        log_probs, routing = state.log_probs, state.routing
        if return_logprobs:
            log_probs = decode.write_rows(log_probs, state.frontier + 1, new_log_prob, count)
        if return_routing:  # the experts of the token this step ran, at its own position
            routing = decode.write_rows(routing, state.frontier, step_routing[0],
                                        active.astype(jnp.int32))
        return _State(tokens=decode.write_rows(state.tokens, state.frontier + 1, new, count),
                      frontier=state.frontier + count, done=done, steps=state.steps + active,
                      cache={"decoder": decoder_cache, "mtp": state.cache["mtp"]}, rng=rng,
                      log_probs=log_probs, routing=routing)

    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)
    return Generation(tokens=state.tokens, lengths=state.frontier + 1, prompt_lengths=lengths,
                      num_generated=state.frontier + 1 - lengths, steps=state.steps,
                      committed=state.steps, logprobs=state.log_probs, routing=state.routing)


def check_generation_args(config: ModelConfig, prompts: jax.Array, lengths: jax.Array,
                          max_new_tokens: int) -> None:
    """Clear errors for arguments a caller can get wrong."""
    decode.check_prompts(prompts, lengths)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not isinstance(prompts, jax.core.Tracer):
        low, high = int(jnp.min(prompts)), int(jnp.max(prompts))
        if low < 0 or high >= config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {config.vocab_size}), "
                             f"got {low if low < 0 else high}")


def generate(model: MiMoV2Flash, params: Any, prompts: jax.Array, lengths: jax.Array, *,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             rng: jax.Array | None = None, stop_tokens: Sequence[int] = (),
             prefill_chunk: int = 256, unstack_layers: bool | None = None,
             stream: StreamFn | None = None, return_logprobs: bool = False,
             return_routing: bool = False,
             parallelism: Parallelism | None = None) -> Generation:
    """Generates up to `max_new_tokens` tokens after each prompt with the KV cache.

    Args:
      model, params: the model and its parameters.
      prompts: [B, T] int32 right-padded prompts; lengths: [B] int32 prompt lengths (>= 1).
      sampling: greedy by default; rng: a PRNG key (default key 0) for temperature > 0.
      stop_tokens: a row finishes after emitting any of these (it is kept in the output).
      prefill_chunk: prompt tokens per prefill forward.
      unstack_layers: decode scanned runs as one module per layer (default: on CPU, where it is
        faster; see `decode.loop_layout`). The tokens are the same either way.
      stream: optional host callback `stream(tokens [B, C], counts [B])` called after every step
        with the tokens each row kept (numpy arrays); it must be hashable (a plain function).
      return_logprobs: record each generated token's sampling log-prob (`Generation.logprobs`).
      return_routing: record the experts every token ran (`Generation.routing`).
      parallelism: decode over this mesh (see `inference.on_mesh`); the batch must split over
        its batch axes. The tokens equal those of one device.
    """
    prompts, lengths = jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32)
    check_generation_args(model.config, prompts, lengths, max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    config, params, (prompts, lengths, stops) = on_mesh.prepare(
        model, params, (prompts, lengths, stop_array(stop_tokens)), parallelism)
    with on_mesh.decoding(parallelism):
        config, params = decode.loop_layout(config, params, unstack_layers)
        return _generate(params, prompts, lengths, rng, stops, config=config,
                         max_new_tokens=max_new_tokens, sampling=sampling,
                         prefill_chunk=prefill_chunk, stream=stream,
                         return_logprobs=return_logprobs, return_routing=return_routing)
