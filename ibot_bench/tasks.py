"""Task registry and the one task interface.

Every task -- frozen-feature or training -- is a plain function ``fn(ctx, cfg) ->
TaskOutput`` registered by name with its config dataclass. ``ctx`` is a
:class:`TaskContext`: it serves the cached features of a split, the encoder (built at
most once, only when asked for), the loaded dataset splits, the output folders and the
seed. A task asks the context for what it uses; the runner never decides for it. The CLI
and the suite runner find tasks through :data:`TASKS`; no task imports another's
registered function (plain algorithm cores such as ``knn_eval`` may be shared).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ibot_bench.data import ClassificationSplit, DenseSplit, load_split
from ibot_bench.encoders import Encoder, encoder_fingerprint, load_encoder
from ibot_bench.errors import UserError
from ibot_bench.features import FeatureConfig, FeatureSet, extract_features
from ibot_bench.registry import Registry


@dataclass
class TaskOutput:
    """What a task returns: metrics (flat name -> number), the protocol name, extras."""

    metrics: dict[str, float]
    protocol: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. chosen head, per-k table


@dataclass
class TaskContext:
    """Everything a task gets besides its config.

    ``features(split)`` comes from the feature cache (extracted on a miss, the encoder being
    built only then); ``encoder()`` is built at most once per context, honouring
    ``allow_partial``; ``split(name)`` is the loaded dataset split. ``splits`` and
    ``feature_sets`` may be shared between contexts (the runner shares them across seeds
    and, for splits, across a suite) so nothing is scanned or extracted twice.
    """

    encoder_spec: str
    data_spec: str
    work_dir: Path | None = None  # this task's own folder (checkpoints for exact resume)
    allow_partial: bool = False
    log: Callable[[str], None] = print
    seed: int = 0
    output_dir: Path | None = None  # the run's results folder
    feature_config: FeatureConfig = field(default_factory=FeatureConfig)
    cache_dir: str | Path | None = None
    refresh_features: bool = False
    splits: dict[str, ClassificationSplit | DenseSplit] = field(default_factory=dict)
    feature_sets: dict[str, FeatureSet] = field(default_factory=dict)
    fingerprint: str | None = None  # the encoder's; computed (a file hash) when first needed
    # called before features of a split are first extracted (the runner uses it under torchrun
    # to have the other ranks join the sharded extraction while rank 0 runs a frozen task)
    announce: Callable[[str], None] | None = None
    _encoder: Encoder | None = field(default=None, init=False, repr=False)

    def split(self, name: str) -> ClassificationSplit | DenseSplit:
        """Split ``name`` ("train" or "val") of the dataset, loaded once."""
        if name not in self.splits:
            self.splits[name] = load_split(self.data_spec, name)
        return self.splits[name]

    def encoder_fingerprint(self) -> str:
        """The encoder's fingerprint (weights-file hash), without building the model."""
        if self.fingerprint is None:
            self.fingerprint = encoder_fingerprint(self.encoder_spec)
        return self.fingerprint

    def encoder(self) -> Encoder:
        """The encoder, built on first use (in eval mode) and the same object afterwards."""
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder_spec, allow_partial=self.allow_partial)
            self.fingerprint = self._encoder.info.fingerprint
        return self._encoder

    def features(self, split: str) -> FeatureSet:
        """Frozen features of ``split`` under :attr:`feature_config`, from the cache if there."""
        if split not in self.feature_sets:
            if self.announce is not None:
                self.announce(split)
            self.feature_sets[split] = extract_features(
                self.encoder_spec,
                self.data_spec,
                split,
                self.feature_config,
                cache_dir=self.cache_dir,
                refresh=self.refresh_features,
                encoder=self.encoder,
                fingerprint=self.encoder_fingerprint(),
                allow_partial=self.allow_partial,
                log=self.log,
                data=self.split(split),
            )
        return self.feature_sets[split]

    def encoder_info(self) -> dict:
        """The encoder's :class:`EncoderInfo` as a dict, from the built encoder or the
        features' record (a cache hit builds no model); {} when neither is at hand."""
        if self._encoder is not None:
            return asdict(self._encoder.info)
        for feats in self.feature_sets.values():
            return dict(feats.meta.get("encoder", {}))
        return {}

    def arch(self) -> str:
        """The encoder's architecture name (:meth:`encoder_info`)."""
        return str(self.encoder_info().get("arch", ""))

    def size(self, split: str) -> int:
        """Images of ``split`` the task used (features skip unreadable ones when asked to)."""
        if split in self.feature_sets:
            return len(self.feature_sets[split])
        return len(self.split(split))


FeatureNeeds = Callable[[Any], dict[str, Any]]


@dataclass
class TaskDef:
    name: str
    fn: Callable[[TaskContext, Any], TaskOutput]
    config_cls: type
    # feature settings this task needs given its config (e.g. n_last_blocks=4 for the CLS of
    # the last 4 blocks); the runner checks them against the user's feature config
    feature_needs: FeatureNeeds | None = None
    help: str = ""
    # True: the task uses every process itself (DDP fine-tuning, mmengine); False: under
    # torchrun it runs once, on rank 0, the other ranks only sharing feature extraction
    distributed: bool = False

    def needs(self, cfg: Any) -> dict[str, Any]:
        return dict(self.feature_needs(cfg)) if self.feature_needs else {}


TASKS: Registry[TaskDef] = Registry("task")


def register_task(
    name: str,
    config_cls: type,
    help: str = "",
    features: FeatureNeeds | None = None,
    distributed: bool = False,
) -> Callable[[Callable[..., TaskOutput]], Callable[..., TaskOutput]]:
    """Decorator: register ``fn(ctx, cfg)`` as task ``name`` with its config dataclass.

    ``features(cfg) -> {FeatureConfig field: value}`` declares feature settings the task
    needs for that config; ``distributed=True`` marks a task that uses every process itself.
    """

    def deco(fn: Callable[..., TaskOutput]) -> Callable[..., TaskOutput]:
        doc = help or (fn.__doc__ or "").strip().split("\n")[0]
        TASKS.add(name, TaskDef(name, fn, config_cls, features, doc, distributed), doc)
        return fn

    return deco


def discover_tasks() -> Registry[TaskDef]:
    """Import every module of ``ibot_bench.downstream`` so its tasks register themselves."""
    import importlib
    import pkgutil

    from ibot_bench import downstream

    for mod in pkgutil.iter_modules(downstream.__path__):
        try:
            importlib.import_module(f"{downstream.__name__}.{mod.name}")
        except ImportError as exc:  # one broken task module must not take the others down
            logging.getLogger(__name__).warning(
                "task module %s.%s not loaded: %s", downstream.__name__, mod.name, exc
            )
    return TASKS


def check_feature_needs(task: TaskDef, cfg: Any, features: FeatureConfig) -> None:
    """A :class:`UserError` when the user's feature settings contradict what ``task`` needs."""
    for key, value in task.needs(cfg).items():
        if getattr(features, key) != value:
            raise UserError(
                f"task {task.name!r} needs features.{key}={value} with this config, but "
                f"features.{key}={getattr(features, key)} was set; remove that override (or "
                "change the task setting that needs it)"
            )
