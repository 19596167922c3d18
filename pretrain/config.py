"""Typed schema of a pretraining run (``configs/pretrain/*.yaml`` + ``key=value`` overrides).

Defaults are the iBOT reference defaults (docs/protocols.md#pretraining); the README's
ViT-S/16 command lives in ``configs/pretrain/vit_small_in1k.yaml``. :func:`validate`
rejects inconsistent settings before anything is built or trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ibot_bench.config import check_ranges
from ibot_bench.encoders.vit import VIT_ARCHS, ViTConfig, parse_vit_arch
from ibot_bench.errors import ConfigError

_FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class ModelConfig:
    """Backbone (docs/protocols.md#backbone). ``arch`` is a ViT name, or ``custom`` with embed_dim/depth/num_heads."""

    arch: str = "vit_small"
    patch_size: int = 16
    embed_dim: int = 0  # custom only
    depth: int = 0  # custom only
    num_heads: int = 0  # custom only
    drop_path: float = 0.1  # student only; the teacher has none (docs/protocols.md#backbone)


@dataclass
class HeadConfig:
    """iBOT projection head (docs/protocols.md#projection-head)."""

    out_dim: int = 8192
    patch_out_dim: int = 8192
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    shared_head: bool = True
    shared_head_teacher: bool = True
    norm_last_layer: bool = True


@dataclass
class CropsConfig:
    """Multi-crop augmentation (docs/protocols.md#multi-crop). Size / probability lists hold one value or one per crop."""

    global_number: int = 2
    global_size: list[int] = field(default_factory=lambda: [224])
    global_scale: list[float] = field(default_factory=lambda: [0.14, 1.0])
    global_blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])
    global_solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])
    local_number: int = 0
    local_size: list[int] = field(default_factory=lambda: [96])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_blur_p: list[float] = field(default_factory=lambda: [0.5])
    local_solarize_p: list[float] = field(default_factory=lambda: [0.0])
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    grayscale_p: float = 0.2
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])


@dataclass
class MaskConfig:
    """Block-wise masking of the global crops (docs/protocols.md#block-masking)."""

    pred_ratio: list[float] = field(default_factory=lambda: [0.3])
    pred_ratio_var: list[float] = field(default_factory=lambda: [0.0])
    pred_shape: str = "block"  # block | rand
    pred_aspect_ratio: list[float] = field(default_factory=lambda: [0.3, 1 / 0.3])
    pred_start_epoch: int = 0


@dataclass
class LossConfig:
    """Loss, temperatures, centering (docs/protocols.md#loss)."""

    lambda1: float = 1.0
    lambda2: float = 1.0
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    center_momentum2: float = 0.9


@dataclass
class OptimConfig:
    """AdamW, schedules, EMA, clipping (docs/protocols.md#optimisation). ``lr`` is per 256 images of global batch."""

    epochs: int = 100
    batch_size: int = 1024  # global, over all ranks
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    clip_grad: float = 3.0
    freeze_last_layer: int = 1


@dataclass
class PretrainConfig:
    """One pretraining run."""

    data: str = "synthetic:shapes"
    output_dir: str = "results/pretrain"
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"
    num_workers: int = -1  # -1: auto (0 on small CPU machines)
    # torch intra-op threads: 0 torch's default (one per core), -1 timed at the start of a
    # single-process CPU run (ibot_bench.runtime.fastest_threads: 1 when other jobs hold the cores)
    threads: int = -1
    # multi-crop: auto | per-image | batched (whole uint8 batches, on the GPU if there is one);
    # auto = batched on CUDA or <= 4 CPUs per process (docs/protocols.md#multi-crop)
    augment: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    save_every_iters: int = 0  # checkpoint.pth every N iterations (0: only per epoch)
    saveckp_freq: int = 0  # snapshot checkpointNNNN.pth every K epochs (0: none)
    save_init: bool = True  # write checkpoint_init.pth (the random init) before training
    log_every: int = 1
    eval_clusters: bool = True  # per-epoch NMI/ARI/FMI, CLS entropies, clusters (collapse)
    monitor_knn: int = 1000  # training images of the per-epoch kNN monitor (0: off)
    plot: bool = True  # training.png, redrawn every epoch
    tensorboard: bool = False
    compile: bool = False
    progress: bool = True
    max_iters: int = 0  # stop (after a checkpoint) once this many iterations are done
    time_limit_min: float = 0.0  # safety only: stop (after a checkpoint, with a loud warning)


