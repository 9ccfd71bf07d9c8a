"""Parameter counts of a model config per component, in total and active per token.

    print(summary(config))        # what `python -m mimo_jax.summary --config ...` prints

Shapes come from `jax.eval_shape` on the real model's `init`: nothing is allocated, so the full
309B model is summarised in seconds on a laptop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax.linen import meta

from mimo_jax.config import ModelConfig, model_config_from_dict
from mimo_jax.model import layout
from mimo_jax.model.transformer import MiMoV2Flash


@dataclasses.dataclass
class Row:
    """One component: its parameters, and those a token uses (the k routed experts of E)."""

    component: str
    total: int
    active: int


def param_shapes(config: ModelConfig) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s (no memory is allocated)."""
    model = MiMoV2Flash(config)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    init = functools.partial(model.init, return_mtp=True)
    variables = jax.eval_shape(init, jax.random.PRNGKey(0), tokens)
    return meta.unbox(variables["params"])


def _size(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def count_parameters(config: ModelConfig) -> list[Row]:
    """Per-component rows; `active` counts only the k routed experts a token uses."""
    params = param_shapes(config)
    share = config.num_experts_per_token / config.num_experts
    counts: dict[str, list[int]] = {}

    def add(name: str, total: int, active: int | None = None) -> None:
        row = counts.setdefault(name, [0, 0])
        row[0] += total
        row[1] += total if active is None else active

    add("embedding", _size(params["embed"]))
    add("lm head", _size(params["lm_head"]))
    add("final norm", _size(params["final_norm"]))
    for i, layer in enumerate(layout.unstack_layers(params["decoder"], config)):
        kind = "SWA" if config.layer_types[i] == "sliding" else "GA"
        add(f"attention ({kind})", _size(layer["attention"]))
        add("norms", _size(layer["input_norm"]) + _size(layer["post_attention_norm"]))
        if "mlp" in layer:
            add("dense FFN", _size(layer["mlp"]))
        else:
            moe = layer["moe"]
            experts = _size([moe["gate"], moe["up"], moe["down"]])
            add("MoE experts", experts, round(experts * share))
            add("MoE router + bias", _size([moe["router"], moe["e_score_correction_bias"]]))
    rows = [Row(name, total, active) for name, (total, active) in counts.items()]
    for k in range(config.num_mtp_heads):
        size = _size(params[f"mtp_{k}"])
        rows.append(Row(f"MTP head {k} (not in totals)", size, size))
    return rows


def _human(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def format_table(rows: list[Row]) -> str:
    """A fixed-width table with totals (MTP heads listed after the totals, excluded from them)."""
    main = [r for r in rows if not r.component.startswith("MTP")]
    extra = [r for r in rows if r.component.startswith("MTP")]
    total = sum(r.total for r in main)
    active = sum(r.active for r in main)
    lines = [f"{'component':<32}{'parameters':>20}{'active / token':>20}", "-" * 72]
    for r in main:
        lines.append(f"{r.component:<32}{r.total:>20,}{r.active:>20,}")
    lines.append("-" * 72)
    lines.append(f"{'total':<32}{total:>20,}{active:>20,}")
    lines.append(f"{'':<32}{_human(total):>20}{_human(active):>20}")
    for r in extra:
        lines.append(f"{r.component:<32}{r.total:>20,}{r.active:>20,}")
    return "\n".join(lines)


def summary(config: ModelConfig | Mapping[str, Any]) -> str:
    """The parameter table of a model: a `ModelConfig`, a run config (its `model` section is
    read) or a model section alone. A bad value raises `ConfigError` naming the key."""
    if not isinstance(config, ModelConfig):
        config = model_config_from_dict(config["model"] if "model" in config else config)
    return format_table(count_parameters(config))
