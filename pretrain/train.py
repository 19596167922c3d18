"""The iBOT training loop (docs/protocols.md#pretraining): single process or DDP under torchrun.

One step: normalise the uint8 crops, teacher on the unmasked global crops, student on the
masked global crops and the local crops (one call), loss + center update, backward,
per-tensor clipping, last-layer freezing, AdamW step, EMA teacher update. Checkpoints are
written atomically every ``save_every_iters`` iterations and every epoch; a run resumes
exactly (model, optimizer, scaler, centers, RNG, data position) from ``checkpoint.pth``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ibot_bench.config import save_config, to_dict
from ibot_bench.data import load_split, require_classification
from ibot_bench.data.classification import normalize_batch
from ibot_bench.distributed import barrier, init_distributed, is_main, world
from ibot_bench.errors import DatasetError, UserError
from ibot_bench.pretrain import checkpoint as ckpt
from ibot_bench.pretrain.augment import MaskedMultiCrop, MultiCropAugmentation
from ibot_bench.pretrain.config import PretrainConfig, crop_sizes, validate, vit_config
from ibot_bench.pretrain.loss import IbotLoss
from ibot_bench.pretrain.masking import MaskGenerator
from ibot_bench.pretrain.model import IbotStudent, IbotTeacher, build_networks, common_parameters
from ibot_bench.pretrain.monitor import ClusterMonitor, JsonlLog
from ibot_bench.pretrain.optim import (
    build_optimizer,
    cancel_last_layer_grads,
    clip_gradients_per_tensor,
    ema_update,
)
from ibot_bench.pretrain.schedules import cosine_schedule, teacher_temp_schedule
from ibot_bench.runtime import (
    autocast,
    loader_workers,
    resolve_device,
    resolve_precision,
    set_threads,
)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint was left untouched."""


