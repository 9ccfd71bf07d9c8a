"""Run configs outside the command line: load a `configs/*.py` file and override its values.

    config = load_config("configs/tiny.py", overrides={"model.num_layers": 4})
    config = load_config(tiny, overrides={"train.steps": "20"})      # a module, text values
    configs = mimo_jax.build_configs(config)                         # frozen, validated

What `--config configs/tiny.py --config.model.num_layers=4` gives a command, `load_config` gives a
notebook: the `ml_collections.ConfigDict` of the file's `get_config()` with the overrides set.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pathlib
import types
from typing import Any, Mapping, Sequence

import ml_collections

from mimo_jax.config import ConfigError

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def config_module(source: str | os.PathLike | types.ModuleType) -> types.ModuleType:
    """The module holding `get_config`: given, loaded from a .py file, or imported by name."""
    if isinstance(source, types.ModuleType):
        return source
    path = pathlib.Path(source)
    if path.suffix == ".py" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {str(source)!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"_mimo_config_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"config file {str(source)!r} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(str(source))
    except ImportError as err:
        raise ConfigError(f"config {str(source)!r} is neither a .py file nor an importable "
                          f"module: {err}") from err


def _parse_text(key: str, text: str, current: Any) -> Any:
    """`text` read as the type of the value it replaces, as the command line reads it."""
    if isinstance(current, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"config key {key!r} = {text!r}: expected a boolean (true/false)")
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, (tuple, list)):
            return type(current)(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError) as err:
        raise ConfigError(f"config key {key!r} = {text!r}: expected a "
                          f"{type(current).__name__}") from err
    return text


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """["train.steps=10", "init_from=DIR"] -> {"train.steps": "10", "init_from": "DIR"}: what
    `--override` flags give, split at their first "=" (values may hold more). A leading
    "config." is dropped. Whether a key exists is checked when it is set (`override`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not 'section.key=value'")
        out[key[len("config."):] if key.startswith("config.") else key] = value
    return out


def override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets `config.<key>` (dotted, e.g. "model.num_layers"; a leading "config." is dropped).

    A string replacing a non-string value is parsed as that value's type ("4" -> 4, "true" ->
    True, "(1, 2)" -> (1, 2)). An unknown key or a value of the wrong type raises `ConfigError`
    naming the key.
    """
    dotted = key[len("config."):] if key.startswith("config.") else key
    *parents, leaf = dotted.split(".")
    node = config
    for depth, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            section = ".".join(parents[:depth]) or "the config"
            raise ConfigError(f"config key {dotted!r}: {section} has no section {name!r}")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"config key {dotted!r} does not exist (keys here: {known})")
    current = node[leaf]
    if isinstance(value, str) and current is not None and not isinstance(current, str):
        value = _parse_text(dotted, value, current)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key {dotted!r} = {value!r}: {err}") from err


def load_config(source: str | os.PathLike | types.ModuleType,
                overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The `ConfigDict` of a config's `get_config()` with `overrides` set (see `override`).

    `source` is a `configs/*.py` path, a module name ("configs.tiny") or a module. Configs that
    import their siblings (`configs/tiny.py` imports `configs.mimo_v2_flash`) need the repository
    root on `sys.path`, as when running from it. Raises `ConfigError` naming a bad source or key.
    """
    module = config_module(source)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config {getattr(module, '__file__', source)!r} has no get_config()")
    config = module.get_config()
    for key, value in (overrides or {}).items():
        override(config, key, value)
    return config