def vit_config(model: ModelConfig, img_size: int) -> ViTConfig:
    """The backbone shape; ``img_size`` (the first global crop size) sets the pos-embed grid."""
    if model.arch == "custom":
        if min(model.embed_dim, model.depth, model.num_heads) <= 0:
            raise ConfigError(
                "model.arch=custom needs model.embed_dim, model.depth and model.num_heads > 0"
            )
        if model.embed_dim % model.num_heads:
            raise ConfigError(
                f"model.embed_dim={model.embed_dim} is not divisible by "
                f"model.num_heads={model.num_heads}"
            )
        return ViTConfig(
            model.embed_dim, model.depth, model.num_heads, model.patch_size, img_size=img_size
        )
    if model.arch not in VIT_ARCHS:
        raise ConfigError(
            f"model.arch={model.arch!r} unknown; use one of {', '.join(VIT_ARCHS)} or custom"
        )
    base = parse_vit_arch(model.arch)
    return ViTConfig(base.embed_dim, base.depth, base.num_heads, model.patch_size, img_size)


def per_crop(values: list[Any], number: int, key: str) -> list[Any]:
    """Expand a one-value list to ``number`` crops; a list of the wrong length is an error."""
    values = list(values)
    if len(values) == number or (len(values) == 1 and number > 0):
        return values * number if len(values) == 1 else values
    if number == 0:
        return []
    raise ConfigError(
        f"crops.{key} has {len(values)} values for {number} crops: give one value for all "
        f"crops or exactly {number} (e.g. crops.{key}=[{', '.join(map(str, values[:1] * number))}])"
    )


def _check_pair(values: list[float], key: str) -> None:
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ConfigError(f"{key} must be [low, high] with 0 < low <= high, got {list(values)}")


def _check_ranges(cfg: PretrainConfig) -> None:
    """Numbers outside the range where they mean anything: each key, its range, the value."""
    c, o, m, lc, h = cfg.crops, cfg.optim, cfg.mask, cfg.loss, cfg.head
    unit = "in [0, 1]"
    checks = [
        ("model.patch_size", cfg.model.patch_size, cfg.model.patch_size >= 1, ">= 1"),
        ("model.drop_path", cfg.model.drop_path, 0 <= cfg.model.drop_path < 1, "in [0, 1)"),
        ("head.hidden_dim", h.hidden_dim, h.hidden_dim >= 1, ">= 1"),
        ("head.bottleneck_dim", h.bottleneck_dim, h.bottleneck_dim >= 1, ">= 1"),
        ("crops.local_number", c.local_number, c.local_number >= 0, ">= 0"),
        ("crops.flip_p", c.flip_p, 0 <= c.flip_p <= 1, unit),
        ("crops.color_jitter_p", c.color_jitter_p, 0 <= c.color_jitter_p <= 1, unit),
        ("crops.grayscale_p", c.grayscale_p, 0 <= c.grayscale_p <= 1, unit),
        ("optim.momentum_teacher", o.momentum_teacher, 0 <= o.momentum_teacher <= 1, unit),
        ("optim.momentum_teacher_end", o.momentum_teacher_end, 0 <= o.momentum_teacher_end <= 1, unit),
        ("optim.warmup_epochs", o.warmup_epochs, o.warmup_epochs >= 0, ">= 0"),
        ("optim.freeze_last_layer", o.freeze_last_layer, o.freeze_last_layer >= 0, ">= 0"),
        ("optim.clip_grad", o.clip_grad, o.clip_grad >= 0, ">= 0 (0: no clipping)"),
        ("loss.center_momentum", lc.center_momentum, 0 <= lc.center_momentum <= 1, unit),
        ("loss.center_momentum2", lc.center_momentum2, 0 <= lc.center_momentum2 <= 1, unit),
        ("loss.warmup_teacher_temp_epochs", lc.warmup_teacher_temp_epochs,
         lc.warmup_teacher_temp_epochs >= 0, ">= 0"),
        ("mask.pred_start_epoch", m.pred_start_epoch, m.pred_start_epoch >= 0, ">= 0"),
        ("num_workers", cfg.num_workers, cfg.num_workers >= -1, ">= 0 (or -1: automatic)"),
        ("threads", cfg.threads, cfg.threads >= -1, ">= 0 (0: torch's default) or -1 (automatic)"),
        ("save_every_iters", cfg.save_every_iters, cfg.save_every_iters >= 0, ">= 0 (0: per epoch)"),
        ("saveckp_freq", cfg.saveckp_freq, cfg.saveckp_freq >= 0, ">= 0 (0: no snapshots)"),
        ("max_iters", cfg.max_iters, cfg.max_iters >= 0, ">= 0 (0: no limit)"),
        ("monitor_knn", cfg.monitor_knn, cfg.monitor_knn >= 0, ">= 0 (0: no kNN monitor)"),
        ("crops.blur_sigma", c.blur_sigma, max(c.blur_sigma, default=0) <= 100,
         "<= 100 px (the paper's is [0.1, 2.0] at 224 px)"),
    ]  # fmt: skip
    for key in ("lambda1", "lambda2"):
        value = getattr(lc, key)
        checks.append((f"loss.{key}", value, math.isfinite(value) and value >= 0, ">= 0"))
    for key in ("student_temp", "warmup_teacher_temp", "teacher_temp",
                "warmup_teacher_patch_temp", "teacher_patch_temp"):  # fmt: skip
        value = getattr(lc, key)
        checks.append((f"loss.{key}", value, math.isfinite(value) and value > 0, "> 0"))
    for key in ("global_blur_p", "global_solarize_p", "local_blur_p", "local_solarize_p"):
        values = getattr(c, key)
        checks.append((f"crops.{key}", values, all(0 <= p <= 1 for p in values), f"all {unit}"))
    for key in ("global_scale", "local_scale"):
        values = getattr(c, key)
        checks.append((f"crops.{key}", values, max(values, default=0) <= 1, "<= 1 (image area)"))
    if len(c.color_jitter) != 4 or min(c.color_jitter, default=0) < 0:
        raise ConfigError(
            f"crops.color_jitter must be [brightness, contrast, saturation, hue] (4 values "
            f">= 0), got {list(c.color_jitter)}"
        )
    check_ranges(checks)


