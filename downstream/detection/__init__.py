"""COCO object detection and instance segmentation with mmdet (docs/protocols.md#detection).

Task ``detection``: the encoder becomes an mmdet backbone (:mod:`ibot_bench.dense.backbone`:
blocks 3/5/7/11 through the paper's pyramid), under Mask R-CNN with FPN or the paper's Cascade
Mask R-CNN (3 stages, 4conv1fc box heads, GIoU loss). Optimizer: AdamW lr 1e-4, wd 0.05,
layer-wise lr decay (ViT-S 0.75, ViT-B 0.65; the paper's 1x runs use 0.8 / 0.75), 500 warm-up
iterations, lr x0.1 at epochs 8 and 11 (1x = 12 epochs) or 27 and 33 (3x = 36 epochs);
drop-path 0.1 (S) / 0.2 (B). Training uses the Swin multi-scale recipe (short side 480-800,
long side <= 1333, random crop branch). Metrics from mmdet's COCO evaluation (pycocotools):
box AP / AP50 / AP75 and mask AP / AP50 / AP75, in %.

Protocol name: ``{model}-{schedule}`` (``cascade-mask-rcnn-1x``, ``mask-rcnn-3x``;
``-{N}ep`` for other lengths). Rerunning an interrupted run resumes from its last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ibot_bench.config import check_ranges
from ibot_bench.data.coco import CocoDataset
from ibot_bench.dense.runner import dense_checks, resolve_runtime, run
from ibot_bench.dense.runtime import require_mm
from ibot_bench.downstream.detection.models import (
    build_detection_config,
    check_categories,
    check_instances,
)
from ibot_bench.errors import ConfigError, UserError
from ibot_bench.tasks import TaskContext, TaskOutput, register_task

MODELS = ("mask-rcnn", "cascade-mask-rcnn")
METRICS = {
    "bbox_ap": "coco/bbox_mAP",
    "bbox_ap50": "coco/bbox_mAP_50",
    "bbox_ap75": "coco/bbox_mAP_75",
    "segm_ap": "coco/segm_mAP",
    "segm_ap50": "coco/segm_mAP_50",
    "segm_ap75": "coco/segm_mAP_75",
}


@dataclass
class DetectionConfig:
    """Settings of ``detection`` (docs/protocols.md#detection); None = per architecture."""

    model: str = "cascade-mask-rcnn"  # mask-rcnn | cascade-mask-rcnn
    epochs: int = 12  # 12 = 1x, 36 = 3x
    milestones: list[int] | None = None  # None: 1x 8/11, 3x 27/33, else 2/3 and 11/12
    batch_size: int = 16  # global images per step (all processes)
    lr: float = 1.0e-4
    weight_decay: float = 0.05
    layer_decay: float | None = None  # ViT-S 0.75, ViT-B 0.65; in (0, 1]
    drop_path: float | None = None  # ViT-S 0.1, ViT-B 0.2
    warmup_iters: int = 500
    clip_grad: float | None = None
    rois_per_image: int = 512  # RoIs sampled per image for the box/mask heads (mmdet's 512)
    proposals_per_image: int = 1000  # RPN proposals kept per image (train and test)
    detections_per_image: int = 100  # boxes (and masks) kept per test image (COCO's 100)
    train_images: int | None = None  # train on the first N images only (smoke runs); None: all
    classes: list[str] | None = None  # None: the annotation file's categories, in id order
    multiscale: bool = True  # Swin/iBOT multi-scale + crop training; false: one resize
    img_scale: list[int] = field(default_factory=lambda: [1333, 800])  # test (long, short)
    out_indices: list[int] | None = None  # None: 3/5/7/11 of 12, scaled to other depths
    frozen: bool = False
    norm: str = "auto"  # BN | SyncBN | auto (SyncBN when distributed on CUDA)
    precision: str = "auto"  # auto (fp16 AMP on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    device: str = "auto"
    num_workers: int = 2
    log_every: int = 50
    seed: int = 0


def schedule_name(epochs: int) -> str:
    return {12: "1x", 24: "2x", 36: "3x"}.get(epochs, f"{epochs}ep")


def milestones_for(cfg: DetectionConfig) -> list[int]:
    if cfg.milestones is not None:
        return list(cfg.milestones)
    return {12: [8, 11], 36: [27, 33]}.get(
        cfg.epochs, [round(cfg.epochs * 2 / 3), round(cfg.epochs * 11 / 12)]
    )


def validate(cfg: DetectionConfig) -> None:
    if cfg.model not in MODELS:
        raise ConfigError(f"model must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    counts = ("epochs", "batch_size", "rois_per_image", "proposals_per_image",
              "detections_per_image")  # fmt: skip
    if low := [f"{k}={getattr(cfg, k)}" for k in counts if getattr(cfg, k) < 1]:
        raise ConfigError(f"{', '.join(low)}: must be >= 1")
    if len(cfg.img_scale) != 2:
        raise ConfigError(f"img_scale is [long, short] side, got {cfg.img_scale}")
    check_ranges(dense_checks(cfg) + [
        ("img_scale", cfg.img_scale, min(cfg.img_scale) >= 1, "[long, short] sides >= 1"),
        ("milestones", cfg.milestones, all(1 <= m <= cfg.epochs for m in milestones_for(cfg)), f"epochs in 1..{cfg.epochs}"),
    ])  # fmt: skip
    if cfg.train_images is not None and cfg.train_images < cfg.batch_size:
        raise ConfigError(
            f"train_images={cfg.train_images} is fewer than one batch ({cfg.batch_size}); "
            "raise it or leave it unset (all images)"
        )


def coco_splits(ctx: TaskContext) -> tuple[CocoDataset, CocoDataset]:
    train, val = ctx.split("train"), ctx.split("val")
    if not isinstance(train, CocoDataset) or not isinstance(val, CocoDataset):
        raise UserError(f"detection needs a COCO dataset: --data coco:ROOT (got {ctx.data_spec!r})")
    return train, val


@register_task("detection", DetectionConfig, distributed=True)
def detection(ctx: TaskContext, cfg: DetectionConfig) -> TaskOutput:
    """COCO detection + instance segmentation (Mask / Cascade Mask R-CNN, mmdet)."""
    validate(cfg)
    ctx.encoder().require_plain_vit("detection")  # n/a for CNNs etc., before any mm* work
    require_mm("detection")
    train, val = coco_splits(ctx)
    classes = check_categories(train, val, cfg.classes)
    check_instances(train, val)
    rt = resolve_runtime(
        ctx.encoder(),
        device=cfg.device,
        precision=cfg.precision,
        norm=cfg.norm,
        layer_decay=cfg.layer_decay,
        drop_path=cfg.drop_path,
    )
    config = build_detection_config(
        cfg, rt, ctx.encoder_spec, train, val, classes, ctx.work_dir, milestones_for(cfg)
    )
    raw = run(config)
    metrics = {name: 100.0 * raw[key] for name, key in METRICS.items() if key in raw}
    protocol = f"{cfg.model}-{schedule_name(cfg.epochs)}"
    extra = {"layer_decay": rt.layer_decay, "drop_path": rt.drop_path, "classes": classes}
    return TaskOutput(metrics, protocol, extra)
