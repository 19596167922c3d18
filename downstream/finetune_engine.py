"""The training loop of the fine-tuning tasks: data, schedule, checkpoints, DDP, evaluation.

Registers no task; :mod:`ibot_bench.downstream.finetune` and :mod:`ibot_bench.downstream.semi_finetune` build
the model and its parameter groups and call :func:`fit`. Built from timm's pieces
(``create_transform`` with RandAugment and random erasing, ``Mixup``, the soft-target /
label-smoothing losses, ``create_optimizer_v2``, ``CosineLRScheduler`` stepped per
update, ``ModelEmaV3``).

Exact resume: the randomness of a run is a function of ``seed`` and the position in
the run, never of how the run got there. The epoch's image order comes from
``(seed, epoch)``; each image's augmentation from ``(seed, epoch, position)``, inside the
data-loader worker; drop-path and mixup from ``(seed, epoch, step, rank)``, reseeded
before every optimizer step. A checkpoint (model, optimizer, EMA, grad scaler, epoch,
step, history) is written atomically to ``ctx.work_dir`` at every epoch end and every
``checkpoint_every`` steps; an existing one is resumed, and a finished one returns its
results without training. So an interrupted run continues to bit-identical parameters
for the same world size, worker count and device (``tests/test_finetune.py``).

``batch_size`` is the global batch per optimizer step: each of the ``W`` ranks takes
``batch_size / W`` images per step in ``accum_steps`` micro-batches (DDP under torchrun,
gradients synchronised on the last micro-batch only).

:func:`fit` reads as its steps: :func:`build_run` checks the config and builds a
:class:`FitRun` (optimizer, schedule, grad scaler, EMA, criterion, data); :func:`resume`
loads an existing checkpoint; :func:`distribute` wraps the model in DDP; then each epoch
is :func:`train_one_epoch`, :func:`evaluate_epoch` when due, and :func:`save_checkpoint`.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from ibot_bench.data import ClassificationSplit
from ibot_bench.data.classification import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    normalize_batch,
    read_for_training,
)
from ibot_bench.distributed import (
    barrier,
    check_shared,
    init_distributed,
    is_main,
    shard_range,
    world,
)
from ibot_bench.errors import CheckpointError, ConfigError, UserError, first_line
from ibot_bench.interrupt import StopRequests, TrainingInterrupted, ignore_interrupts
from ibot_bench.io import atomic_write
from ibot_bench.precision import choose_precision, probe_step, scratch
from ibot_bench.runtime import autocast, check_precision, loader_workers, resolve_device
from ibot_bench.tasks import TaskContext

CHECKPOINT = "checkpoint.pth"


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integer parts (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_cpu(seed: int) -> Iterator[None]:
    """Seed the CPU generators for one image's augmentation, restoring them afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class TrainImages(torch.utils.data.Dataset):
    """``(row, sample_seed)`` -> (augmented normalised float image, label)."""

    def __init__(self, data: ClassificationSplit, transform) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        row, seed = item
        image = read_for_training(self.data, row, "fine-tuning")
        with seeded_cpu(seed):
            img = self.transform(TF.to_pil_image(image))
        return img, int(self.data.labels[row])


class EvalImages(torch.utils.data.Dataset):
    """Rows of a split -> (uint8 resized + centre-cropped image, label)."""

    def __init__(self, data: ClassificationSplit, rows: range, transform: EvalTransform) -> None:
        self.data, self.rows, self.transform = data, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.rows[i]
        return self.transform(read_for_training(self.data, row, "fine-tuning")), int(
            self.data.labels[row]
        )


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, batch_size) global batches of row indices; the incomplete batch is dropped."""
    perm = np.random.default_rng(derive_seed(seed, epoch, 0xB47C)).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


class MicroBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of ``[(row, sample_seed), ...]``, from step ``start`` on."""

    def __init__(
        self, order: np.ndarray, start: int, seed: int, epoch: int, world_size: int, accum: int
    ) -> None:
        self.order, self.start, self.seed, self.epoch = order, start, seed, epoch
        self.rank = world()[0]
        self.per_rank = order.shape[1] // world_size
        self.micro = self.per_rank // accum

    def __len__(self) -> int:
        return (len(self.order) - self.start) * (self.per_rank // self.micro)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        width = self.order.shape[1]
        for step in range(self.start, len(self.order)):
            lo = self.rank * self.per_rank
            for m in range(lo, lo + self.per_rank, self.micro):
                yield [
                    (int(self.order[step, p]), derive_seed(self.seed, self.epoch, step * width + p))
                    for p in range(m, m + self.micro)
                ]


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op; 0 bits gives a black image, as Pillow did before it began raising.

    RandAugment's "PosterizeIncreasing" keeps ``4 - int(4 * m / 10)`` bits, i.e. 0 at the
    magnitude cap 10 that ``mstd0.5`` reaches; Pillow 13 refuses 0 bits (ValueError).
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, bits_to_keep)