def validate(cfg: PretrainConfig, world_size: int = 1) -> None:
    """Every input error we can see before building anything (issue 3, "Bad input")."""
    c, o, m = cfg.crops, cfg.optim, cfg.mask
    _check_ranges(cfg)
    if c.global_number < 1:
        raise ConfigError("crops.global_number must be >= 1 (the teacher needs a global crop)")
    if c.global_number + c.local_number < 2:
        raise ConfigError(
            "iBOT needs at least 2 views (CLS pairs of different views): raise "
            "crops.global_number or crops.local_number"
        )
    sizes = per_crop(c.global_size, c.global_number, "global_size")
    sizes += per_crop(c.local_size, c.local_number, "local_size")
    for key, number in (
        ("global_blur_p", c.global_number),
        ("global_solarize_p", c.global_number),
        ("local_blur_p", c.local_number),
        ("local_solarize_p", c.local_number),
    ):
        per_crop(getattr(c, key), number, key)
    for key in ("global_scale", "local_scale", "blur_sigma"):
        _check_pair(getattr(c, key), f"crops.{key}")
    patch = cfg.model.patch_size
    for size in sizes:
        if size <= 0 or size % patch:
            raise ConfigError(
                f"crop size {size} is not divisible by model.patch_size={patch}; choose crop "
                f"sizes that are multiples of {patch}"
            )
    vit_config(cfg.model, sizes[0])
    if o.batch_size < 1:
        raise ConfigError(f"optim.batch_size must be >= 1 (the global batch), got {o.batch_size}")
    if o.batch_size % world_size:
        raise ConfigError(
            f"optim.batch_size={o.batch_size} (global) is not divisible by the world size "
            f"{world_size}; use a multiple of {world_size}"
        )
    if o.epochs <= 0:
        raise ConfigError("optim.epochs must be >= 1")
    for key in ("lr", "min_lr", "weight_decay", "weight_decay_end"):
        value = getattr(o, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"optim.{key}={value} must be a finite number >= 0")
    peak = o.lr * o.batch_size / 256
    if peak * max(1.0, o.weight_decay, o.weight_decay_end) >= _FLOAT32_MAX:
        raise ConfigError(
            f"optim.lr={o.lr} gives a peak learning rate of {peak:g} (lr x batch_size / 256), "
            "beyond float32's range; use a value like the default 5e-4"
        )
    if len(m.pred_ratio) != len(m.pred_ratio_var) or not m.pred_ratio:
        raise ConfigError(
            "mask.pred_ratio and mask.pred_ratio_var must be lists of the same length"
        )
    for r, v in zip(m.pred_ratio, m.pred_ratio_var):
        if not (0 <= v <= r and r + v < 1):
            raise ConfigError(
                f"mask ratio {r} +- {v} is invalid: need 0 <= var <= ratio and ratio + var < 1"
            )
    if m.pred_shape not in ("block", "rand"):
        raise ConfigError(f"mask.pred_shape={m.pred_shape!r}: use block or rand")
    _check_pair(m.pred_aspect_ratio, "mask.pred_aspect_ratio")
    if cfg.augment not in ("auto", "per-image", "batched"):
        raise ConfigError(f"augment={cfg.augment!r}: use auto, per-image or batched")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"precision={cfg.precision!r}: use auto, bf16, fp16 or fp32")
    if cfg.head.out_dim <= 0 or cfg.head.patch_out_dim <= 0:
        raise ConfigError("head.out_dim and head.patch_out_dim must be > 0")
    if cfg.head.shared_head and cfg.head.out_dim != cfg.head.patch_out_dim:
        raise ConfigError(
            "head.shared_head=true uses one last layer for CLS and patches, so head.out_dim "
            f"({cfg.head.out_dim}) must equal head.patch_out_dim ({cfg.head.patch_out_dim})"
        )


def crop_sizes(cfg: PretrainConfig) -> tuple[list[int], list[int]]:
    """(global sizes, local sizes), one per crop."""
    c = cfg.crops
    return (
        per_crop(c.global_size, c.global_number, "global_size"),
        per_crop(c.local_size, c.local_number, "local_size"),
    )
