"""Configs: YAML files + ``key=value`` overrides, validated against typed dataclasses.

OmegaConf does the merging and type checking; this module turns its exceptions into
:class:`ConfigError` messages a user can act on (the key, the expected type, the
closest valid key) and writes the resolved config next to every output.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
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
    for f in fields(schema):
        keys.append(prefix + f.name)
        if is_dataclass(f.type) and isinstance(f.type, type):
            keys += _valid_keys(f.type, prefix + f.name + ".")
    return keys


def _unknown_key_message(exc: OmegaConfBaseException, schema: type, where: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or str(exc)
    valid = _valid_keys(schema)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r} in {where}.{hint} Valid keys: {', '.join(valid)}"


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """``["a.b=1", "c=[1,2]"]`` -> DictConfig; a malformed item is a ConfigError."""
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. batch_size=64)"
            )
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {items}: {first_line(exc)}") from None


def load_yaml(path: str | Path, kind: str | None = None) -> DictConfig:
    """A YAML mapping from ``path``, or from the shipped config of that name (``kind``: its
    folder, e.g. ``tasks``); see :func:`ibot_bench.resources.resolve_config`."""
    path = resolve_config(path, kind)
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return cfg


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    extra: dict[str, Any] | None = None,
    kind: str | None = None,
) -> T:
    """Defaults of ``schema`` <- YAML ``path`` <- ``extra`` <- ``overrides``; validated.

    ``path`` may name a shipped config of folder ``kind`` (see :func:`load_yaml`).
    Returns a typed, read-only DictConfig that behaves like an instance of ``schema``.
    """
    base = OmegaConf.structured(schema)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        layers.append((str(path), load_yaml(path, kind)))
    if extra:
        layers.append(("settings", OmegaConf.create(extra)))
    layers.append(("command-line overrides", parse_overrides(overrides)))
    cfg = base
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ConfigKeyError as exc:
            raise ConfigError(_unknown_key_message(exc, schema, where)) from exc
        except ValidationError as exc:
            key = getattr(exc, "full_key", "?")
            raise ConfigError(
                f"bad value for config key {key!r} in {where}: {exc.msg if hasattr(exc, 'msg') else exc}"
            ) from exc
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
