"""Semi-supervised fine-tuning on 1% / 10% of the labels (docs/protocols.md#semi-supervised).

End-to-end fine-tuning on a label subset of the training split, tested on the full val
split. The subset is the SimCLRv2 image list ``split_file`` or, without one, the same
per-class draw the frozen ``semi`` task uses
(:func:`ibot_bench.data.subsets.per_class_fraction`, seeded by ``subset_seed`` so that
training ``seeds`` do not change the labels).

- ``from_head=true`` (the paper's best 10% protocol): keep the first layer of the iBOT
  projection head, ``Linear(D, 2048) + GELU``, loaded from the checkpoint's head, and add a
  new ``Linear(2048, C)`` — the reference's ``--finetune_head_layer 1``. An encoder without
  a head cannot run it: :class:`~ibot_bench.errors.NotApplicableError` (the suite runner
  reports ``n/a``), never a silent switch to the other variant.
- ``from_head=false``: a new ``Linear(D, C)`` on the CLS token (the pooled features of an
  encoder without one, e.g. a timm CNN: any timm model runs this variant, with drop-path
  and layer decay applied as :mod:`ibot_bench.downstream.finetune` does and recorded the
  same way, ``extra["layer_decay_mode"]``, ``extra["drop_path_blocks"]``).

Recipe (the reference's DeiT-based script): AdamW, lr ``5e-6 x batch_size / 512``, wd 0.05,
1000 epochs, 5 warm-up epochs, EMA 0.99996, drop-path 0.1, no layer decay, and DeiT's
augmentation (RandAugment, mixup 0.8, cutmix 1.0, smoothing 0.1, erasing 0.25). Our
schedule is per step with ``min_lr`` 1e-6 (DeiT's 1e-5 floor exceeds the peak lr at
small batches); DeiT's repeated augmentation is not used.

Protocols: ``semi-ft-head-{1,10}pct`` and ``semi-ft-{1,10}pct`` (plus ``-best`` with
``report=best``); the frozen ``semi`` task's protocols are separate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ibot_bench.data import ClassificationSplit, parse_spec, require_classification
from ibot_bench.data.subsets import label_subset
from ibot_bench.downstream.finetune import (
    FinetuneConfig,
    FinetuneModel,
    param_groups,
    prepare_backbone,
    resolve_recipe,
)
from ibot_bench.downstream.finetune_engine import fit
from ibot_bench.encoders import Encoder, build_head
from ibot_bench.errors import ConfigError, NotApplicableError
from ibot_bench.tasks import TaskContext, TaskOutput, register_task


@dataclass
class SemiFinetuneConfig(FinetuneConfig):
    """Settings of ``semi-finetune``: the fine-tuning fields with the semi recipe's defaults."""

    fraction: float = 0.1  # 0.01 or 0.1; names the protocol
    split_file: str | None = None  # SimCLRv2 1percent.txt / 10percent.txt
    subset_seed: int = 0
    from_head: bool = True  # keep the projection head's first layer (needs an iBOT/DINO head)
    epochs: int | None = 1000
    layer_decay: float | None = 1.0
    drop_path: float | None = 0.1
    lr: float = 5.0e-6
    lr_batch_ref: int = 512
    warmup_epochs: int = 5
    head_init_scale: float = 1.0
    eval_interpolation: str = "bicubic"
    ema: bool = True
    ema_decay: float = 0.99996


def protocol_name(cfg: SemiFinetuneConfig) -> str:
    """``semi-ft-head-10pct``, ``semi-ft-1pct``, ``...-best`` with report=best."""
    head = "-head" if cfg.from_head else ""
    best = "-best" if cfg.report == "best" else ""
    return f"semi-ft{head}-{round(100 * cfg.fraction, 6):g}pct{best}"


def labelled_split(train: ClassificationSplit, cfg: SemiFinetuneConfig) -> ClassificationSplit:
    """The labelled part of ``train``: a split file's images or ``fraction`` of each class."""
    rows, tag = label_subset(
        train.labels,
        train.sample_names,
        fraction=cfg.fraction,
        split_file=cfg.split_file,
        seed=cfg.subset_seed,
        class_names=train.class_names,
        root=train.dataset_root,
    )
    return train.subset(rows, tag)


def head_first_layer(encoder: Encoder) -> tuple[nn.Module, int]:
    """The projection head's first Linear (+ GELU when more layers follow) and its width."""
    if encoder.head_state is None:
        raise NotApplicableError(
            f"{encoder.info.spec} has no iBOT/DINO projection head, so semi-finetune with "
            "from_head=true is not applicable: use a full iBOT checkpoint (with the 'teacher' "
            "or 'student' head weights), or from_head=false for the variant without the head."
        )
    mlp = build_head(encoder.head_state).mlp
    first = mlp[0]
    layers = [first, nn.GELU()] if len(mlp) > 1 else [first]
    return nn.Sequential(*layers), first.out_features


def semi_finetune_eval(ctx: TaskContext, cfg: SemiFinetuneConfig) -> tuple[dict[str, float], dict]:
    """Fine-tune on the label subset of ``ctx.data_spec`` train; evaluate on all of val."""
    _, _, options = parse_spec(ctx.data_spec)
    if {"fraction", "split_file"} & set(options):
        raise ConfigError(
            f"semi-finetune draws its own label subset: remove fraction/split_file from the "
            f"dataset spec {ctx.data_spec!r} and set them as task keys (fraction=0.01)"
        )
    full = require_classification(ctx.split("train"), ctx.data_spec)
    train, val = labelled_split(full, cfg), ctx.split("val")
    encoder = ctx.encoder()
    recipe = resolve_recipe(cfg, encoder)
    proj, proj_dim = None, None
    if cfg.from_head:
        proj, proj_dim = head_first_layer(encoder)
    applied = prepare_backbone(ctx, encoder, recipe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = FinetuneModel(
            encoder.model, len(full.class_names), cfg.pool, proj, proj_dim, cfg.head_init_scale
        )
    groups = param_groups(model, cfg.weight_decay, recipe.layer_decay)
    metrics, extra = fit(ctx, model, groups, train, val, cfg, recipe.epochs)
    extra.update(
        recipe=recipe.__dict__,
        subset=train.meta.get("subset"),
        subset_size=len(train),
        full_train_size=len(full),
        **applied,
    )
    return metrics, extra


@register_task("semi-finetune", SemiFinetuneConfig, distributed=True)
def semi_finetune(ctx: TaskContext, cfg: SemiFinetuneConfig) -> TaskOutput:
    """End-to-end fine-tuning on 1% / 10% of labels, from the projection head or not (docs/protocols.md#semi-supervised)."""
    metrics, extra = semi_finetune_eval(ctx, cfg)
    return TaskOutput(metrics=metrics, protocol=protocol_name(cfg), extra=extra)
