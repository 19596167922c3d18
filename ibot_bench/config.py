"""Configs: YAML files + ``key=value`` overrides, validated against typed dataclasses.

OmegaConf does the merging and type checking; this module turns its exceptions into
:class:`ConfigError` messages a user can act on (the key, the expected type, the
closest valid key) and writes the resolved config next to every output.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    GrammarParseError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    UnsupportedInterpolationType,
    ValidationError,
)

from ibot_bench.errors import ConfigError, first_line
from ibot_bench.io import atomic_write_text
from ibot_bench.resources import resolve_config

T = TypeVar("T")


def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in typing.get_type_hints(schema).items():  # resolves string annotations
        keys.append(prefix + name)
        if is_dataclass(tp) and isinstance(tp, type):
            keys += _valid_keys(tp, prefix + name + ".")
    return keys


def _unknown_key_message(exc: OmegaConfBaseException, schema: type, where: str) -> str:
    key = str(getattr(exc, "full_key", None) or getattr(exc, "key", None) or str(exc))
    valid = _valid_keys(schema)
    group, _, leaf = key.rpartition(".")
    if group:  # in a group that exists: one of its own keys, never the group itself
        own = [k.removeprefix(group + ".") for k in valid if k.startswith(group + ".")]
        close = difflib.get_close_matches(leaf, [k for k in own if "." not in k], 1, 0.6)
        close = [f"{group}.{c}" for c in close]
    else:  # a top-level key: any key, in any group (ks -> knn.ks)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listed = [k for k in valid if k.startswith(group + ".")] if group else valid
    return f"unknown config key {key!r} in {where}.{hint} Valid keys: {', '.join(listed)}"


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def _field_type(schema: type, key: str) -> Any:
    """The annotated type of dotted ``key`` in ``schema`` (None when it has none)."""
    tp: Any = schema
    for part in key.split("."):
        if not (is_dataclass(tp) and isinstance(tp, type)):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _describe_type(tp: Any, key: str) -> str:
    """``list[int]`` -> "a list of integers", ``int | None`` -> "an integer or null", ..."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        kinds = [_describe_type(a, key) for a in args if a is not type(None)]
        return " or ".join(kinds + ["null"] * (type(None) in args))
    if typing.get_origin(tp) is list:
        return f"a list of {_PLURALS.get(args[0], 'values') if args else 'values'}"
    if is_dataclass(tp):
        return f"a group of settings, set one by one (e.g. {key}.{fields(tp)[0].name}=...)"
    return _TYPE_NAMES.get(tp) or getattr(tp, "__name__", "another type")


def _bad_key(cfg: DictConfig, layer: DictConfig, prefix: str = "") -> str | None:
    """The dotted key of ``layer`` whose value ``cfg`` refuses (OmegaConf does not always
    name it: a scalar given for a group of settings comes without a key)."""
    for key in layer:
        value = layer._get_node(key)
        try:
            OmegaConf.merge(cfg, {key: value})
        except (ValidationError, TypeError):
            inner = cfg.get(key)
            if isinstance(value, DictConfig) and isinstance(inner, DictConfig):
                return _bad_key(inner, value, f"{prefix}{key}.") or f"{prefix}{key}"
            return f"{prefix}{key}"
    return None


def _bad_value_message(cfg: DictConfig, layer: DictConfig, schema: type, where: str) -> str:
    """A refused value's message: its key, the type expected and the value given."""
    key = _bad_key(cfg, layer)
    if key is None:  # not expected: every refused merge has a refused key
        return f"a value in {where} does not match the config's types"
    value = OmegaConf.select(layer, key)
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    expected = _describe_type(_field_type(schema, key), key)
    return f"{key} expects {expected}, got {value!r} (in {where})"


def yaml_problem(exc: BaseException, with_place: bool = True) -> str:
    """A YAML error in one line: its problem and (``with_place``) the line and column."""
    problem = getattr(exc, "problem", None)
    if not problem:
        return first_line(exc)
    mark = getattr(exc, "problem_mark", None)
    if with_place and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return problem


# the usual cause of a broken override: the shell split a value with spaces into two words
_QUOTE_HINT = "a value holding spaces must be quoted as one word, e.g. 'ks=[10, 20]'"


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """``["a.b=1", "c=[1,2]"]`` -> DictConfig; a malformed item is a ConfigError."""
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. batch_size=64); "
                f"{_QUOTE_HINT}"
            )
    for item in items:  # one by one, so that an error names the override at fault
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as exc:  # the value is parsed as YAML: ks=[1,
            raise ConfigError(
                f"override {item!r}: its value is not valid YAML ({yaml_problem(exc, False)}); "
                f"{_QUOTE_HINT}"
            ) from None
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse override {item!r}: {first_line(exc)}") from None
    return OmegaConf.from_dotlist(items)


def load_yaml(path: str | Path, kind: str | None = None) -> DictConfig:
    """A YAML mapping from ``path``, or from the shipped config of that name (``kind``: its
    folder, e.g. ``tasks``); see :func:`ibot_bench.resources.resolve_config`."""
    path = resolve_config(path, kind)
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError and friends
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return cfg


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    extra: dict[str, Any] | None = None,
    kind: str | None = None,
    overrides_from: str = "command-line overrides",
) -> T:
    """Defaults of ``schema`` <- YAML ``path`` <- ``extra`` <- ``overrides``; validated.

    ``path`` may name a shipped config of folder ``kind`` (see :func:`load_yaml`);
    ``overrides_from`` says where the overrides came from in error messages.
    Returns a typed, read-only DictConfig that behaves like an instance of ``schema``.
    """
    base = OmegaConf.structured(schema)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        layers.append((str(path), load_yaml(path, kind)))
    if extra:
        layers.append(("settings", OmegaConf.create(extra)))
    layers.append((overrides_from, parse_overrides(overrides)))
    cfg = base
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ConfigKeyError as exc:
            raise ConfigError(_unknown_key_message(exc, schema, where)) from exc
        except (ValidationError, TypeError):  # TypeError: a mapping given for a list
            raise ConfigError(_bad_value_message(cfg, layer, schema, where)) from None
    try:  # resolve every ${...} now: a broken one is the user's to fix, with its key
        OmegaConf.to_container(cfg, resolve=True)
    except (InterpolationResolutionError, GrammarParseError, UnsupportedInterpolationType) as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(
            f"config key {key!r}: cannot resolve its ${{...}} interpolation "
            f"({first_line(exc)}); give a literal value or reference a key that exists"
        ) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config keys {missing} have no value; set them, e.g. {missing[0]}=...")
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


def check_ranges(checks: Iterable[tuple[str, Any, bool, str]]) -> None:
    """``(key, value, ok, wanted)`` rows: the first not ``ok`` is a :class:`ConfigError`
    naming the key, the range it wants and the value it got."""
    for key, value, ok, wanted in checks:
        if not ok:
            raise ConfigError(f"{key} must be {wanted}, got {value}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, resolved dict of a config (for records and hashes)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if is_dataclass(cfg):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def save_config(cfg: Any, output_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the fully resolved config into ``output_dir`` (atomically)."""
    text = OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)), resolve=True)
    return atomic_write_text(Path(output_dir) / name, text)