def train_transform(cfg, img_size: int):
    """timm's ImageNet training transform: RandomResizedCrop, flip, RandAugment, erasing."""
    tf = create_transform(
        img_size,
        is_training=True,
        scale=tuple(cfg.crop_scale),
        hflip=cfg.hflip,
        auto_augment=cfg.auto_augment or None,
        interpolation=cfg.train_interpolation,
        re_prob=cfg.reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    for t in tf.transforms:
        for op in getattr(t, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return tf


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "cannot allocate" in text
    )


def largest_fitting_batch(
    model: nn.Module, micro: int, img_size: int, device: torch.device, precision: str
) -> int:
    """Halve the micro-batch until a forward + backward fits; 0 if even 1 image does not."""
    b = micro // 2
    while b >= 1:
        try:
            x = torch.randn(b, 3, img_size, img_size, device=device)
            with autocast(device, precision):
                loss = model(x).float().logsumexp(-1).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return b
        except Exception as exc:
            if not is_oom(exc):
                raise
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            b //= 2
    return 0


def oom_error(cfg, micro: int, fit: int, world_size: int, device: torch.device) -> UserError:
    """The advice when a micro-batch of ``micro`` images ran out of memory."""
    head = (
        f"batch_size={cfg.batch_size} ran out of memory on {device} ({micro} images per "
        f"micro-batch: {world_size} process(es), accum_steps={cfg.accum_steps})."
    )
    if fit == 0:
        return UserError(f"{head} Even one image does not fit: use a smaller img_size or model.")
    per_rank = cfg.batch_size // world_size
    accum = next(
        a
        for a in range(cfg.accum_steps, per_rank + 1)
        if per_rank % a == 0 and per_rank // a <= fit
    )
    return UserError(
        f"{head} The largest micro-batch that fit was {fit} images: keep the recipe with "
        f"gradient accumulation, accum_steps={accum} ({per_rank // accum} images per "
        f"micro-batch), or set batch_size={fit * world_size * cfg.accum_steps} "
        "(changes the recipe)."
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val: ClassificationSplit,
    transform: EvalTransform,
    device: torch.device,
    precision: str,
    batch_size: int,
    workers: int,
) -> dict[str, float]:
    """Top-1 / top-5 (%) on ``val``, each rank on a contiguous shard, counts summed."""
    was_training = model.training
    model.eval()
    rank, world_size = world()
    rows = shard_range(len(val), rank, world_size)
    loader = torch.utils.data.DataLoader(
        EvalImages(val, rows, transform),
        batch_size=batch_size,
        num_workers=workers,
        worker_init_fn=ignore_interrupts if workers > 0 else None,
    )
    k = min(5, len(val.class_names))
    counts = torch.zeros(3, dtype=torch.float64)
    for x, y in loader:
        with autocast(device, precision):
            logits = model(normalize_batch(x.to(device)))
        top = logits.float().topk(k, dim=-1).indices.cpu()
        hit = top == y[:, None]
        counts += torch.tensor([hit[:, 0].sum().item(), hit.any(-1).sum().item(), len(y)])
    if world_size > 1:
        on = device if dist.get_backend() == "nccl" else torch.device("cpu")
        counts = counts.to(on)
        dist.all_reduce(counts)
        counts = counts.cpu()
    model.train(was_training)
    out = {"top1": 100.0 * counts[0].item() / counts[2].item()}
    if k == 5:
        out["top5"] = 100.0 * counts[1].item() / counts[2].item()
    return out


def make_criterion(cfg, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's Mixup/CutMix (with label smoothing) + soft-target CE; else smoothed or plain CE."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def check_batch(cfg, world_size: int, n_train: int) -> int:
    """The micro-batch size; ConfigError when the global batch does not split evenly."""
    if cfg.batch_size < 1 or cfg.accum_steps < 1:
        raise ConfigError("batch_size and accum_steps must be >= 1")
    per_step = world_size * cfg.accum_steps
    if cfg.batch_size % per_step:
        raise ConfigError(
            f"batch_size={cfg.batch_size} must be divisible by processes x accum_steps = "
            f"{world_size} x {cfg.accum_steps}; "
            f"e.g. batch_size={per_step * max(1, cfg.batch_size // per_step)}"
        )
    if n_train < cfg.batch_size:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the training set ({n_train} images); "
            f"use batch_size<={n_train}"
        )
    micro = cfg.batch_size // per_step
    if (cfg.mixup > 0 or cfg.cutmix > 0) and micro % 2:
        raise ConfigError(
            f"mixup/cutmix need an even micro-batch, got {micro} images (batch_size / "
            "processes / accum_steps); change batch_size or set mixup=0 cutmix=0"
        )
    return micro


def _summarise(history: list[dict], report: str, ema: bool) -> dict[str, float]:
    evals = [h for h in history if "top1" in h]
    if not evals:
        return {}
    last, best = evals[-1], max(evals, key=lambda h: h["top1"])
    chosen = best if report == "best" else last
    metrics = {k: chosen[k] for k in ("top1", "top5") if k in chosen}
    for name, row in (("last", last), ("best", best)):
        metrics.update({f"{name}_{k}": row[k] for k in ("top1", "top5") if k in row})
    metrics["best_epoch"] = float(best["epoch"])
    if ema:
        ema_best = max(evals, key=lambda h: h["ema_top1"])
        for name, row in (("last", last), ("best", ema_best)):
            metrics.update(
                {f"ema_{name}_{k}": row[f"ema_{k}"] for k in ("top1", "top5") if f"ema_{k}" in row}
            )
    return metrics


@dataclass
class FitRun:
    """What :func:`build_run` makes once per run and the steps of :func:`fit` share.

    ``net`` is ``model`` itself, or its DDP wrapper under torchrun (:func:`distribute`);
    ``state`` (epoch, step, global_step, history) is the part a checkpoint resumes.
    """

    cfg: Any
    model: nn.Module
    net: nn.Module
    device: torch.device
    precision: str
    rank: int
    world_size: int
    micro: int
    img_size: int
    steps_per_epoch: int
    peak_lr: float
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    criterion: nn.Module
    workers: int
    train_ds: TrainImages
    eval_tf: EvalTransform
    path: Path
    meta: dict
    state: dict
    log: Callable[[str], None]
    stop: StopRequests = field(default_factory=lambda: StopRequests("finetune"))


def train_precision(
    model: nn.Module,
    device: torch.device,
    requested: str,
    micro: int,
    img_size: int,
    log: Callable[[str], None],
) -> str:
    """``requested``; for ``auto`` the fastest precision for a training step (forward,
    backward) of ``model`` at this input, timed once per machine and model shape. fp16 is
    a candidate on GPUs: the run's GradScaler covers it."""
    key = {
        "work": "finetune",
        "model": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "img_size": img_size,
        "batch": micro,
    }

    @functools.cache
    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, img_size, img_size, device=device)

    def run(n: int) -> None:
        with scratch(model):
            out = model(images(n))
            (out[0] if isinstance(out, tuple) else out).float().mean().backward()

    step = probe_step(device, micro, run)
    return choose_precision(device, requested, key, step, log=log)


