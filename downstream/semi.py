"""Semi-supervised evaluation on frozen features: 1% / 10% of the training labels.

docs/protocols.md#semi-supervised: the frozen protocols (kNN, linear probe,
logistic regression) are trained on a label subset of the training split and tested on
the full test split. The subset is the SimCLRv2 image list given by ``split_file``
(``1percent.txt`` / ``10percent.txt``) or, without one, a deterministic per-class draw of
``fraction`` of every class (:func:`ibot_bench.data.subsets.per_class_fraction`).

Protocol name: ``semi-{100*fraction:g}pct`` (``semi-1pct``, ``semi-10pct``); the fine-tuning
variant of the paper is a different task. Metrics are each method's metrics prefixed by
the method: ``knn_top1``, ``linear_top1``, ``logreg_top1``, ...

Reuse rule: this module imports the plain algorithm cores of the other frozen tasks
(``knn_eval``, ``linear_probe``, ``logreg_eval``), never their registered task functions or
the task registry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ibot_bench.data import require_classification
from ibot_bench.data.subsets import label_subset
from ibot_bench.downstream.knn import KnnConfig, knn_eval
from ibot_bench.downstream.linear import LinearConfig, linear_probe, log_skipped, variants_need
from ibot_bench.downstream.live_features import LiveViews, live_views
from ibot_bench.downstream.logreg import LogregConfig, logreg_eval
from ibot_bench.errors import ConfigError
from ibot_bench.features import FeatureSet
from ibot_bench.tasks import TaskContext, TaskOutput, register_task

log = logging.getLogger(__name__)

METHODS: dict[str, Callable[..., tuple[dict, dict]]] = {
    "knn": knn_eval,
    "linear": linear_probe,
    "logreg": logreg_eval,
}


@dataclass
class SemiConfig:
    """Settings of the frozen semi-supervised task (docs/protocols.md#semi-supervised).

    ``seed`` drives the per-class draw and overrides the seed of every method's config.
    """

    fraction: float = 0.01
    split_file: str | None = None
    methods: list[str] = field(default_factory=lambda: ["knn", "linear", "logreg"])
    seed: int = 0
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    logreg: LogregConfig = field(default_factory=LogregConfig)


def protocol_name(fraction: float) -> str:
    """``semi-1pct`` for 0.01, ``semi-10pct`` for 0.1, ``semi-0.5pct`` for 0.005."""
    return f"semi-{round(100 * fraction, 6):g}pct"


def subset_rows(train: FeatureSet, cfg: SemiConfig, root: str = "") -> tuple[np.ndarray, str]:
    """Rows of ``train`` whose labels are used, and the tag naming the subset (a relative
    ``split_file`` is looked for in the dataset folder ``root`` first)."""
    return label_subset(
        train.labels,
        train.sample_names,
        fraction=cfg.fraction,
        split_file=cfg.split_file,
        seed=cfg.seed,
        class_names=train.class_names,
        root=root,
        skipped=train.meta.get("skipped", ()),
    )


def _method_config(cfg: SemiConfig, method: str) -> object:
    """The method's own config, with the semi seed where the method takes one."""
    sub = getattr(cfg, method)
    return dataclasses.replace(sub, seed=cfg.seed) if hasattr(sub, "seed") else sub


def semi_eval(
    train: FeatureSet,
    test: FeatureSet,
    cfg: SemiConfig,
    views: LiveViews | None = None,
    root: str = "",
) -> tuple[dict[str, float], dict]:
    """Run ``cfg.methods`` on the label subset of ``train``; test on all of ``test``.

    ``views`` are the linear probe's live augmented views (``linear.augment=true``); ``root``
    is the dataset folder, where a relative ``split_file`` is looked for first.
    """
    unknown = [m for m in cfg.methods if m not in METHODS]
    if not cfg.methods or unknown:
        raise ConfigError(
            f"methods must be a non-empty subset of {list(METHODS)}, got {cfg.methods}"
        )
    rows, source = subset_rows(train, cfg, root)
    subset = train.subset(rows)
    log.info("semi: %d of %d training images (%s)", len(rows), len(train), source)
    metrics: dict[str, float] = {}
    extra: dict = {"subset_size": len(rows), "train_size": len(train), "subset_source": source}
    for method in dict.fromkeys(cfg.methods):
        extra_args = (views,) if method == "linear" else ()
        m_metrics, m_extra = METHODS[method](subset, test, _method_config(cfg, method), *extra_args)
        metrics.update({f"{method}_{name}": value for name, value in m_metrics.items()})
        extra[method] = m_extra
    return metrics, extra


def feature_needs(cfg: SemiConfig) -> dict[str, int | None]:
    """What the linear method needs, when it runs (``cfg`` may carry ``features``)."""
    if "linear" not in cfg.methods:
        return {}
    return variants_need(cfg.linear.variants, getattr(cfg, "features", None))


def _dataset_root(ctx: TaskContext, cfg: SemiConfig) -> str:
    """The dataset folder where a relative ``split_file`` is looked for first ("" when
    there is none to look for: no split file, or an absolute one)."""
    if not cfg.split_file or Path(cfg.split_file).expanduser().is_absolute():
        return ""
    return require_classification(ctx.split("train"), ctx.data_spec).dataset_root


@register_task("semi", SemiConfig, features=feature_needs)
def semi(ctx: TaskContext, cfg: SemiConfig) -> TaskOutput:
    """Frozen kNN / linear / log. regression on 1% or 10% of labels (docs/protocols.md#semi-supervised)."""
    views = live_views(ctx, _method_config(cfg, "linear"))
    root = _dataset_root(ctx, cfg)
    metrics, extra = semi_eval(ctx.features("train"), ctx.features("val"), cfg, views, root)
    if "linear" in extra:
        log_skipped(ctx, extra["linear"], "semi linear")
    return TaskOutput(metrics=metrics, protocol=protocol_name(cfg.fraction), extra=extra)
