"""Config dataclasses declared once, and the one reader that builds them from a run config.

Each field of a config class is written once, with its default, its check and (where the type alone
does not say how) its parser and its dump, all carried in the field's metadata by `option`:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class RuntimeConfig(Section):
        SECTION = "model.runtime"
        moe_impl: str = option("ragged", check=one_of(MOE_IMPLS))
        attention_chunk_size: int = option(128, check=at_least(1))

`read_section(RuntimeConfig, config.model.runtime)` builds one from a ConfigDict section or any
mapping: it names an unknown key (with the known ones), a key that has moved (and where to), a
missing required key and a value of the wrong type, and recurses into fields whose type is itself a
config class. Every field's check and the class's cross-field `validate` run whenever an instance is
made (`__post_init__`), so `dataclasses.replace` cannot build an invalid config either; a bad value
raises `ConfigError("config key 'model.runtime.moe_impl' = 'fast': must be one of (...)")`.
`to_dict` is the inverse: a plain, JSON-ready dict that `read_section` reads back.

Why a module of its own: the four config modules (model, train, data, mesh) share it, and it knows
none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from typing import Any, Callable, ClassVar, Mapping, NoReturn, Sequence, TypeVar

# A check returns why a value is bad, or None when it is fine.
Check = Callable[[Any], "str | None"]
# A parser turns a raw config value into the field's value; it gets the dotted key for its errors.
Parser = Callable[[Any, str], Any]

_CHECKS, _PARSE, _DUMP = "config_checks", "config_parse", "config_dump"
SectionT = TypeVar("SectionT", bound="Section")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the value."""


def fail(key: str, value: Any, why: str) -> NoReturn:
    """Raises `ConfigError("config key 'KEY' = VALUE: WHY")`."""
    raise ConfigError(f"config key {key!r} = {value!r}: {why}")


def option(default: Any = dataclasses.MISSING, *, check: Check | Sequence[Check] = (),
           parse: Parser | None = None, dump: Callable[[Any], Any] | None = None) -> Any:
    """A config field: its default (none = required), its check(s), and optionally its parser
    (raw config value -> field value, for types the reader cannot convert by itself) and its dump
    (field value -> the JSON-ready spelling that `parse` reads back, also shown in errors)."""
    checks = (check,) if callable(check) else tuple(check)
    metadata = {_CHECKS: checks, _PARSE: parse, _DUMP: dump}
    # The field is made here and placed in a dataclass body by the caller.
    # pylint: disable=invalid-field-call
    if isinstance(default, Section):  # a nested section: each instance gets the (frozen) default
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def at_least(low: float, note: str = "") -> Check:
    """value >= low ("must be >= LOW (NOTE)" otherwise); NaN fails."""
    why = f"must be >= {low}" + (f" ({note})" if note else "")
    return lambda value: None if value >= low else why


def above(low: float) -> Check:
    """value > low; NaN fails."""
    return lambda value: None if value > low else f"must be > {low}"


def within(low: float, high: float) -> Check:
    """low <= value < high; NaN fails."""
    return lambda value: None if low <= value < high else f"must be in [{low}, {high})"


def one_of(choices: Sequence[Any]) -> Check:
    """value in choices."""
    choices = tuple(choices)
    return lambda value: None if value in choices else f"must be one of {choices}"


def each_one_of(choices: Sequence[Any]) -> Check:
    """Every entry of a sequence is in choices."""
    choices = tuple(choices)

    def check(values):
        bad = [v for v in values if v not in choices]
        return f"entries must be in {choices}, got {bad[0]!r}" if bad else None
    return check


class Section:
    """Base of the config dataclasses (declare them `@dataclasses.dataclass(frozen=True,
    kw_only=True)`).

    SECTION: the dotted key of the section in a run config ("model", "model.runtime"); None for a
      class that only appears inside another (its keys are named through its parent's field).
    MOVED: old key -> the dotted key it moved to; reading the old key fails and says where.
    INPUT_KEYS: keys a config may set that are not fields; `derive` turns them into fields.
    """

    SECTION: ClassVar[str | None] = None
    MOVED: ClassVar[Mapping[str, str]] = {}
    INPUT_KEYS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.SECTION is not None:
            check_section(self, self.SECTION)

    def validate(self, prefix: str) -> None:
        """Cross-field rules (each field's own check has passed); `prefix` is the section's dotted
        key, for the messages. Raises `ConfigError` through `fail`."""

    @classmethod
    def derive(cls, values: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Raw section values -> raw field values: consumes `INPUT_KEYS`, fills derived defaults.
        Runs before the fields are read."""
        del prefix  # for the messages of the classes that derive something
        return values


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Section)


def _optional_of(kind: Any) -> Any:
    """X for `X | None`, else None."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not types.NoneType]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0]
    return None


def _as_mapping(value: Any) -> dict[str, Any] | None:
    """A plain dict of a ConfigDict or a mapping (nested sections stay as they are); else None."""
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):  # ml_collections.ConfigDict
        return {key: value[key] for key in value.keys()}
    return None


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    fail(key, value, "must be true or false")