def build_run(
    ctx: TaskContext,
    model: nn.Module,
    groups: Sequence[dict],
    train: ClassificationSplit,
    cfg,
    epochs: int,
) -> FitRun:
    """Check the config against the data and the machine, then build everything a run needs.

    The checks run before anything is built, so a bad batch, warmup or image size fails in
    seconds with a :class:`~ibot_bench.errors.ConfigError` naming the fix.
    """
    init_distributed()
    rank, world_size = world()
    device = resolve_device(cfg.device)
    check_precision(device, cfg.precision)
    micro = check_batch(cfg, world_size, len(train))
    steps_per_epoch = len(train) // cfg.batch_size
    total_steps = epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if not 0 <= cfg.warmup_epochs < epochs:
        raise ConfigError(
            f"warmup_epochs={cfg.warmup_epochs} must be in [0, epochs={epochs}); e.g. "
            f"warmup_epochs={max(0, min(cfg.warmup_epochs, epochs // 10))}"
        )
    img_size = cfg.img_size or train.default_img_size
    patch = getattr(getattr(model, "backbone", None), "patch_embed", None)
    if patch is not None:
        p = patch.patch_size[0] if isinstance(patch.patch_size, (tuple, list)) else patch.patch_size
        if img_size % p:
            raise ConfigError(f"img_size={img_size} must be a multiple of the patch size {p}")
    peak_lr = cfg.lr * cfg.batch_size / cfg.lr_batch_ref if cfg.lr_batch_ref > 0 else cfg.lr

    model.to(device)
    precision = train_precision(model, device, cfg.precision, micro, img_size, ctx.log)
    optimizer = create_optimizer_v2(list(groups), opt="adamw", lr=peak_lr, weight_decay=0.0)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    mixup, criterion = make_criterion(cfg, len(train.class_names))
    return FitRun(
        cfg=cfg,
        model=model,
        net=model,
        device=device,
        precision=precision,
        rank=rank,
        world_size=world_size,
        micro=micro,
        img_size=img_size,
        steps_per_epoch=steps_per_epoch,
        peak_lr=peak_lr,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        ema=ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None,
        mixup=mixup,
        criterion=criterion,
        workers=loader_workers(cfg.num_workers, device, world_size),
        train_ds=TrainImages(train, train_transform(cfg, img_size)),
        eval_tf=EvalTransform(img_size, int(img_size / cfg.crop_pct), cfg.eval_interpolation),
        path=Path(ctx.work_dir) / CHECKPOINT,
        meta={"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "epochs": epochs},
        state={"epoch": 0, "step": 0, "global_step": 0, "history": [], "world_sizes": [world_size]},
        log=ctx.log if is_main() else (lambda _msg: None),
    )


def resume(run: FitRun) -> int | None:
    """Continue from the checkpoint in the work folder, if there is one.

    Returns the global step it resumes at (None for a fresh run). A finished run resumes
    past its last epoch, so :func:`fit` returns its results without training.
    """
    if check_shared(run.path) and not run.path.is_file():
        raise CheckpointError(
            f"{run.path} is not a file (a folder?); it is where this run's checkpoint goes: "
            "remove it to start over (nothing was trained)"
        )
    if not run.path.is_file():
        return None
    run.state = load_checkpoint(run.path, run.model, run.optimizer, run.ema, run.scaler, run.meta)
    run.log(f"finetune: resuming {run.path} at epoch {run.state['epoch']} step {run.state['step']}")
    sizes = run.state.setdefault("world_sizes", [])  # absent in checkpoints of older versions
    if sizes and sizes[-1] != run.world_size:
        run.log(
            f"finetune: the checkpoint was trained by {sizes[-1]} process(es), this run has "
            f"{run.world_size}: the same global batch and schedule, but from here on the images "
            "of each rank and the drop-path / mixup draws differ from a run never stopped "
            "(recorded as world_sizes)"
        )
    if not sizes or sizes[-1] != run.world_size:
        sizes.append(run.world_size)
    return run.state["global_step"]


def distribute(run: FitRun) -> None:
    """Wrap the model in DDP under torchrun; after :func:`resume`, which loads the bare model."""
    if run.world_size > 1:
        ids = [run.device.index] if run.device.type == "cuda" else None
        run.net = nn.parallel.DistributedDataParallel(run.model, device_ids=ids)


def save_checkpoint(run: FitRun, epoch: int, step: int) -> None:
    """Write the checkpoint to resume at (``epoch``, ``step``); rank 0 writes, all ranks wait.

    The write is atomic (temp file + rename), so a run killed mid-write keeps the previous one.
    """
    if is_main():
        obj = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "ema": run.ema.module.state_dict() if run.ema is not None else None,
            "scaler": run.scaler.state_dict(),
            "state": {**run.state, "epoch": epoch, "step": step},
            "meta": run.meta,
        }
        atomic_write(run.path, lambda p: torch.save(obj, p))
    barrier()


