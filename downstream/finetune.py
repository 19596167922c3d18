"""Full fine-tuning of an encoder with a new linear head (docs/protocols.md#full-fine-tuning).

The BEiT recipe the iBOT paper uses: a new ``Linear(D, C)`` on the final-norm CLS token
(``pool=mean``: the mean final-norm patch token), weights trunc-normal(0.02) scaled by
``head_init_scale`` (0.001); AdamW with layer-wise lr decay — parameter group ``i`` gets
``lr * layer_decay ** (L + 1 - i)`` with ``i = 0`` for patch embed / cls / pos, ``k + 1`` for
block ``k`` and ``L + 1`` for the final norm and the head — weight decay 0.05 except on
biases, norms, pos_embed and cls_token; linear warm-up then cosine to ``min_lr`` per
step; drop-path rising linearly over depth; RandAugment rand-m9-mstd0.5-inc1, mixup 0.8,
cutmix 1.0, label smoothing 0.1, random erasing 0.25; evaluation resizes the shorter side to
``img_size / crop_pct`` then centre-crops. Per-architecture defaults (``None`` in the
config): ViT-S 200 epochs, decay 0.75, drop-path 0.1; ViT-B 100, 0.65, 0.2; ViT-L 50,
0.75, 0.4 (other widths take ViT-S's).

Reference details kept: the lr is absolute (the BEiT/iBOT script does not scale it with
the batch; ``lr_batch_ref`` > 0 scales it by ``batch_size / lr_batch_ref``), 4e-3 is the
script's default (the paper sweeps {8e-4, 9e-4, 1e-3, 2e-3}: set ``lr``), the eval resize
is bilinear (``eval_interpolation``). The warm-up starts at ``warmup_lr``. Inputs use the
ImageNet mean/std the encoders were pretrained with (the BEiT script's default is
Inception's 0.5/0.5 unless ``--imagenet_default_mean_and_std``).

Any timm model: layer-wise lr decay follows :func:`ibot_bench.layer_decay.layer_plan` —
the paper's rule for ViTs, timm's ``group_matcher`` blocks for other models (ResNets,
ConvNeXts, ...), one lr group where no blocks are known (layer decay off); drop-path rises
over whatever residual blocks have a drop-path slot (none: not applied). The record's
``extra`` says what was used: ``layer_decay_mode`` (``vit-blocks`` |
``timm-group-matcher`` | ``none``), ``layer_decay`` (the rate applied, 1.0 when off),
``drop_path`` and ``drop_path_blocks``.

Protocols: ``finetune`` reports the last epoch's top-1/top-5 (no selection on the
evaluation set); ``finetune-best`` (``report=best``) reports the best epoch's, as the
reference's "max accuracy" does. Both always record ``last_*`` and ``best_*``.
``pool=mean`` adds ``-avgpool`` to the protocol name.

The training loop, checkpoints (exact resume), DDP and the out-of-memory advice live in
:mod:`ibot_bench.downstream.finetune_engine`; :mod:`ibot_bench.downstream.semi_finetune` reuses this module's
model and parameter groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from timm.layers import trunc_normal_
from torch import nn

from ibot_bench.config import check_ranges
from ibot_bench.data import require_classification
from ibot_bench.downstream.finetune_engine import fit
from ibot_bench.encoders import Encoder
from ibot_bench.errors import ConfigError
from ibot_bench.layer_decay import (
    NO_WEIGHT_DECAY,
    check_layer_decay,
    is_vit,
    layer_plan,
    set_drop_path,
)
from ibot_bench.tasks import TaskContext, TaskOutput, register_task

# embed_dim -> (name, epochs, layer_decay, drop_path): the paper's table (docs/protocols.md#full-fine-tuning)
ARCH_RECIPES: dict[int, tuple[str, int, float, float]] = {
    384: ("vit_small", 200, 0.75, 0.1),
    768: ("vit_base", 100, 0.65, 0.2),
    1024: ("vit_large", 50, 0.75, 0.4),
}


@dataclass
class FinetuneConfig:
    """Settings of ``finetune`` (docs/protocols.md#full-fine-tuning); None = per arch."""

    epochs: int | None = None  # ViT-S 200, ViT-B 100, ViT-L 50
    layer_decay: float | None = None  # ViT-S 0.75, ViT-B 0.65, ViT-L 0.75; in (0, 1]
    drop_path: float | None = None  # ViT-S 0.1, ViT-B 0.2, ViT-L 0.4
    batch_size: int = 1024  # global images per optimizer step (all ranks, all accum steps)
    accum_steps: int = 1  # gradient accumulation: micro-batch = batch_size / world / accum
    lr: float = 4.0e-3  # peak lr (absolute unless lr_batch_ref > 0)
    lr_batch_ref: int = 0  # > 0: peak lr = lr * batch_size / lr_batch_ref
    min_lr: float = 1.0e-6
    warmup_epochs: int = 20
    warmup_lr: float = 1.0e-6
    weight_decay: float = 0.05
    clip_grad: float | None = None
    pool: str = "cls"  # cls | mean
    head_init_scale: float = 0.001
    img_size: int | None = None  # None: the dataset's default (224 for ImageNet)
    crop_pct: float = 0.875
    eval_interpolation: str = "bilinear"
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    train_interpolation: str = "bicubic"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area
    hflip: float = 0.5  # horizontal-flip probability (0 for symbols a mirror changes)
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    ema: bool = False
    ema_decay: float = 0.9999
    report: str = "last"  # last | best: which epoch the leaderboard's top1/top5 are from
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0 = per epoch
    precision: str = "auto"  # auto (the fastest, timed once per machine) | bf16 | fp16 | fp32
    device: str = "auto"
    num_workers: int = -1  # -1: automatic
    eval_batch_size: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    """The per-architecture values a run actually uses."""

    arch: str
    epochs: int
    layer_decay: float
    drop_path: float


def _check_numbers(cfg: FinetuneConfig) -> None:
    """The recipe's numbers that torch or timm would reject from deep inside (or silently
    misuse), each a config error naming the key and its range."""
    checks = [
        ("lr", cfg.lr, cfg.lr > 0, "> 0"),
        ("min_lr", cfg.min_lr, 0 <= cfg.min_lr <= cfg.lr, f"in [0, lr={cfg.lr}]"),
        ("warmup_lr", cfg.warmup_lr, cfg.warmup_lr >= 0, ">= 0"),
        ("lr_batch_ref", cfg.lr_batch_ref, cfg.lr_batch_ref >= 0, ">= 0 (0: absolute lr)"),
        ("weight_decay", cfg.weight_decay, cfg.weight_decay >= 0, ">= 0"),
        ("smoothing", cfg.smoothing, 0 <= cfg.smoothing < 1, "in [0, 1)"),
        ("mixup", cfg.mixup, cfg.mixup >= 0, ">= 0 (0: off)"),
        ("cutmix", cfg.cutmix, cfg.cutmix >= 0, ">= 0 (0: off)"),
        ("mixup_prob", cfg.mixup_prob, 0 <= cfg.mixup_prob <= 1, "in [0, 1]"),
        ("mixup_switch_prob", cfg.mixup_switch_prob, 0 <= cfg.mixup_switch_prob <= 1, "in [0, 1]"),
        ("reprob", cfg.reprob, 0 <= cfg.reprob <= 1, "in [0, 1]"),
        ("ema_decay", cfg.ema_decay, 0 <= cfg.ema_decay < 1, "in [0, 1)"),
        ("crop_pct", cfg.crop_pct, 0 < cfg.crop_pct <= 1, "in (0, 1]"),
        ("eval_every", cfg.eval_every, cfg.eval_every >= 1, ">= 1 (epochs)"),
        ("checkpoint_every", cfg.checkpoint_every, cfg.checkpoint_every >= 0, ">= 0"),
        ("head_init_scale", cfg.head_init_scale, cfg.head_init_scale > 0, "> 0"),
    ]  # fmt: skip
    check_ranges(checks)
    if cfg.auto_augment:
        from timm.data import create_transform

        policy = cfg.auto_augment
        try:  # timm's own parser of policy names (rand-..., augmix-..., v0, original, ...)
            create_transform(32, is_training=True, auto_augment=policy)
            _check_rand_sections(policy)
        except (AssertionError, KeyError, ValueError) as exc:
            raise ConfigError(
                f"auto_augment={policy!r} is not a timm augmentation policy "
                f"({str(exc) or 'unknown policy'}); e.g. 'rand-m9-mstd0.5-inc1', or null for none"
            ) from None


# RandAugment sections timm reads: a number after m, n, p, mstd, mmax or inc; t + a transform set
_RAND_SECTION = re.compile(r"(mstd|mmax|inc|m|n|p)(\d+(\.\d*)?|\.\d+|inf)|t\w+")


def _check_rand_sections(policy: str) -> None:
    """timm skips a RandAugment section it cannot parse (``rand-foo`` trains as ``rand``);
    here every section must be one it reads."""
    if policy.startswith("rand-"):
        bad = [s for s in policy.split("-")[1:] if not _RAND_SECTION.fullmatch(s)]
        if bad:
            raise ValueError(f"unknown section(s) {bad}: m, n, p, mstd, mmax, inc take a number")


def resolve_recipe(cfg: FinetuneConfig, encoder: Encoder) -> Recipe:
    """Fill ``None`` fields from the paper's per-architecture table; validate ranges."""
    arch, epochs, decay, drop = ARCH_RECIPES.get(encoder.embed_dim, ARCH_RECIPES[384])
    if encoder.embed_dim not in ARCH_RECIPES:
        arch = f"{encoder.info.arch} (ViT-S recipe)"
    recipe = Recipe(
        arch=arch,
        epochs=epochs if cfg.epochs is None else cfg.epochs,
        layer_decay=decay if cfg.layer_decay is None else cfg.layer_decay,
        drop_path=drop if cfg.drop_path is None else cfg.drop_path,
    )
    check_layer_decay(recipe.layer_decay)
    if not 0.0 <= recipe.drop_path < 1.0:
        raise ConfigError(f"drop_path must be in [0, 1), got {recipe.drop_path}")
    if recipe.epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {recipe.epochs}")
    if cfg.pool not in ("cls", "mean"):
        raise ConfigError(f"pool must be 'cls' or 'mean', got {cfg.pool!r}")
    if cfg.report not in ("last", "best"):
        raise ConfigError(f"report must be 'last' or 'best', got {cfg.report!r}")
    scale = list(cfg.crop_scale)
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale}")
    if not 0.0 <= cfg.hflip <= 1.0:
        raise ConfigError(f"hflip must be a probability in [0, 1], got {cfg.hflip}")
    _check_numbers(cfg)
    return recipe


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
    """AdamW groups with ``lr_scale = layer_decay ** (L + 1 - layer_id)`` (BEiT / iBOT).

    Parameters under ``backbone_prefix`` get :func:`~ibot_bench.layer_decay.layer_plan`'s
    ids; all others (the new head, a kept projection layer) are at ``L + 1`` (scale 1); a
    backbone without known blocks (mode ``none``) is one group at scale 1. No weight decay on
    1-D parameters (biases, norms), on names ending in ``.bias``, nor on pos_embed /
    cls_token (and timm's ``no_weight_decay()`` names). Each group carries
    ``layer_id`` and ``param_names`` for inspection.
    """
    backbone = model.get_submodule(backbone_prefix.rstrip("."))
    plan = layer_plan(backbone)
    ids, depth = plan.ids, plan.depth
    if plan.mode == "none":
        layer_decay = 1.0  # no blocks to decay over: one lr for the whole backbone
    skip = NO_WEIGHT_DECAY | set(getattr(backbone, "no_weight_decay", set)())
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        sub = name[len(backbone_prefix) :] if name.startswith(backbone_prefix) else None
        layer = ids[sub] if sub is not None else depth + 1
        decay = not (param.ndim <= 1 or name.endswith(".bias") or (sub in skip))
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "param_names": [],
                "layer_id": layer,
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


