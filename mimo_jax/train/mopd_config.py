"""Frozen, validated configuration of the MOPD trainer (the `mopd` section of a run config).

Each domain has a teacher, a prompt source and an outcome reward, written as `DOMAIN=VALUE` lists
so that they can be set from the command line:

    config.mopd.domains = "addition,reverse"
    config.mopd.teachers = "addition=runs/teach_add/export,reverse=runs/teach_rev/export"
    config.mopd.prompts = "addition=task:addition,reverse=jsonl:/data/reverse/*.jsonl"
    config.mopd.rewards = "addition=exact_match,reverse=none"

A teacher is a params export, a training workdir or a Hugging Face directory (the student's own
start is allowed). A prompt source is `task:NAME` (a built-in domain of `mimo_jax.eval.tasks`,
its training split) or `jsonl:GLOB` (records with `prompt` and, for rewards, `answer`). A reward
is a name of `mimo_jax.eval.tasks.REWARDS` or `none` (no outcome reward for that domain).

The loss (`mopd_objective`): alpha weighs the outcome advantage, eps_low/eps_high bound the
importance ratio pi_theta / mu, `use_teacher=False` is ORM-only RL (GRPO), alpha 0 is MOPD without
outcome rewards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mimo_jax.config_reader import Section, above, at_least, fail, option, within
from mimo_jax.eval.tasks import REWARDS

NO_REWARD = "none"
PROMPT_KINDS = ("task", "jsonl")

DomainMap = tuple[tuple[str, str], ...]


def _parse_domain_map(value: Any, key: str) -> DomainMap:
    """"a=x,b=y" (or a mapping) -> (("a", "x"), ("b", "y")); a domain given twice fails."""
    if isinstance(value, str):
        items = []
        for entry in (e.strip() for e in value.split(",") if e.strip()):
            domain, sep, item = entry.partition("=")
            if not sep or not domain.strip() or not item.strip():
                fail(key, value, f"entry {entry!r} is not 'DOMAIN=VALUE'")
            items.append((domain.strip(), item.strip()))
    elif hasattr(value, "items"):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        fail(key, value, "must be a 'DOMAIN=VALUE,...' string or a mapping")
    domains = [d for d, _ in items]
    for domain in domains:
        if domains.count(domain) > 1:
            fail(key, value, f"domain {domain!r} is given twice")
    return tuple(items)


def _dump_domain_map(items: DomainMap) -> str:
    return ",".join(f"{domain}={item}" for domain, item in items)


def _domain_map(default: str = "") -> Any:
    return option(_parse_domain_map(default, "default"), parse=_parse_domain_map,
                  dump=_dump_domain_map)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MopdConfig(Section):
    """Domains, teachers, prompts, rewards, rollouts and the loss of an MOPD run."""

    SECTION = "mopd"

    domains: tuple[str, ...] = option(check=lambda d: None if d else "needs at least one domain")
    teachers: DomainMap = _domain_map()
    prompts: DomainMap = _domain_map()
    rewards: DomainMap = _domain_map()
    prompts_per_domain: int = option(4, check=at_least(1))  # per step
    samples_per_prompt: int = option(4, check=at_least(1))  # Y, the GRPO group
    max_prompt_tokens: int = option(32, check=at_least(1))
    max_response_tokens: int = option(16, check=at_least(1))
    temperature: float = option(1.0, check=above(0))
    top_p: float = option(1.0, check=within(1e-6, 1.000001))
    alpha: float = option(1.0, check=at_least(0))
    eps_low: float = option(0.5, check=within(0, 1.000001))
    eps_high: float = option(2.0, check=at_least(1))
    # AdamW updates per step: the step's prompts split into this many minibatches (each keeps a
    # prompt's samples and every domain's share), updated one after another on the same rollouts;
    # the importance weights w_t account for the student having moved since it sampled.
    updates_per_step: int = option(1, check=at_least(1))
    use_teacher: bool = option(True)
    # Rollout Routing Replay (report 4.6.1): the update's forward reuses the rollout's experts.
    routing_replay: bool = option(True)
    eval_prompts: int = option(32, check=at_least(0))  # held-out prompts per domain per eval
    seed: int = option(0)  # the prompt order

    def validate(self, prefix: str) -> None:
        known = set(self.domains)
        for name in ("teachers", "prompts", "rewards"):
            given = dict(getattr(self, name))
            unknown = sorted(set(given) - known)
            if unknown:
                fail(f"{prefix}.{name}", _dump_domain_map(getattr(self, name)),
                     f"domain {unknown[0]!r} is not one of {prefix}.domains={list(self.domains)}")
            missing = [d for d in self.domains if d not in given
                       and (name != "teachers" or self.use_teacher)]
            if missing:
                fail(f"{prefix}.{name}", _dump_domain_map(getattr(self, name)),
                     f"domain {missing[0]!r} has no entry")
        for domain, source in self.prompts:
            kind, sep, arg = source.partition(":")
            if not sep or kind not in PROMPT_KINDS or not arg:
                fail(f"{prefix}.prompts", _dump_domain_map(self.prompts),
                     f"source {source!r} of domain {domain!r} is not one of "
                     f"{[k + ':...' for k in PROMPT_KINDS]}")
        for domain, reward in self.rewards:
            if reward != NO_REWARD and reward not in REWARDS:
                fail(f"{prefix}.rewards", _dump_domain_map(self.rewards),
                     f"reward {reward!r} of domain {domain!r} is not one of "
                     f"{sorted(REWARDS) + [NO_REWARD]}")
        if self.alpha > 0 and all(r == NO_REWARD for _, r in self.rewards):
            fail(f"{prefix}.alpha", self.alpha, f"needs an outcome reward in {prefix}.rewards "
                 "(or set alpha=0)")
        if not self.use_teacher and self.alpha == 0:
            fail(f"{prefix}.use_teacher", False, f"with {prefix}.alpha=0 leaves nothing to learn")
        if self.prompts_per_domain % self.updates_per_step:
            fail(f"{prefix}.updates_per_step", self.updates_per_step,
                 f"must divide {prefix}.prompts_per_domain={self.prompts_per_domain} (every "
                 "minibatch holds the same share of each domain's prompts)")
        if self.eps_low > self.eps_high:
            fail(f"{prefix}.eps_low", self.eps_low, f"must be <= {prefix}.eps_high")

    def teacher(self, domain: str) -> str | None:
        """The teacher path of `domain` (None when the teacher term is off)."""
        return dict(self.teachers).get(domain)

    def reward(self, domain: str) -> str | None:
        """The reward name of `domain`; None for `none`."""
        name = dict(self.rewards)[domain]
        return None if name == NO_REWARD else name

    def prompt_source(self, domain: str) -> tuple[str, str]:
        """(kind, argument) of `domain`'s prompt source."""
        kind, _, arg = dict(self.prompts)[domain].partition(":")
        return kind, arg