class EpochSampler(Sampler[int]):
    """DistributedSampler's order (randperm seeded by seed + epoch, padded, every
    world-th index from rank) cut to whole batches, able to start mid-epoch on resume."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches = math.ceil(n / world_size) // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = math.ceil(self.n / self.world_size) * self.world_size
        order += order[: total - self.n]
        mine = order[self.rank : total : self.world_size]
        return iter(mine[self.start_batch * self.batch_size : self.batches * self.batch_size])

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size


def signature(cfg: PretrainConfig) -> dict[str, Any]:
    """What must match to resume into an output folder."""
    vit = vit_config(cfg.model, crop_sizes(cfg)[0][0])
    h = cfg.head
    return {
        "embed_dim": vit.embed_dim,
        "depth": vit.depth,
        "num_heads": vit.num_heads,
        "patch_size": vit.patch_size,
        "img_size": vit.img_size,
        "out_dim": h.out_dim,
        "patch_out_dim": h.patch_out_dim,
        "hidden_dim": h.hidden_dim,
        "bottleneck_dim": h.bottleneck_dim,
        "shared_head": h.shared_head,
        "shared_head_teacher": h.shared_head_teacher,
        "norm_last_layer": h.norm_last_layer,
    }


def checkpoint_args(cfg: PretrainConfig) -> dict[str, Any]:
    """Flat, reference-named ``args`` (what eval scripts and our loader read) + the config."""
    vit = vit_config(cfg.model, crop_sizes(cfg)[0][0])
    arch = cfg.model.arch
    return {
        "arch": arch,
        "patch_size": vit.patch_size,
        "embed_dim": vit.embed_dim,
        "depth": vit.depth,
        "num_heads": vit.num_heads,
        "out_dim": cfg.head.out_dim,
        "patch_out_dim": cfg.head.patch_out_dim,
        "shared_head": cfg.head.shared_head,
        "norm_last_layer": cfg.head.norm_last_layer,
        "epochs": cfg.optim.epochs,
        "batch_size": cfg.optim.batch_size,
        "config": to_dict(cfg),
    }


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    epoch_iter: int = 0  # batches done in the current epoch


class Trainer:
    """Holds everything of one run; :meth:`fit` trains until ``optim.epochs`` (or a stop)."""

    def __init__(self, cfg: PretrainConfig, resume: str | None = None) -> None:
        init_distributed()
        self.rank, self.world_size = world()
        validate(cfg, self.world_size)
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.precision = resolve_precision(self.device, cfg.precision)
        set_threads(cfg.threads)

        self.data = require_classification(load_split(cfg.data, "train"), cfg.data)
        self.batch = cfg.optim.batch_size // self.world_size
        self.sampler = EpochSampler(
            len(self.data), self.batch, cfg.seed, self.rank, self.world_size
        )
        self.iters_per_epoch = self.sampler.batches
        if self.iters_per_epoch == 0:
            raise DatasetError(
                f"{cfg.data} has {len(self.data)} training images, fewer than one batch "
                f"({self.batch} per rank x {self.world_size} ranks): lower optim.batch_size"
            )
        g_sizes, _ = crop_sizes(cfg)
        self.vit = vit_config(cfg.model, g_sizes[0])

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        h = cfg.head
        student, teacher = build_networks(
            self.vit,
            drop_path=cfg.model.drop_path,
            out_dim=h.out_dim,
            patch_out_dim=h.patch_out_dim,
            hidden_dim=h.hidden_dim,
            bottleneck_dim=h.bottleneck_dim,
            shared_head=h.shared_head,
            shared_head_teacher=h.shared_head_teacher,
            norm_last_layer=h.norm_last_layer,
        )
        self.student: IbotStudent = student.to(self.device)
        self.teacher: IbotTeacher = teacher.to(self.device).eval()
        if cfg.compile:
            self.student.backbone.compile()
            self.teacher.backbone.compile()
        self.model: torch.nn.Module = self.student
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.student, device_ids=ids)
        self.ema_student, self.ema_teacher = common_parameters(self.student, self.teacher)
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.student)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        lc = cfg.loss
        self.loss = IbotLoss(
            h.out_dim,
            h.patch_out_dim,
            lc.student_temp,
            lc.center_momentum,
            lc.center_momentum2,
            lc.lambda1,
            lc.lambda2,
        ).to(self.device)

        o, n = cfg.optim, self.iters_per_epoch
        self.lr = cosine_schedule(o.lr * o.batch_size / 256, o.min_lr, o.epochs, n, o.warmup_epochs)
        self.wd = cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, n)
        self.momentum = cosine_schedule(o.momentum_teacher, o.momentum_teacher_end, o.epochs, n)
        self.teacher_temp = teacher_temp_schedule(
            lc.warmup_teacher_temp, lc.teacher_temp, lc.warmup_teacher_temp_epochs, o.epochs
        )
        self.teacher_patch_temp = teacher_temp_schedule(
            lc.warmup_teacher_patch_temp,
            lc.teacher_patch_temp,
            lc.warmup_teacher_temp_epochs,
            o.epochs,
            start_epoch=cfg.mask.pred_start_epoch,
        )

        self.state = _State()
        self.resumed_from = self._maybe_resume(resume)
        if self.resumed_from is None:  # per-rank stream for drop-path (restored on resume)
            torch.manual_seed(cfg.seed + 1000 * self.rank + 1)

        m = cfg.mask
        self.dataset = MaskedMultiCrop(
            self.data,
            MultiCropAugmentation(cfg.crops),
            MaskGenerator(
                m.pred_ratio,
                m.pred_ratio_var,
                m.pred_shape,
                m.pred_aspect_ratio,
                m.pred_start_epoch,
            ),  # fmt: skip
            self.vit.patch_size,
            seed=cfg.seed,
        )
        workers = loader_workers(cfg.num_workers, self.device, self.world_size)
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.batch,
            sampler=self.sampler,
            drop_last=True,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # never touch the global RNG (exact resume)
        )
        self.n_global = cfg.crops.global_number

    # ------------------------------------------------------------------ checkpoints
    def _maybe_resume(self, resume: str | None) -> Path | None:
        path = Path(resume) if resume else self.out / ckpt.CHECKPOINT
        if not path.is_file():
            if resume:
                ckpt.load_training_checkpoint(path)  # raises "not found"
            return None
        obj = ckpt.load_training_checkpoint(path)
        ckpt.check_signature(path, obj.get("signature"), signature(self.cfg))
        student = {k.removeprefix("module."): v for k, v in obj["student"].items()}
        self.student.load_state_dict(student)
        self.teacher.load_state_dict(obj["teacher"])
        self.optimizer.load_state_dict(obj["optimizer"])
        self.loss.load_state_dict(obj["ibot_loss"])
        if self.scaler is not None and "fp16_scaler" in obj:
            self.scaler.load_state_dict(obj["fp16_scaler"])
        self.state = _State(int(obj["epoch"]), int(obj.get("epoch_iter", 0)))
        if self.state.epoch_iter >= self.iters_per_epoch:
            self.state = _State(self.state.epoch + 1, 0)
        rng = obj.get("rng", {}).get(f"rank{self.rank}")
        if rng is not None:
            ckpt.set_rng_state(rng)
        if is_main():
            print(
                f"[pretrain] resumed from {path}: epoch {self.state.epoch}, "
                f"batch {self.state.epoch_iter}",
                file=sys.stderr,
            )
        return path

    def _gather_rng(self) -> dict[str, dict[str, torch.Tensor]]:
        mine = ckpt.rng_state()
        if self.world_size == 1:
            return {"rank0": mine}
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return {f"rank{r}": s for r, s in enumerate(gathered)}

    def checkpoint_state(self) -> dict[str, Any]:
        state = {
            "student": {f"module.{k}": v for k, v in self.student.state_dict().items()},
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.state.epoch,
            "epoch_iter": self.state.epoch_iter,
            "iteration": self.state.epoch * self.iters_per_epoch + self.state.epoch_iter,
            "args": checkpoint_args(self.cfg),
            "ibot_loss": self.loss.state_dict(),
            "signature": signature(self.cfg),
            "rng": self._gather_rng(),
        }
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        return state

    def save(self, snapshot: bool = False, export: bool = False) -> None:
        state = self.checkpoint_state()  # collective under DDP: every rank calls it
        if is_main():
            ckpt.save_checkpoint(self.out / ckpt.CHECKPOINT, state)
            if snapshot:
                ckpt.save_checkpoint(self.out / f"checkpoint{self.state.epoch:04d}.pth", state)
            if export:
                ckpt.export_backbone(self.out / ckpt.BACKBONE_EXPORT, self.teacher.backbone)
        barrier()

    # ------------------------------------------------------------------ training
    def _step(self, batch: Any, it: int, epoch: int, monitor: ClusterMonitor) -> dict[str, float]:
        views, masks, labels = batch
        dev = self.device
        views = [normalize_batch(v.to(dev, non_blocking=True)) for v in views]
        masks = [m.to(dev, non_blocking=True) for m in masks]
        globals_, locals_ = views[: self.n_global], views[self.n_global :]
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr[it])
            if i == 0:
                group["weight_decay"] = float(self.wd[it])
        tt, tpt = float(self.teacher_temp[epoch]), float(self.teacher_patch_temp[epoch])
        with autocast(dev, self.precision):
            with torch.no_grad():
                t_out = self.teacher(globals_)
            s_out = self.model(globals_, masks, locals_)
            parts = self.loss(s_out.cls, s_out.patch, t_out.cls, t_out.patch, masks, tt, tpt)
        values = torch.stack([parts.total.detach(), parts.cls, parts.mim]).float()
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
            values /= self.world_size
        total, cls_loss, mim_loss = values.tolist()
        if not math.isfinite(total):
            where = self.out / ckpt.CHECKPOINT
            last = f"the last good checkpoint {where} is intact" if where.exists() else (
                "no checkpoint had been written yet"
            )  # fmt: skip
            raise TrainingDiverged(
                f"loss is {total} at epoch {epoch}, iteration {it} (cls {cls_loss}, mim "
                f"{mim_loss}); training stopped and {last}. Lower optim.lr, use precision=bf16 "
                "or fp32 instead of fp16, or lower optim.clip_grad, then resume or restart."
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(parts.total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            parts.total.backward()
        if self.cfg.optim.clip_grad > 0:
            clip_gradients_per_tensor(self.trainable, self.cfg.optim.clip_grad)
        cancel_last_layer_grads(self.student, epoch, self.cfg.optim.freeze_last_layer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update(self.ema_teacher, self.ema_student, float(self.momentum[it]))
        if self.cfg.eval_clusters:
            monitor.update(t_out.cls[0], s_out.cls[0], labels)
        return {
            "loss": total,
            "cls": cls_loss,
            "mim": mim_loss,
            "lr": float(self.lr[it]),
            "wd": float(self.wd[it]),
            "momentum": float(self.momentum[it]),
            "teacher_temp": tt,
            "teacher_patch_temp": tpt,
        }

    def fit(self) -> dict[str, Any]:
        """Train to the end (or ``max_iters`` / ``time_limit_min``); returns a summary."""
        cfg, o = self.cfg, self.cfg.optim
        start = time.perf_counter()
        log = JsonlLog(self.out / "log.jsonl", cfg.tensorboard) if is_main() else None
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out)
            print(
                f"[pretrain] {self.vit.name} on {cfg.data} ({len(self.data)} images), "
                f"{self.iters_per_epoch} it/epoch x {o.epochs} epochs, batch {o.batch_size} "
                f"({self.world_size} rank(s)), device {self.device}, precision {self.precision}",
                file=sys.stderr,
            )
        if self.resumed_from is None and cfg.save_init:
            state = self.checkpoint_state()
            if is_main():
                ckpt.save_checkpoint(self.out / "checkpoint_init.pth", state)
        monitor = ClusterMonitor()
        stopped = False
        last: dict[str, float] = {}
        try:
            while self.state.epoch < o.epochs and not stopped:
                epoch = self.state.epoch
                self.dataset.epoch = epoch
                self.sampler.set_epoch(epoch, self.state.epoch_iter)
                monitor.reset()
                bar = tqdm(
                    total=self.iters_per_epoch,
                    initial=self.state.epoch_iter,
                    desc=f"epoch {epoch}",
                    disable=not (is_main() and cfg.progress),
                    leave=False,
                    file=sys.stderr,
                )
                t0 = time.perf_counter()
                for batch in self.loader:
                    it = epoch * self.iters_per_epoch + self.state.epoch_iter
                    last = self._step(batch, it, epoch, monitor)
                    self.state.epoch_iter += 1
                    now = time.perf_counter()
                    last["img_per_s"] = self.batch * self.world_size / max(now - t0, 1e-9)
                    t0 = now
                    if log is not None and it % max(cfg.log_every, 1) == 0:
                        log.write({"type": "train", "epoch": epoch, "iter": it, **last}, it)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", img_s=f"{last['img_per_s']:.1f}")
                    done = it + 1
                    over_time = (
                        cfg.time_limit_min > 0
                        and time.perf_counter() - start > cfg.time_limit_min * 60
                    )
                    stopped = bool(cfg.max_iters and done >= cfg.max_iters) or over_time
                    periodic = cfg.save_every_iters and done % cfg.save_every_iters == 0
                    if (stopped or periodic) and self.state.epoch_iter < self.iters_per_epoch:
                        self.save()  # epoch ends are saved below
                    if stopped:
                        break
                bar.close()
                if self.state.epoch_iter >= self.iters_per_epoch:
                    summary = monitor.compute() if cfg.eval_clusters else {}
                    self.state = _State(epoch + 1, 0)
                    freq = cfg.saveckp_freq
                    self.save(snapshot=bool(freq and (epoch + 1) % freq == 0), export=True)
                    if log is not None:
                        record = {"type": "epoch", "epoch": epoch, **last, **summary}
                        log.write(record, epoch)
                    if is_main():
                        nmi = f" nmi {summary['nmi']:.3f}" if "nmi" in summary else ""
                        print(
                            f"[pretrain] epoch {epoch}: loss {last.get('loss', float('nan')):.4f}"
                            f" (cls {last.get('cls', 0):.4f}, mim {last.get('mim', 0):.4f}){nmi}"
                            f" {time.perf_counter() - start:.0f}s",
                            file=sys.stderr,
                        )
        finally:
            if log is not None:
                log.close()
        return {
            "output_dir": str(self.out),
            "is_main": is_main(),
            "epochs_done": self.state.epoch,
            "epoch_iter": self.state.epoch_iter,
            "stopped_early": stopped and self.state.epoch < o.epochs,
            "wall_s": time.perf_counter() - start,
            "last": last,
        }


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it."""
    return Trainer(cfg, resume).fit()
