"""One MOPD step: sample, score, reward, update (report section 4.4).

    rollout   the student samples Y responses per prompt with the compiled decoder, which returns
              each token's log-prob under the sampling distribution (mu) and its routed experts;
    score     each domain's frozen teacher scores every sampled token (log pi_teacher);
    reward    the domain's outcome reward on the host, then GRPO group advantages;
    update    the student's forward (replaying the rollout's experts) gives log pi_theta, the
              MOPD loss (`mopd_objective`), AdamW, the router-bias rule, the non-finite rule;
              `mopd.updates_per_step` minibatches of the rollouts, one update each.

Rollout, scoring and update are jitted pure functions of pytrees; the rollout's random key comes
from the train state, so a resumed run samples exactly what the uninterrupted one did. Batches
hold every domain's prompts in domain order, Q = domains x prompts_per_domain, and the Q*Y
sequences group by prompt (rows q*Y .. q*Y+Y-1 are prompt q's samples).
Legend: Q prompts, Y samples per prompt, B = Q*Y sequences, S sequence buffer, V vocabulary,
L MoE layers, k experts per token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mimo_jax.config import ModelConfig
from mimo_jax.data.prompts import PromptBatch
from mimo_jax.data.tokenizer import TextTokenizer
from mimo_jax.eval.tasks import Reward, extract_answer
from mimo_jax.inference.rollout import Rollout, rollout, score_tokens, segments_from_lengths
from mimo_jax.inference.sampling import SamplingConfig
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.ops.moe import replay_mismatch
from mimo_jax.parallel import Parallelism
from mimo_jax.parallel.sharding import batch_spec
from mimo_jax.train.config import TrainConfig
from mimo_jax.train.mopd_config import MopdConfig
from mimo_jax.train.mopd_objective import (MopdObjective, group_advantages,
                                           importance_weights, mopd_loss, token_metrics)
from mimo_jax.train.state import TrainState
from mimo_jax.train.step import apply_gradients

# What the progress line and metrics log show of each step (per-domain values come beside).
RECORD_KEYS = ("loss", "ce", "reward", "accuracy", "reverse_kl", "masked_share",
               "response_length", "replay_mismatch", "grad_norm", "learning_rate")
PER_DOMAIN_KEYS = ("reward", "accuracy", "reverse_kl", "masked_share", "response_length")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A domain's frozen teacher: its model (any size) and parameters."""

    model: MiMoV2Flash
    params: Any


