"""ADE20K semantic segmentation with mmsegmentation (docs/protocols.md#segmentation).

Task ``segmentation``, two heads:

- ``upernet``: the encoder fine-tuned under UperNet (pool scales 1/2/3/6, channels 512) with an
  auxiliary FCN head (weight 0.4) on the third pyramid level; blocks 3/5/7/11 through the
  paper's pyramid; AdamW wd 0.05 with layer-wise lr decay, linear warm-up, poly decay.
- ``linear``: the frozen encoder's final-norm'd outputs of blocks 3/5/7/11, concatenated at
  the patch stride (1/16), one 1x1 conv, bilinear upsampling; AdamW lr 8e-4.

Both: 160k iterations of batch 16, 512 crops of images resized to short side 512 x ratio
0.5-2.0, flip, photometric distortion; sliding-window inference 512 / stride 341 on images
resized to short side 512. ADE20K's label 0 ("other") is ignored (``reduce_zero_label``).
Metrics from mmseg's IoUMetric: mIoU, mAcc, aAcc in %. Protocol names ``upernet`` and
``linear-seg``; other iteration counts add ``-{N}it``. The paper sweeps lr (3e-5..8e-4) and
layer decay (0.65-0.9) per model; set ``lr`` / ``layer_decay`` to reproduce a given row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ibot_bench.config import check_ranges
from ibot_bench.data.ade20k import ADE20KDataset
from ibot_bench.dense.runner import dense_checks, resolve_runtime, run
from ibot_bench.dense.runtime import require_mm
from ibot_bench.downstream.segmentation.models import build_segmentation_config
from ibot_bench.errors import ConfigError, UserError
from ibot_bench.tasks import TaskContext, TaskOutput, register_task

HEADS = {"upernet": "upernet", "linear": "linear-seg"}
DEFAULT_LR = {"upernet": 1.0e-4, "linear": 8.0e-4}
METRICS = {"miou": "mIoU", "macc": "mAcc", "aacc": "aAcc"}


@dataclass
class SegmentationConfig:
    """Settings of ``segmentation``; None = the head's / architecture's default."""

    head: str = "upernet"  # upernet | linear
    iters: int = 160000
    batch_size: int = 16  # global images per step (all processes)
    crop_size: int = 512
    img_scale: list[int] = field(default_factory=lambda: [2048, 512])  # (long, short) resize
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    lr: float | None = None  # upernet 1e-4, linear 8e-4
    weight_decay: float = 0.05
    layer_decay: float | None = None  # ViT-S 0.75, ViT-B 0.65; in (0, 1]
    drop_path: float | None = None  # ViT-S 0.1, ViT-B 0.2 (upernet only)
    warmup_iters: int = 1500
    clip_grad: float | None = None
    eval_mode: str = "slide"  # slide | whole
    slide_stride: int = 341
    out_indices: list[int] | None = None  # None: 3/5/7/11 of 12, scaled to other depths
    norm: str = "auto"  # BN | SyncBN | auto
    precision: str = "auto"  # auto (fp16 AMP on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    device: str = "auto"
    num_workers: int = 2
    checkpoint_every: int = 2000  # iterations
    log_every: int = 50
    seed: int = 0


def validate(cfg: SegmentationConfig) -> None:
    if cfg.head not in HEADS:
        raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {cfg.head!r}")
    if cfg.eval_mode not in ("slide", "whole"):
        raise ConfigError(f"eval_mode must be slide or whole, got {cfg.eval_mode!r}")
    if cfg.iters < 1 or cfg.batch_size < 1 or cfg.crop_size < 1 or cfg.checkpoint_every < 1:
        raise ConfigError("iters, batch_size, crop_size and checkpoint_every must be >= 1")
    if cfg.eval_mode == "slide" and not 0 < cfg.slide_stride <= cfg.crop_size:
        raise ConfigError(f"slide_stride must be in 1..crop_size, got {cfg.slide_stride}")
    check_ranges(dense_checks(cfg) + [
        ("img_scale", cfg.img_scale, len(cfg.img_scale) == 2 and min(cfg.img_scale) >= 1, "[long, short] sides >= 1"),
        ("ratio_range", cfg.ratio_range, len(cfg.ratio_range) == 2 and 0 < cfg.ratio_range[0] <= cfg.ratio_range[1], "[low, high] with 0 < low <= high"),
    ])  # fmt: skip


def protocol_name(cfg: SegmentationConfig) -> str:
    base = HEADS[cfg.head]
    return base if cfg.iters == 160000 else f"{base}-{cfg.iters}it"


@register_task("segmentation", SegmentationConfig, distributed=True)
def segmentation(ctx: TaskContext, cfg: SegmentationConfig) -> TaskOutput:
    """ADE20K semantic segmentation (UperNet or linear head, mmseg)."""
    validate(cfg)
    ctx.encoder().require_plain_vit("segmentation")  # n/a for CNNs etc., before any mm* work
    require_mm("segmentation")
    train, val = ctx.split("train"), ctx.split("val")
    if not isinstance(train, ADE20KDataset) or not isinstance(val, ADE20KDataset):
        raise UserError(
            f"segmentation needs an ADE20K dataset: --data ade20k:ROOT (got {ctx.data_spec!r})"
        )
    if train.class_names != val.class_names:
        raise UserError(f"{train.root}: training and validation class lists differ")
    rt = resolve_runtime(
        ctx.encoder(),
        device=cfg.device,
        precision=cfg.precision,
        norm=cfg.norm,
        layer_decay=1.0 if cfg.head == "linear" else cfg.layer_decay,
        drop_path=0.0 if cfg.head == "linear" else cfg.drop_path,
    )
    lr = DEFAULT_LR[cfg.head] if cfg.lr is None else cfg.lr
    config = build_segmentation_config(cfg, rt, ctx.encoder_spec, train, val, lr, ctx.work_dir)
    raw = run(config)
    metrics = {name: raw[key] for name, key in METRICS.items() if key in raw}
    extra = {"lr": lr, "layer_decay": rt.layer_decay, "drop_path": rt.drop_path}
    return TaskOutput(metrics, protocol_name(cfg), extra)