def _micro_batch(
    run: FitRun,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    last: bool,
    epoch: int,
    step: int,
) -> tuple[float, int]:
    """Forward + backward of the next micro-batch; returns (its loss, its image count).

    DDP synchronises gradients on the ``last`` micro-batch of a step only. Running out of
    memory raises :func:`oom_error`'s advice; a non-finite loss stops the run.
    """
    cfg, device = run.cfg, run.device
    x, y = next(batches)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    target = y
    if run.mixup is not None:
        x, target = run.mixup(x, y)
    sync = last or run.world_size == 1
    out_of_memory = False
    try:
        with contextlib.nullcontext() if sync else run.net.no_sync():
            with autocast(device, run.precision):
                loss = run.criterion(run.net(x), target) / cfg.accum_steps
            run.scaler.scale(loss).backward()
    except Exception as exc:
        if not is_oom(exc):
            raise
        out_of_memory = True  # probe outside the handler: its traceback holds memory
    if out_of_memory:
        x = target = loss = None  # free this micro-batch's memory for the probe
        run.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        fit_b = largest_fitting_batch(run.model, run.micro, run.img_size, device, run.precision)
        raise oom_error(cfg, run.micro, fit_b, run.world_size, device)
    if not torch.isfinite(loss):
        raise UserError(
            f"fine-tuning loss is {loss.item()} at epoch {epoch} step {step}; "
            "lower lr, set clip_grad, or use precision=fp32"
        )
    return loss.item(), len(y)


