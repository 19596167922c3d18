"""Every shipped task config is valid for its task, and each task's default file matches."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ibot_bench.config import load_config
from ibot_bench.evaluate import eval_schema
from ibot_bench.tasks import discover_tasks

ROOT = Path(__file__).resolve().parents[1]
TASK_CONFIGS = sorted((ROOT / "configs" / "tasks").glob("*.yaml"))


def task_for(path: Path) -> str:
    """The task a config file belongs to: the longest task name its stem starts with."""
    stem = path.stem.replace("_", "-")
    names = [n for n in discover_tasks().names() if stem == n or stem.startswith(n + "-")]
    assert names, f"{path.name} matches no registered task"
    return max(names, key=len)


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: p.name)
def test_task_config_validates(path):
    task = discover_tasks().get(task_for(path))
    load_config(eval_schema(task), path)  # raises on unknown keys or bad types


@pytest.mark.parametrize("name", discover_tasks().names())
def test_default_config_file_equals_dataclass_defaults(name):
    task = discover_tasks().get(name)
    path = ROOT / "configs" / "tasks" / f"{name.replace('-', '_')}.yaml"
    assert path.is_file(), f"task {name!r} has no default config {path.name}"
    assert OmegaConf.load(path) == OmegaConf.structured(task.config_cls)
