"""MiMo-V2-Flash in JAX/Flax: the names a notebook needs.

    import mimo_jax

    config = mimo_jax.load_config("configs/tiny.py", overrides={"model.num_layers": 4})
    model = mimo_jax.MiMoV2Flash(mimo_jax.build_configs(config).model)
    print(mimo_jax.summary(config))                               # parameter table
    model, params = mimo_jax.load_hf("/path/to/MiMo-V2-Flash")     # or save_hf(...)
    model, params, tokenizer = mimo_jax.load_checkpoint("runs/tiny")
    out = mimo_jax.generate(model, params, prompts, lengths, max_new_tokens=64)
    mimo_jax.pretrain(config, "runs/tiny")             # also mimo_jax.sft, mimo_jax.mopd

Each name is imported from its module on first use, so that `import mimo_jax` stays cheap and
importing one submodule (`mimo_jax.config`, a Grain worker's `mimo_jax.data`) never loads the
rest. The modules themselves are the deeper API: `mimo_jax.model`, `mimo_jax.convert`,
`mimo_jax.inference`, `mimo_jax.data`, `mimo_jax.parallel`, `mimo_jax.train`. The command-line
programs live in `mimo_jax.cli`; `python -m mimo_jax.generate` and `python -m mimo_jax.summary`
run them (the modules of those names only start the commands, and are not this API).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> (module, name in that module)
_EXPORTS = {
    "load_config": ("mimo_jax.run_config", "load_config"),
    "build_configs": ("mimo_jax.train.trainer", "build_configs"),
    "ModelConfig": ("mimo_jax.config", "ModelConfig"),
    "ConfigError": ("mimo_jax.config", "ConfigError"),
    "MiMoV2Flash": ("mimo_jax.model.transformer", "MiMoV2Flash"),
    "init_params": ("mimo_jax.model.transformer", "init_params"),
    "summary": ("mimo_jax.model.param_count", "summary"),
    "load_hf": ("mimo_jax.convert.hf", "load"),
    "save_hf": ("mimo_jax.convert.hf", "save"),
    "load_checkpoint": ("mimo_jax.loading", "load_checkpoint"),
    "load_tokenizer": ("mimo_jax.data.tokenizer", "load_tokenizer"),
    "generate": ("mimo_jax.inference.generation", "generate"),
    "speculative_generate": ("mimo_jax.inference.speculative", "speculative_generate"),
    "SamplingConfig": ("mimo_jax.inference.sampling", "SamplingConfig"),
    "pretrain": ("mimo_jax.train.trainer", "run"),
    "sft": ("mimo_jax.train.sft_trainer", "run"),
    "mopd": ("mimo_jax.train.mopd_trainer", "run"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports a public name's module on first use (PEP 562) and keeps the name here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mimo_jax' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