class FinetuneModel(nn.Module):
    """backbone -> pooled feature -> optional projection layer -> linear classifier."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pool: str = "cls",
        proj: nn.Module | None = None,
        proj_dim: int | None = None,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.proj = proj if proj is not None else nn.Identity()
        self.head = nn.Linear(proj_dim or int(backbone.num_features), num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        if self.pool == "mean" and is_vit(self.backbone):
            pooled = tokens[:, self.backbone.num_prefix_tokens :].mean(dim=1)
        else:
            pooled = self.backbone.forward_head(tokens, pre_logits=True)
        return self.head(self.proj(pooled))


def protocol_name(base: str, cfg: FinetuneConfig) -> str:
    return (
        base
        + ("-avgpool" if cfg.pool == "mean" else "")
        + ("-best" if cfg.report == "best" else "")
    )


def prepare_backbone(ctx: TaskContext, encoder: Encoder, recipe: Recipe) -> dict:
    """Set drop-path on ``encoder.model``; returns what layer decay and drop-path will do.

    The returned record (``layer_decay_mode``, ``layer_decay``, ``layer_decay_layers``,
    ``drop_path``, ``drop_path_blocks``) goes into the task's ``extra``; rates that cannot
    apply to this model (no blocks known, no drop-path slots) are logged and recorded as
    what was actually used.
    """
    backbone = encoder.model
    plan = layer_plan(backbone)
    blocks = set_drop_path(backbone, recipe.drop_path)
    decay = recipe.layer_decay if plan.mode != "none" else 1.0
    if plan.mode == "none" and recipe.layer_decay != 1.0:
        ctx.log(
            f"finetune: {encoder.info.arch} has no blocks timm can group (no group_matcher): "
            f"layer_decay={recipe.layer_decay} not applied, one lr for the backbone"
        )
    if not blocks and recipe.drop_path > 0:
        ctx.log(
            f"finetune: {encoder.info.arch} has no residual blocks with a drop-path slot: "
            f"drop_path={recipe.drop_path} not applied"
        )
    return {
        "layer_decay_mode": plan.mode,
        "layer_decay": decay,
        "layer_decay_layers": plan.depth + 2,  # stem/blocks 0..L, head L + 1
        "drop_path": recipe.drop_path if blocks else 0.0,
        "drop_path_blocks": blocks,
    }


def finetune_eval(ctx: TaskContext, cfg: FinetuneConfig) -> tuple[dict[str, float], dict]:
    """Fine-tune ``ctx.encoder_spec`` on ``ctx.data_spec`` train, evaluate on val."""
    train = require_classification(ctx.split("train"), ctx.data_spec)
    val = ctx.split("val")
    encoder = ctx.encoder()
    recipe = resolve_recipe(cfg, encoder)
    applied = prepare_backbone(ctx, encoder, recipe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = FinetuneModel(
            encoder.model, len(train.class_names), cfg.pool, head_init_scale=cfg.head_init_scale
        )
    groups = param_groups(model, cfg.weight_decay, recipe.layer_decay)
    metrics, extra = fit(ctx, model, groups, train, val, cfg, recipe.epochs)
    extra["recipe"] = recipe.__dict__
    extra.update(applied)
    return metrics, extra


@register_task("finetune", FinetuneConfig, distributed=True)
def finetune(ctx: TaskContext, cfg: FinetuneConfig) -> TaskOutput:
    """Full fine-tuning with layer-wise lr decay (BEiT recipe, docs/protocols.md#full-fine-tuning)."""
    metrics, extra = finetune_eval(ctx, cfg)
    return TaskOutput(metrics=metrics, protocol=protocol_name("finetune", cfg), extra=extra)