def _from_text(value: Any, convert: Callable[[str], Any]) -> Any:
    """`convert(value)` for a string that spells the number (as a command line gives it), else
    None."""
    if isinstance(value, str):
        try:
            return convert(value)
        except ValueError:
            return None
    return None


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    parsed = _from_text(value, int)
    if parsed is None:
        fail(key, value, "must be an integer")
    return parsed


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    parsed = _from_text(value, float)
    if parsed is None:
        fail(key, value, "must be a number")
    return parsed


def _as_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    fail(key, value, "must be a string")


_SCALARS: dict[type, Parser] = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _as_tuple(kind: Any, value: Any, key: str) -> tuple:
    args = typing.get_args(kind)
    if len(args) != 2 or args[1] is not Ellipsis:
        raise TypeError(f"{key}: give tuple fields other than tuple[X, ...] a parser")
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        fail(key, value, "must be a list or a comma-separated string")
    return tuple(parse_value(args[0], v, key) for v in value)


def parse_value(kind: Any, value: Any, key: str) -> Any:
    """A raw config value as type `kind` (int, float, bool, str, `X | None`, `tuple[X, ...]` from a
    list or a comma-separated string, or a `Section` from a mapping); a wrong type fails naming
    the key."""
    inner = _optional_of(kind)
    if inner is not None:
        return None if value is None else parse_value(inner, value, key)
    if _is_section(kind):
        if isinstance(value, kind):
            return value
        mapping = _as_mapping(value)
        if mapping is None:
            fail(key, value, "must be a section (a mapping of its keys)")
        return read_section(kind, mapping, key)
    if typing.get_origin(kind) is tuple:
        return _as_tuple(kind, value, key)
    if kind in _SCALARS:
        return _SCALARS[kind](value, key)
    raise TypeError(f"{key}: no reader for type {kind!r}; give the field a parser")


def _parse_field(cls: type, field: dataclasses.Field, value: Any, key: str) -> Any:
    parse = field.metadata.get(_PARSE)
    if parse is not None:
        return parse(value, key)
    return parse_value(_field_types(cls)[field.name], value, key)


def _check_known(cls: type, keys: Sequence[str], prefix: str, known: set[str]) -> None:
    for key in keys:
        if key in cls.MOVED:
            raise ConfigError(f"config key '{prefix}.{key}' has moved: set {cls.MOVED[key]!r} "
                              "instead")
        if key not in known:
            raise ConfigError(f"config key '{prefix}.{key}' is unknown; known keys: "
                              f"{sorted(known)}")


def read_section(cls: type[SectionT], section: Any, prefix: str | None = None) -> SectionT:
    """Builds and validates a `cls` from a ConfigDict section or mapping (None: all defaults).

    prefix: the section's dotted key in error messages (default `cls.SECTION`).
    """
    prefix = prefix or cls.SECTION or cls.__name__
    values = {} if section is None else _as_mapping(section)
    if values is None:
        fail(prefix, section, "must be a section (a mapping of its keys)")
    _check_known(cls, list(values), prefix,
                 {f.name for f in dataclasses.fields(cls)} | set(cls.INPUT_KEYS))
    values = cls.derive(values, prefix)
    fields = {}
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}"
        if field.name in values:
            fields[field.name] = _parse_field(cls, field, values[field.name], key)
        elif (field.default is dataclasses.MISSING
              and field.default_factory is dataclasses.MISSING):
            raise ConfigError(f"config key {key!r} is missing")
    config = cls(**fields)
    if cls.SECTION != prefix:  # __post_init__ checked it under its own name, or not at all
        check_section(config, prefix)
    return config


def _shown(field: dataclasses.Field, value: Any) -> Any:
    dump = field.metadata.get(_DUMP)
    return dump(value) if dump is not None else value


def check_section(config: Section, prefix: str) -> None:
    """Runs every field's checks (recursing into nested sections), then `config.validate`."""
    types_ = _field_types(type(config))
    for field in dataclasses.fields(config):
        value, key = getattr(config, field.name), f"{prefix}.{field.name}"
        if isinstance(value, Section):
            if value.SECTION is None:  # one with a SECTION was checked when it was made
                check_section(value, key)
            continue
        if value is None and _optional_of(types_[field.name]) is not None:
            continue
        for check in field.metadata.get(_CHECKS, ()):
            try:
                why = check(value)
            except TypeError:
                why = f"has the wrong type ({type(value).__name__})"
            if why:
                fail(key, _shown(field, value), why)
    config.validate(prefix)


def replace(config: SectionT, **changes: Any) -> SectionT:
    """`dataclasses.replace` with each new value read as its field reads a config value (so
    `layer_types=["global", ...]` becomes a tuple), checked; unknown names fail naming them."""
    cls = type(config)
    prefix = cls.SECTION or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_known(cls, list(changes), prefix, set(fields))
    parsed = {name: _parse_field(cls, fields[name], value, f"{prefix}.{name}")
              for name, value in changes.items()}
    return dataclasses.replace(config, **parsed)


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def to_dict(config: Section) -> dict[str, Any]:
    """The inverse of `read_section`: nested sections as dicts, tuples as lists, fields with a
    dump in their config spelling. JSON-ready."""
    return {field.name: (field.metadata[_DUMP](getattr(config, field.name))
                         if field.metadata.get(_DUMP) else _plain(getattr(config, field.name)))
            for field in dataclasses.fields(config)}