def _optimizer_step(run: FitRun) -> None:
    """Clip (if set), step the optimizer through the grad scaler, count the step, update EMA."""
    if run.cfg.clip_grad:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.state["global_step"] += 1
    if run.ema is not None:
        run.ema.update(run.model, step=run.state["global_step"])


def train_one_epoch(run: FitRun, epoch: int) -> dict[str, float]:
    """Train ``epoch`` from the resumed step on; returns its history row (loss, lr, speed).

    Each step first reseeds the global generators from (seed, epoch, step, rank), so
    drop-path and mixup draw the same numbers whether or not the run was interrupted.
    Checkpoints every ``checkpoint_every`` steps inside the epoch.
    """
    cfg, start = run.cfg, run.state["step"]
    run.model.train()
    order = epoch_order(len(run.train_ds), cfg.batch_size, cfg.seed, epoch)
    sampler = MicroBatches(order, start, cfg.seed, epoch, run.world_size, cfg.accum_steps)
    loader = torch.utils.data.DataLoader(
        run.train_ds,
        batch_sampler=sampler,
        num_workers=run.workers,
        pin_memory=run.device.type == "cuda",
        worker_init_fn=ignore_interrupts if run.workers > 0 else None,
    )
    batches = iter(loader)
    started, seen, loss_sum = time.perf_counter(), 0, 0.0
    for step in range(start, run.steps_per_epoch):
        run.scheduler.step_update(run.state["global_step"])
        seed_all(derive_seed(cfg.seed, epoch, step, run.rank, 0x57E9))
        for a in range(cfg.accum_steps):
            loss, n = _micro_batch(run, batches, a == cfg.accum_steps - 1, epoch, step)
            loss_sum += loss
            seen += n
        _optimizer_step(run)
        due = cfg.checkpoint_every and run.state["global_step"] % cfg.checkpoint_every == 0
        stop = run.stop.requested()
        if (due or stop) and step + 1 < run.steps_per_epoch:
            save_checkpoint(run, epoch, step + 1)
            if stop:
                raise _interrupted(run, epoch, step + 1)
    elapsed = time.perf_counter() - started
    run.state["step"] = 0
    return {
        "epoch": epoch + 1,
        "loss": loss_sum / max(1, run.steps_per_epoch - start),
        "lr": run.optimizer.param_groups[-1]["lr"],
        "train_images_per_s": seen * run.world_size / max(elapsed, 1e-9),
    }


def evaluate_epoch(run: FitRun, val: ClassificationSplit) -> dict[str, float]:
    """Top-1 / top-5 of the model and, with EMA, of its average (``ema_``-prefixed)."""
    args = (val, run.eval_tf, run.device, run.precision, run.cfg.eval_batch_size, run.workers)
    out = evaluate(run.model, *args)
    if run.ema is not None:
        out.update({f"ema_{k}": v for k, v in evaluate(run.ema.module, *args).items()})
    return out