def encode_prompts(tokenizer: TextTokenizer, prompts: list[str],
                   max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt ids [Q, max_tokens] and lengths [Q]; a longer prompt fails naming it."""
    ids = [tokenizer.encode(p) for p in prompts]
    for prompt, row in zip(prompts, ids):
        if not 1 <= row.size <= max_tokens:
            raise ValueError(f"prompt {prompt!r} has {row.size} tokens; mopd.max_prompt_tokens="
                             f"{max_tokens} (and at least 1)")
    out = np.full((len(ids), max_tokens), tokenizer.pad_id, np.int32)
    for i, row in enumerate(ids):
        out[i, :row.size] = row
    return out, np.asarray([row.size for row in ids], np.int32)


def response_texts(tokenizer: TextTokenizer, sample: Rollout) -> list[str]:
    """Each sequence's generated text (stop token included, as the decoder kept it)."""
    tokens = np.asarray(sample.tokens)
    starts, ends = np.asarray(sample.prompt_lengths), np.asarray(sample.lengths)
    return [tokenizer.decode(tokens[i, starts[i]:ends[i]]) for i in range(tokens.shape[0])]


def outcome_rewards(batch: PromptBatch, responses: list[str], samples: int,
                    rewards: dict[str, Reward | None]) -> tuple[np.ndarray, np.ndarray]:
    """(rewards [Q, Y], exact-answer accuracy [Q, Y]) of the responses, on the host.

    A domain without an outcome reward gets 0 (its group advantages are then 0).
    """
    reward_rows, correct_rows = [], []
    index = 0
    for domain, examples in zip(batch.domains, batch.examples):
        fn = rewards[domain]
        for prompt, answer in examples:
            group = responses[index:index + samples]
            index += samples
            reward_rows.append([0.0 if fn is None else fn(prompt, r, answer) for r in group])
            correct_rows.append([float(extract_answer(r) == answer) for r in group])
    return np.asarray(reward_rows, np.float32), np.asarray(correct_rows, np.float32)


def minibatch_rows(prompts: int, samples: int, updates: int) -> list[np.ndarray]:
    """The rows of each of a step's `updates` minibatches: prompt q's samples (rows q*Y ..
    q*Y+Y-1) go to minibatch q % updates, so each minibatch keeps whole GRPO groups and, with
    domains in order and prompts_per_domain divisible by `updates`, every domain's share."""
    groups = np.arange(prompts * samples).reshape(prompts, samples)
    return [groups[j::updates].reshape(-1) for j in range(updates)]


def combine_update_metrics(updates: list[dict]) -> dict:
    """One step's metrics from its updates' (host values): token counts add up, `finite` holds
    when every update was finite, the rest are means over the updates (equal-sized
    minibatches)."""
    combined = {}
    for key in updates[0]:
        values = np.stack([np.asarray(update[key]) for update in updates])
        if key == "tokens":
            combined[key] = values.sum(axis=0)
        elif key == "finite":
            combined[key] = values.all(axis=0)
        else:
            combined[key] = values.mean(axis=0, dtype=np.float64).astype(values.dtype)
    return combined


def make_update(model: MiMoV2Flash, model_config: ModelConfig, train_config: TrainConfig,
                objective: MopdObjective, optimizer: optax.GradientTransformation,
                num_domains: int, routing_replay: bool) -> Callable:
    """update(state, batch, learning_rate) -> (state, metrics), to be jitted.

    batch: tokens, lengths, response_mask, sampling_log_probs, teacher_log_probs (or absent
    when the teacher term is off), outcome_advantages [B], routing [B, S, L, k], domain [B].
    """

    def loss_fn(params, batch):
        tokens = batch["tokens"]
        student, output = score_tokens(
            model, params, tokens, lengths=batch["lengths"],
            routing=batch["routing"] if routing_replay else None, with_output=True)
        loss_sum, metrics = mopd_loss(student, batch["sampling_log_probs"],
                                      batch.get("teacher_log_probs"),
                                      batch["outcome_advantages"], batch["response_mask"],
                                      objective)
        # eq. 7's expectation over the batch's responses, plus the (tiny) balance term.
        loss = (loss_sum / tokens.shape[0]
                + train_config.balance_loss_weight * output.balance_loss)
        return loss, (student, metrics, output)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state: TrainState, batch: dict, learning_rate: jax.Array):
        (loss, (student, metrics, output)), grads = grad_fn(state.params, batch)
        new_state, grad_norm, finite = apply_gradients(
            state, grads, loss, output.expert_load, learning_rate, optimizer=optimizer,
            model_config=model_config, train_config=train_config)
        mask = batch["response_mask"].astype(bool)
        nll = -jnp.sum(jnp.where(mask, student, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
        per_domain = {key: [] for key in ("reverse_kl", "masked_share", "response_length")}
        _, kept = importance_weights(student, batch["sampling_log_probs"],
                                     batch["response_mask"], objective)
        for d in range(num_domains):
            in_domain = mask & (batch["domain"] == d)[:, None]
            values = token_metrics(student, batch.get("teacher_log_probs"), kept, in_domain)
            for key in per_domain:
                per_domain[key].append(values.get(key, jnp.zeros((), jnp.float32)))
        in_rows = segments_from_lengths(batch["lengths"], mask.shape[1]).astype(bool)
        mismatched, counted = replay_mismatch(output.routing, output.router_choice, in_rows)
        out = dict(metrics, loss=loss, ce=nll, grad_norm=grad_norm, finite=finite,
                   learning_rate=learning_rate, tokens=metrics["tokens"].astype(jnp.int32),
                   replay_mismatch=mismatched / jnp.maximum(counted, 1.0))
        out.update({f"domain_{key}": jnp.stack(v) for key, v in per_domain.items()})
        out.setdefault("reverse_kl", jnp.zeros((), jnp.float32))
        return new_state, out

    return update


def _score(model: MiMoV2Flash, params: Any, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """[B, S] log-probs of `tokens` under a frozen teacher (see `rollout.score_tokens`)."""
    return score_tokens(model, params, tokens, lengths=lengths)


class MopdStep:
    """The loop's step for MOPD: `(state, PromptBatch, learning_rate) -> (state, metrics)`.

    Rollout, teacher scoring and update run compiled; tokenising, decoding and rewards run on the
    host between them. Per-domain metrics come back as `KEY/DOMAIN` scalars.
    """

    def __init__(self, model: MiMoV2Flash, update: Callable, teachers: dict[str, Teacher | None],
                 rewards: dict[str, Reward | None], tokenizer: TextTokenizer,
                 config: MopdConfig, parallelism: Parallelism):
        self.model = model
        self.parallelism = parallelism
        self._update = update
        self._rewards = rewards
        self._tokenizer = tokenizer
        self._config = config
        self._sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p)
        self._stops = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
        # One compiled scorer per teacher architecture (models are equal when their configs
        # are): teachers of the same shape share one program, on the student's mesh.
        models = {teacher.model for teacher in teachers.values() if teacher is not None}
        scorers = {model: parallelism.jit(
            functools.partial(_score, model),
            (parallelism.param_shardings(model)[1], self._rows(2), self._rows(1)), self._rows(2))
            for model in models}
        self._scorers = {domain: None if teacher is None else scorers[teacher.model]
                         for domain, teacher in teachers.items()}
        self._teachers = teachers

    @property
    def record_keys(self) -> tuple[str, ...]:
        """Every scalar a step reports, per-domain ones included."""
        return RECORD_KEYS + tuple(f"{key}/{domain}" for key in PER_DOMAIN_KEYS
                                   for domain in self._config.domains)

    def __call__(self, state: TrainState, batch: PromptBatch,
                 learning_rate: np.float32) -> tuple[TrainState, dict]:
        cfg, samples = self._config, self._config.samples_per_prompt
        prompts = [prompt for examples in batch.examples for prompt, _ in examples]
        ids, lengths = encode_prompts(self._tokenizer, prompts, cfg.max_prompt_tokens)
        # The state's key is split by every update, so each step samples with a new key and a
        # resumed run with the same one.
        sample = rollout(self.model, state.params, ids, lengths, samples_per_prompt=samples,
                         max_new_tokens=cfg.max_response_tokens, sampling=self._sampling,
                         rng=jax.random.fold_in(state.rng, 1), stop_tokens=self._stops,
                         parallelism=self.parallelism)
        texts = response_texts(self._tokenizer, sample)
        rewards, correct = outcome_rewards(batch, texts, samples, self._rewards)
        rows_per_domain = cfg.prompts_per_domain * samples
        arrays = {"tokens": sample.tokens, "lengths": sample.lengths,
                  "response_mask": sample.response_mask, "sampling_log_probs": sample.logprobs,
                  "routing": sample.routing,
                  "outcome_advantages": np.asarray(group_advantages(rewards)).reshape(-1),
                  "domain": np.repeat(np.arange(len(batch.domains)), rows_per_domain)}
        if cfg.use_teacher:
            arrays["teacher_log_probs"] = self._teacher_scores(batch.domains, sample,
                                                               rows_per_domain)
        # One update takes the rollout's arrays as they are: indexing them by rows would gather
        # a copy of every array on the device for nothing.
        parts = [arrays] if cfg.updates_per_step == 1 else [
            {key: value[rows] for key, value in arrays.items()}
            for rows in minibatch_rows(len(prompts), samples, cfg.updates_per_step)]
        updates = []
        for part in parts:
            part = {key: jax.device_put(value, self._rows(np.ndim(value)))
                    for key, value in part.items()}
            state, metrics = self._update(state, part, learning_rate)
            updates.append(metrics)
        metrics = dict(combine_update_metrics(jax.device_get(updates)),
                       reward=float(rewards.mean()), accuracy=float(correct.mean()))
        by_domain = {"reward": rewards.reshape(len(batch.domains), -1).mean(axis=1),
                     "accuracy": correct.reshape(len(batch.domains), -1).mean(axis=1)}
        by_domain.update({key: metrics.pop(f"domain_{key}")
                          for key in ("reverse_kl", "masked_share", "response_length")})
        for key, values in by_domain.items():
            for domain, value in zip(batch.domains, np.asarray(values)):
                metrics[f"{key}/{domain}"] = float(value)
        return state, metrics

    def _teacher_scores(self, domains: tuple[str, ...], sample: Rollout,
                        rows_per_domain: int) -> jax.Array:
        """log pi_teacher of every token, each domain's rows scored by its own teacher."""
        parts = []
        for d, domain in enumerate(domains):
            rows = slice(d * rows_per_domain, (d + 1) * rows_per_domain)
            tokens, lengths = (jax.device_put(x[rows], self._rows(x.ndim))
                               for x in (sample.tokens, sample.lengths))
            parts.append(self._scorers[domain](self._teachers[domain].params, tokens, lengths))
        return jnp.concatenate(parts, axis=0)

    def _rows(self, ndim: int) -> jax.sharding.NamedSharding:
        """The sharding of a [rows, ...] array of `ndim` dims: rows over the batch axes."""
        return self.parallelism.sharding(batch_spec(ndim, self.parallelism.rules))
