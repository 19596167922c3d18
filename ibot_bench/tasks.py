"""Task registry: each module in ``downstream/`` registers its evaluation here.

A frozen-feature task is a plain function ``fn(train, test, cfg) -> TaskOutput``
taking two :class:`~ibot_bench.features.FeatureSet` objects (the engine extracts and
caches them) and the task's config dataclass. A training task (``frozen=False``:
fine-tuning, dense tasks) is ``fn(ctx, cfg) -> TaskOutput`` with a :class:`TaskContext`
naming the encoder, the dataset and a work folder for its checkpoints. The CLI and the suite runner find
tasks by name through :data:`TASKS`; no task imports another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ibot_bench.registry import Registry


@dataclass
class TaskOutput:
    """What a task returns: metrics (flat name -> number), the protocol name, extras."""

    metrics: dict[str, float]
    protocol: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. chosen head, per-k table


@dataclass
class TaskContext:
    """What a training task gets besides its config."""

    encoder_spec: str
    data_spec: str
    work_dir: Path  # per (encoder, task, dataset, config): checkpoints for exact resume
    allow_partial: bool = False
    log: Callable[[str], None] = print
    # splits of data_spec the runner already loaded (and fingerprinted), by name
    splits: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Any:
        """Split ``name`` of ``data_spec``: the runner's loaded one, else loaded now."""
        if name not in self.splits:
            from ibot_bench.data import load_split

            self.splits[name] = load_split(self.data_spec, name)
        return self.splits[name]


@dataclass
class TaskDef:
    name: str
    fn: Callable[..., TaskOutput]
    config_cls: type
    frozen: bool = True  # frozen tasks take cached features; others take the encoder
    # feature knobs the engine must honour for this task (e.g. n_last_blocks=4)
    needs: dict[str, Any] = field(default_factory=dict)
    help: str = ""


TASKS: Registry[TaskDef] = Registry("task")


def register_task(
    name: str, config_cls: type, frozen: bool = True, help: str = "", **needs: Any
) -> Callable[[Callable[..., TaskOutput]], Callable[..., TaskOutput]]:
    """Decorator: register ``fn`` as task ``name`` with its config dataclass."""

    def deco(fn: Callable[..., TaskOutput]) -> Callable[..., TaskOutput]:
        doc = help or (fn.__doc__ or "").strip().split("\n")[0]
        TASKS.add(name, TaskDef(name, fn, config_cls, frozen, dict(needs), doc), doc)
        return fn

    return deco


def discover_tasks() -> Registry[TaskDef]:
    """Import every module of the ``downstream`` package so its tasks register themselves."""
    import importlib
    import pkgutil

    import downstream

    for mod in pkgutil.iter_modules(downstream.__path__):
        try:
            importlib.import_module(f"downstream.{mod.name}")
        except ImportError as exc:  # one broken task module must not take the others down
            logging.getLogger(__name__).warning(
                "task module downstream.%s not loaded: %s", mod.name, exc
            )
    return TASKS