def fit(
    ctx: TaskContext,
    model: nn.Module,
    groups: Sequence[dict],
    train: ClassificationSplit,
    val: ClassificationSplit,
    cfg,
    epochs: int,
) -> tuple[dict[str, float], dict]:
    """Train ``model`` (param ``groups`` with ``lr_scale``) for ``epochs``; return metrics, extra.

    ``cfg`` is a :class:`~ibot_bench.downstream.finetune.FinetuneConfig` (or a subclass). Of ``ctx``
    only ``work_dir`` (the checkpoint's folder) and ``log`` are used.
    """
    run = build_run(ctx, model, groups, train, cfg, epochs)
    resumed_at = resume(run)
    distribute(run)
    run.log(
        f"finetune: {len(train)} train / {len(val)} val images, {run.img_size}px, {epochs} "
        f"epochs x {run.steps_per_epoch} steps, batch {cfg.batch_size} ({run.world_size} x "
        f"{cfg.accum_steps} x {run.micro}), peak lr {run.peak_lr:.3g}, {run.device}, "
        f"{run.precision}, {run.workers} loader workers"
    )
    with run.stop:  # Ctrl-C / SIGTERM: finish the step, save, stop (ibot_bench.interrupt)
        for epoch in range(run.state["epoch"], epochs):
            row = train_one_epoch(run, epoch)
            if (epoch + 1) % max(1, cfg.eval_every) == 0 or epoch + 1 == epochs:
                row.update(evaluate_epoch(run, val))
            run.state["history"].append(row)
            msg = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
            run.log(f"finetune: epoch {epoch + 1}/{epochs} {msg}")
            save_checkpoint(run, epoch + 1, 0)
            if epoch + 1 < epochs and run.stop.requested():
                raise _interrupted(run, epoch + 1, 0)
    metrics = _summarise(run.state["history"], cfg.report, run.ema is not None)
    return metrics, _extra(run, groups, train, val, resumed_at)


def _interrupted(run: FitRun, epoch: int, step: int) -> TrainingInterrupted:
    return TrainingInterrupted(
        f"fine-tuning stopped by {run.stop.signal_name or 'a signal to another rank'}; "
        f"checkpoint saved at epoch {epoch}, "
        f"step {step} in {run.path}: rerun the same command to resume"
    )


def _extra(
    run: FitRun,
    groups: Sequence[dict],
    train: ClassificationSplit,
    val: ClassificationSplit,
    resumed_at: int | None,
) -> dict:
    """The run's details for the result record: history, schedule, batch split, machine."""
    return {
        "history": run.state["history"],
        "leaderboard_epoch": run.cfg.report,
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.meta["total_steps"],
        "peak_lr": run.peak_lr,
        "micro_batch": run.micro,
        "world_size": run.world_size,
        "world_sizes": run.state.get("world_sizes", [run.world_size]),
        "img_size": run.img_size,
        "device": str(run.device),
        "precision": run.precision,
        "train_size": len(train),
        "val_size": len(val),
        "resumed_at_step": resumed_at,
        "checkpoint": str(run.path),
        "param_groups": [
            {k: g[k] for k in ("layer_id", "lr_scale", "weight_decay")} | {"n": len(g["params"])}
            for g in groups
        ],
    }


def load_checkpoint(path: Path, model, optimizer, ema, scaler, meta: dict) -> dict:
    """Restore a fine-tuning checkpoint in place; returns its run state."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read the fine-tuning checkpoint {path}: {exc}. Delete it to start over."
        ) from exc
    needed = ("model", "optimizer", "scaler", "state", "meta")
    missing = [k for k in needed if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(
            f"the fine-tuning checkpoint {path} lacks {missing}: it was not written by this "
            "task (or is damaged); delete it (or its folder) to start over"
        )
    if obj.get("meta") != meta:
        raise CheckpointError(
            f"the fine-tuning checkpoint {path} is from another schedule ({obj.get('meta')} vs "
            f"{meta}); delete it (or its folder) to start over."
        )
    if ema is not None and obj.get("ema") is None:
        raise CheckpointError(f"{path} has no EMA weights but ema=true; delete it to start over")
    try:
        model.load_state_dict(obj["model"])
        optimizer.load_state_dict(obj["optimizer"])
        scaler.load_state_dict(obj["scaler"])
        if ema is not None:
            ema.module.load_state_dict(obj["ema"])
        state = dict(obj["state"])
        state["epoch"], state["step"], state["global_step"] = (
            int(state[k]) for k in ("epoch", "step", "global_step")
        )
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"the fine-tuning checkpoint {path} does not fit this run ({first_line(exc)}); delete it (or "
            "its folder) to start over"
        ) from None
    return state
