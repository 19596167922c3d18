"""Files shipped inside the package: the YAML configs and the published reference rows.

The repository keeps them in ``configs/`` and ``results/reference/``; installed (wheel or
editable) they are the data packages ``ibot_bench.configs`` and ``ibot_bench.reference``
(see the comment in ``pyproject.toml``), found here through :mod:`importlib.resources`, so
they work from any working directory. A user's own config file is always used by its path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ibot_bench.errors import ConfigError

CONFIG_KINDS = ("suites", "tasks", "pretrain", "profiles")


def config_dir() -> Path:
    """Folder of the shipped configs (``suites/``, ``tasks/``, ``pretrain/``)."""
    return Path(str(files("ibot_bench.configs")))


def reference_dir() -> Path:
    """Folder of the published reference rows (``*.csv``)."""
    return Path(str(files("ibot_bench.reference")))


def shipped_configs(kind: str) -> dict[str, Path]:
    """Shipped configs of one kind (``suites``, ``tasks``, ``pretrain``) by name (file stem)."""
    return {p.stem: p for p in sorted((config_dir() / kind).glob("*.yaml"))}


def resolve_config(name_or_path: str | Path, kind: str | None = None) -> Path:
    """A config file: a path that exists, else a shipped config by name.

    ``configs/tasks/knn.yaml``, ``tasks/knn.yaml``, ``tasks/knn`` and (with ``kind="tasks"``)
    ``knn`` all name the shipped ``tasks/knn.yaml``, so the README's examples work from any
    directory. Anything else is a :class:`ConfigError` naming the path and the shipped configs.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and len(path.parts) > 1:
        raise ConfigError(f"config file {name_or_path} is a folder; give a YAML file in it")
    rel = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    candidates = [rel, rel.with_name(rel.name + ".yaml")]
    if kind is not None:
        candidates += [Path(kind) / c for c in candidates]
    root = config_dir()
    for candidate in candidates:
        if not candidate.is_absolute() and (root / candidate).is_file():
            return root / candidate
    kinds = [kind] if kind else list(CONFIG_KINDS)
    listing = "; ".join(f"{k}: {', '.join(shipped_configs(k)) or 'none'}" for k in kinds)
    raise ConfigError(
        f"config file {name_or_path} not found. Give the path of a YAML file, or the name of "
        f"a shipped config ({listing})"
    )
