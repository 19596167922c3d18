"""The iBOT training loop (docs/protocols.md#pretraining): single process or DDP under torchrun.

One step: normalise the uint8 crops, teacher on the unmasked global crops, student on the
masked global crops and the local crops (one call), loss + center update, backward,
per-tensor clipping, last-layer freezing, AdamW step, EMA teacher update. Checkpoints are
written atomically every ``save_every_iters`` iterations and every epoch; a run resumes
exactly (model, optimizer, scaler, centers, RNG, data position) from ``checkpoint.pth``.

Trust: a resume is refused when any setting that changes the run differs from the
checkpoint's (:func:`run_signature`; ``force_resume`` continues and records the change in
``config_history.yaml``); every checkpoint write is preceded by a finiteness check of the
student, teacher, centers and optimizer moments, so a NaN/inf state is never written; the
error names the last finite checkpoint (or, when the newest one holds the very weights whose
loss is NaN/inf, the one before it, kept as ``checkpoint_prev.pth``) and the fix.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ibot_bench.config import save_config, to_dict
from ibot_bench.data import load_split, require_classification
from ibot_bench.data.classification import normalize_batch
from ibot_bench.distributed import (
    all_ranks,
    barrier,
    broadcast_object,
    check_shared,
    init_distributed,
    is_main,
    world,
)
from ibot_bench.errors import CheckpointError, DatasetError, UserError
from ibot_bench.interrupt import StopRequests, TrainingInterrupted, ignore_interrupts
from ibot_bench.pretrain import checkpoint as ckpt
from ibot_bench.pretrain.augment import MaskedMultiCrop, MultiCropAugmentation
from ibot_bench.pretrain.augment_batched import BatchCollate, BatchedMultiCrop, augment_mode
from ibot_bench.pretrain.auto_precision import pretrain_precision
from ibot_bench.pretrain.config import PretrainConfig, crop_sizes, validate, vit_config
from ibot_bench.pretrain.loss import IbotLoss
from ibot_bench.pretrain.masking import MaskGenerator
from ibot_bench.pretrain.model import IbotStudent, IbotTeacher, build_networks, common_parameters
from ibot_bench.pretrain.monitor import (
    ClusterMonitor,
    JsonlLog,
    KnnProbe,
    collapse_warning,
    unstable_warning,
)
from ibot_bench.pretrain.optim import (
    build_optimizer,
    cancel_last_layer_grads,
    clip_gradients_per_tensor,
    ema_update,
)
from ibot_bench.pretrain.plot import plot_training
from ibot_bench.pretrain.schedules import cosine_schedule, teacher_temp_schedule
from ibot_bench.runtime import (
    autocast,
    check_precision,
    loader_workers,
    resolve_device,
    set_threads,
    threads_restored,
)

# profiler labels of the training step's phases (benchmarks/pretrain.py reports them);
# "step/head" is the projection heads, inside the teacher and student phases
PHASES = tuple(
    f"step/{p}"
    for p in ("data", "teacher", "student", "head", "loss", "backward", "clip", "optimizer", "ema")
)


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite; nothing non-finite was written and the
    message names the last finite checkpoint."""


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


def run_signature(cfg: PretrainConfig, data_fingerprint: str | None) -> dict[str, Any]:
    """What must match to resume into an output folder: every config key except the
    runtime-only ones (:data:`ibot_bench.pretrain.checkpoint.RUNTIME_KEYS`), flattened, plus
    the training split's fingerprint."""
    return ckpt.resume_signature(to_dict(cfg), data_fingerprint)


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

    def __init__(
        self, cfg: PretrainConfig, resume: str | None = None, force_resume: bool = False
    ) -> None:
        init_distributed()
        self.rank, self.world_size = world()
        validate(cfg, self.world_size)
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        ckpt.check_output_dir(self.out)  # planted folders etc.: refused before anything runs
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        check_precision(self.device, cfg.precision)  # fails before anything is built
        # a broken checkpoint to resume from, too (read mapped: nothing is allocated yet)
        self._resume_file = self._read_resume_file(resume)
        # automatic threads are timed for one CPU process; DDP ranks and GPU runs keep
        # torch's default (torchrun sets one thread per rank)
        alone_on_cpu = self.device.type == "cpu" and self.world_size == 1
        threads = cfg.threads if cfg.threads != -1 or alone_on_cpu else 0
        self.threads = set_threads(threads, log=_stderr if is_main() else None)

        self.data = require_classification(load_split(cfg.data, "train"), cfg.data)
        fingerprint = self.data.fingerprint() if self.rank == 0 else None
        self.signature = run_signature(cfg, broadcast_object(fingerprint))  # one scan, rank 0
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
        self.precision = pretrain_precision(
            cfg, self.student, self.teacher, self.device, self.batch, _stderr
        )
        if cfg.compile:
            compile_blocks(self.student, self.teacher)
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
        # finite checkpoints we know of, oldest first: {"path", "epoch", "epoch_iter", "iteration"}
        self.good: list[dict[str, Any]] = []
        self.config_history: list[dict[str, Any]] = []
        self.history_entry: dict[str, Any] = {"event": "start"}
        self.resumed_from = self._maybe_resume(resume, force_resume)
        if not self._rng_restored:  # per-rank stream for drop-path (restored on resume)
            torch.manual_seed(cfg.seed + 1000 * self.rank + 1)
        self._finish_history_entry()

        m = cfg.mask
        self.augment = augment_mode(cfg.augment, self.device, self.world_size)
        batched = BatchedMultiCrop(cfg.crops) if self.augment == "batched" else None
        # batched: on the GPU in the step, else in the loader's collate (docs/protocols.md#multi-crop)
        self.device_augment = batched if self.device.type == "cuda" else None
        self.dataset = MaskedMultiCrop(
            self.data,
            None if batched else MultiCropAugmentation(cfg.crops),
            MaskGenerator(
                m.pred_ratio,
                m.pred_ratio_var,
                m.pred_shape,
                m.pred_aspect_ratio,
                m.pred_start_epoch,
            ),  # fmt: skip
            self.vit.patch_size,
            g_sizes,
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
            worker_init_fn=ignore_interrupts if workers > 0 else None,
            collate_fn=BatchCollate(None if self.device_augment else batched) if batched else None,
        )
        self.n_global = cfg.crops.global_number
        self.probe = (
            KnnProbe(self.data, g_sizes[0], cfg.monitor_knn, seed=cfg.seed)
            if cfg.monitor_knn > 0 and is_main()
            else None
        )
        self.notes: list[str] = []  # what training.png says under its title

    # ------------------------------------------------------------------ checkpoints
    def _optimizer_names(self) -> list[list[str]]:
        """Per optimizer group, the student parameter names of its slots, in order."""
        names = {id(p): n for n, p in self.student.named_parameters()}
        return [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]

    def _read_resume_file(self, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
        """``--resume``'s checkpoint, else the output folder's, if any: (path, mapped dict)."""
        path = Path(resume) if resume else self.out / ckpt.CHECKPOINT
        if not resume and not check_shared(path):
            return None
        return path, ckpt.load_training_checkpoint(path)

    def _maybe_resume(self, resume: str | None, force: bool) -> Path | None:
        self._rng_restored = False
        if self._resume_file is None:
            return None
        path, obj = self._resume_file
        self._resume_file = None  # the mapped file is not kept past the resume
        # 1. settings (plain values only): refused before any tensor is looked at
        saved = ckpt.saved_signature(obj)
        diff = {} if saved is None else ckpt.signature_diff(saved, self.signature)
        ckpt.check_resume(path, diff, force)
        # 2. shapes against the configured model, on the mapped file (nothing allocated)
        raw = obj["student"]
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{path}: 'student' is not a state dict; the file is corrupt.")
        student = ckpt.check_shapes(
            path,
            "student",
            {k.removeprefix("module."): v for k, v in raw.items()},
            {k: v.shape for k, v in self.student.state_dict().items()},
        )
        teacher = ckpt.check_shapes(
            path,
            "teacher",
            obj["teacher"],
            {k: v.shape for k, v in self.teacher.state_dict().items()},
        )
        centers = ckpt.check_shapes(
            path,
            "ibot_loss",
            obj["ibot_loss"],
            {k: v.shape for k, v in self.loss.state_dict().items()},
        )
        names = obj.get("optimizer_param_names")
        if names is not None and not (
            isinstance(names, list)
            and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in names)
        ):
            raise CheckpointError(
                f"{path}: 'optimizer_param_names' is malformed; the file is corrupt."
            )
        optimizer = ckpt.pair_optimizer_state(
            path,
            obj["optimizer"],
            self._optimizer_names(),
            {n: p.shape for n, p in self.student.named_parameters()},
            names,
        )
        rest = {k: v for k, v in obj.items() if k not in ckpt.REQUIRED_KEYS}
        ckpt.check_small_tensors(path, rest)
        if resume:
            aside = ckpt.set_aside_output_checkpoint(
                self.out, path, self.signature, force, write=self.rank == 0
            )
            if aside is not None and self.rank == 0:
                print(
                    f"[pretrain] {self.out / ckpt.CHECKPOINT} (not the file resumed from) kept "
                    f"as {aside.name}",
                    file=sys.stderr,
                )
        # 3. load (copies out of the mapped file), then refuse a non-finite state
        self.student.load_state_dict(student)
        self.teacher.load_state_dict(teacher)
        own = [
            {k: g[k] for k in ("foreach", "fused", "capturable", "differentiable") if k in g}
            for g in self.optimizer.param_groups
        ]
        self.optimizer.load_state_dict(optimizer)
        for group, flags in zip(self.optimizer.param_groups, own):
            group.update(flags)  # this machine's implementation choice, not the writer's
        self.loss.load_state_dict(centers)
        scaler_state = obj.get("fp16_scaler")
        if self.scaler is not None and isinstance(scaler_state, Mapping):
            self.scaler.load_state_dict(scaler_state)
        bad = ckpt.nonfinite(self._named_state())
        if bad:
            raise CheckpointError(
                f"{path} holds non-finite values ({', '.join(bad[:3])}"
                f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); training cannot "
                "continue from it. Resume an earlier one (checkpoint_prev.pth or a snapshot "
                "checkpointNNNN.pth) with --resume, or start in a new output_dir."
            )
        epoch, epoch_iter = int(obj["epoch"]), int(obj.get("epoch_iter", 0) or 0)
        n = self.iters_per_epoch
        self.good = [self._info(path, epoch, epoch_iter, int(obj.get("iteration", epoch * n)))]
        self.state = _State(epoch, epoch_iter)
        if self.state.epoch_iter >= self.iters_per_epoch:
            self.state = _State(self.state.epoch + 1, 0)
        if path == self.out / ckpt.CHECKPOINT and (self.out / ckpt.PREVIOUS).is_file():
            # written before checkpoint.pth in the same run: a later step from it had a finite loss
            prev = ckpt.peek(self.out / ckpt.PREVIOUS)
            if prev and "iteration" in prev and prev["iteration"] < self.good[0]["iteration"]:
                self.good.insert(
                    0,
                    self._info(
                        self.out / ckpt.PREVIOUS,
                        prev.get("epoch", 0),
                        prev.get("epoch_iter", 0),
                        prev["iteration"],
                    ),
                )
        rngs = obj.get("rng")
        rng = rngs.get(f"rank{self.rank}") if isinstance(rngs, Mapping) else None
        if isinstance(rng, Mapping) and isinstance(rng.get("torch"), torch.Tensor):
            ckpt.set_rng_state(rng)
            self._rng_restored = True
        args = obj.get("args")
        history = args.get("config_history") if isinstance(args, Mapping) else None
        self.config_history = list(history) if isinstance(history, list) else []
        event = "resume-unverified" if saved is None else "forced-resume" if diff else "resume"
        self.history_entry = {
            "event": event,
            "checkpoint": str(path),
            "epoch": epoch,
            "iteration": self.good[-1]["iteration"],
        }
        if diff:
            self.history_entry["changed"] = {
                k: {"checkpoint": a, "config": b} for k, (a, b) in diff.items()
            }
        if saved is not None and "data_fingerprint" not in saved:
            self.history_entry["note"] = "older checkpoint: the data fingerprint was not recorded"
        if is_main():
            if saved is None:
                print(
                    f"[pretrain] {path} records no run settings (a reference checkpoint?): only "
                    "the shapes were checked; the config of this run is taken as is",
                    file=sys.stderr,
                )
            elif diff:
                changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                print(
                    f"[pretrain] --force-resume: continuing {path} with changed settings "
                    f"({changed}); recorded in {ckpt.HISTORY}",
                    file=sys.stderr,
                )
            print(
                f"[pretrain] resumed from {path}: epoch {self.state.epoch}, "
                f"batch {self.state.epoch_iter}",
                file=sys.stderr,
            )
        return path

    @staticmethod
    def _info(path: Path, epoch: int, epoch_iter: int, iteration: int) -> dict[str, Any]:
        return {
            "path": Path(path),
            "epoch": epoch,
            "epoch_iter": epoch_iter,
            "iteration": iteration,
        }

    def _finish_history_entry(self) -> None:
        """This start's ``config_history.yaml`` entry: event, time, world size, and what
        changed against the folder's previous ``config.yaml`` (runtime keys included)."""
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **self.history_entry,
            "world_size": self.world_size,
        }
        previous = self.out / ckpt.CONFIG
        if previous.is_file():
            try:
                old = ckpt.flatten(yaml.safe_load(previous.read_text()) or {})
            except (yaml.YAMLError, OSError, AttributeError):
                entry["config_yaml_changed"] = "the previous config.yaml was unreadable"
            else:
                new = ckpt.flatten(to_dict(self.cfg))
                changed = {
                    k: {"before": old.get(k), "now": new.get(k)}
                    for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)
                }
                if changed:
                    entry["config_yaml_changed"] = changed
        self.history_entry = entry
        self.config_history = [*self.config_history, entry]

    def _write_history(self) -> None:
        """Append this start's entry to ``config_history.yaml`` (before config.yaml changes)."""
        text = yaml.safe_dump([_plain(self.history_entry)], sort_keys=False)
        with (self.out / ckpt.HISTORY).open("a") as f:
            f.write(text)

    def _named_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor a checkpoint holds: student, teacher, centers, optimizer moments."""
        for k, v in self.student.state_dict().items():
            yield f"student {k}", v
        for k, v in self.teacher.state_dict().items():
            yield f"teacher {k}", v
        for k, v in self.loss.state_dict().items():
            yield f"ibot_loss {k}", v
        names = {id(p): n for n, p in self.student.named_parameters()}
        for p, st in self.optimizer.state.items():
            for k, v in st.items():
                if k != "step":
                    yield f"optimizer {k} of {names.get(id(p), '?')}", v

    def _check_finite(self) -> None:
        """Collective: raise :class:`TrainingDiverged` on every rank if any rank's state
        holds a NaN/inf (then nothing is written)."""
        bad = ckpt.nonfinite(self._named_state())
        if not all_ranks(not bad):
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            what = f"non-finite values in {', '.join(bad[:3])}{more}" if bad else (
                "non-finite values on another rank"
            )  # fmt: skip
            done = self.state.epoch * self.iters_per_epoch + self.state.epoch_iter
            raise self._diverged(what, self.state.epoch, done)

    def _diverged(
        self, what: str, epoch: int, iteration: int, from_loss: bool = False
    ) -> TrainingDiverged:
        """The error of a diverged run: the last finite checkpoint and the fix. No file is
        touched. When the newest checkpoint holds exactly the weights whose loss is not finite
        (``from_loss``), resuming it would diverge again, so the one before it is named."""
        current = self.out / ckpt.CHECKPOINT
        note = ""
        target = self.good[-1] if self.good else None
        label = "The last finite checkpoint is"
        culprit = from_loss and target is not None and target["iteration"] == iteration
        if culprit:
            unless = " unless precision=fp32 cures an overflow" if self.precision != "fp32" else ""
            note = (
                f"{target['path']} (epoch={target['epoch']}, iteration={iteration}) is intact and "
                "finite, but holds exactly the weights that gave this loss: resuming it diverges "
                f"again{unless}. "
            )
            target = self.good[-2] if len(self.good) > 1 else None
            label = "The last checkpoint whose loss was finite is"
        if target is not None:
            where = (
                f"{label} {target['path']} (epoch={target['epoch']}, "
                f"iteration={target['iteration']}); it is intact."
            )
            again = "" if target["path"] == current else f" --resume {target['path']}"
            resume = (
                f"then resume from it with{again} --force-resume (the changed settings are "
                f"recorded in {ckpt.HISTORY})"
            )
        elif culprit:
            where = f"No earlier training checkpoint exists ({ckpt.INIT} is the random init)."
            resume = f"then rerun in a new output_dir (or move {current} away)"
        else:
            where = f"No training checkpoint was written yet ({ckpt.INIT} is the random init)."
            resume = "then rerun (it starts from scratch)"
        o = self.cfg.optim
        precision = (
            f", use precision=fp32 (now {self.cfg.precision}: {self.precision})"
            if self.precision != "fp32"
            else ""
        )
        return TrainingDiverged(
            f"training diverged: {what} at epoch {epoch}, iteration {iteration}; nothing "
            f"non-finite was written. {note}{where} Fix: lower optim.lr (now {o.lr}), raise "
            f"optim.warmup_epochs (now {o.warmup_epochs}){precision} or lower optim.clip_grad "
            f"(now {o.clip_grad}), {resume}."
        )

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
            "args": {**checkpoint_args(self.cfg), "config_history": self.config_history},
            "ibot_loss": self.loss.state_dict(),
            "resume_signature": self.signature,
            "optimizer_param_names": self._optimizer_names(),
            "rng": self._gather_rng(),
        }
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        return state

    def save(self, snapshot: bool = False, export: bool = False) -> None:
        """checkpoint.pth (the one before kept as checkpoint_prev.pth), a snapshot, the
        backbone export: only after the whole state was checked finite."""
        self._check_finite()  # collective under DDP, as checkpoint_state
        state = self.checkpoint_state()
        kept = False
        if is_main():
            kept = ckpt.keep_previous(self.out)
            ckpt.save_checkpoint(self.out / ckpt.CHECKPOINT, state)
            if snapshot:
                ckpt.save_checkpoint(self.out / f"checkpoint{self.state.epoch:04d}.pth", state)
            if export:
                ckpt.export_backbone(self.out / ckpt.BACKBONE_EXPORT, self.teacher.backbone)
        kept = bool(broadcast_object(kept))  # every rank keeps the same record
        current, previous = self.out / ckpt.CHECKPOINT, self.out / ckpt.PREVIOUS
        good = []
        for info in self.good:
            if info["path"] == previous:
                continue  # overwritten (or removed) by keep_previous
            if info["path"] == current:
                if not kept:
                    continue
                info = {**info, "path": previous}
            good.append(info)
        s = self.state
        iteration = s.epoch * self.iters_per_epoch + s.epoch_iter
        self.good = [*good, self._info(current, s.epoch, s.epoch_iter, iteration)]
        barrier()

    # ------------------------------------------------------------------ training
    def _step(self, batch: Any, it: int, epoch: int, monitor: ClusterMonitor) -> dict[str, float]:
        views, masks, labels = batch
        dev = self.device
        with record_function("step/data"):
            if self.device_augment is not None:  # augment=batched on the GPU
                views = self.device_augment(views.to(dev))
            views = [normalize_batch(v.to(dev, non_blocking=True)) for v in views]
            masks = [m.to(dev, non_blocking=True) for m in masks]
        globals_, locals_ = views[: self.n_global], views[self.n_global :]
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr[it])
            if i == 0:
                group["weight_decay"] = float(self.wd[it])
        tt, tpt = float(self.teacher_temp[epoch]), float(self.teacher_patch_temp[epoch])
        with autocast(dev, self.precision):
            with torch.no_grad(), record_function("step/teacher"):
                t_out = self.teacher(globals_)
            with record_function("step/student"):
                s_out = self.model(globals_, masks, locals_)
            with record_function("step/loss"):
                parts = self.loss(s_out.cls, s_out.patch, t_out.cls, t_out.patch, masks, tt, tpt)
        values = torch.stack([parts.total.detach(), parts.cls, parts.mim]).float()
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
            values /= self.world_size
        total, cls_loss, mim_loss = values.tolist()
        if not math.isfinite(total):
            what = f"the loss is {total} (cls {cls_loss}, mim {mim_loss})"
            raise self._diverged(what, epoch, it, from_loss=True)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("step/backward"):
            if self.scaler is not None:
                self.scaler.scale(parts.total).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                parts.total.backward()
        with record_function("step/clip"):
            if self.cfg.optim.clip_grad > 0:
                clip_gradients_per_tensor(self.trainable, self.cfg.optim.clip_grad)
        cancel_last_layer_grads(self.student, epoch, self.cfg.optim.freeze_last_layer)
        with record_function("step/optimizer"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        with record_function("step/ema"):
            ema_update(self.ema_teacher, self.ema_student, float(self.momentum[it]))
        if self.cfg.eval_clusters:
            lc = self.cfg.loss
            monitor.update(
                t_out.cls[0], s_out.cls[0], labels, self.loss.center, tt, lc.student_temp
            )
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

    def _probe(self, network: torch.nn.Module | None = None) -> float:
        """kNN monitor of the teacher's backbone (or ``network``'s, in eval mode)."""
        assert self.probe is not None
        backbone = (network or self.teacher).backbone
        was_training = backbone.training
        backbone.eval()
        try:
            return self.probe(backbone, self.device)
        finally:
            backbone.train(was_training)

    def _end_epoch(
        self, epoch: int, record: dict[str, Any], log: JsonlLog | None, wall_s: float
    ) -> None:
        """Main rank: the epoch's record (losses, monitors, center norm, kNN probe), the
        console line, the collapse warning (once per run) and training.png."""
        record["center_norm"] = float(self.loss.center.norm())
        if self.probe is not None and not self.probe.skip:
            record["knn_top1"] = self._probe()
            # the student too: a teacher far behind it means the EMA lags (small-scale-runs)
            record["knn_student_top1"] = self._probe(self.student)
        if log is not None:
            log.write({"type": "epoch", "epoch": epoch, **record}, epoch)
        shown = [f"loss {record.get('loss', float('nan')):.4f}"]
        shown += [
            f"{key} {record[key]:{fmt}}"
            for key, fmt in (
                ("cls", ".4f"),
                ("mim", ".4f"),
                ("teacher_entropy", ".2f"),
                ("teacher_clusters", "d"),
                ("nmi", ".3f"),
                ("knn_top1", ".1f"),
                ("knn_student_top1", ".1f"),
            )
            if key in record
        ]
        print(f"[pretrain] epoch {epoch}: {', '.join(shown)} {wall_s:.0f}s", file=sys.stderr)
        warning = collapse_warning(record.get("teacher_entropy", 0.0), self.cfg.head.out_dim)
        if warning and not any("collapse" in n for n in self.notes):
            print(warning, file=sys.stderr)
            self.notes.append(f"CLS head collapsed to the uniform output at epoch {epoch}")
        h, lc = self.cfg.head, self.cfg.loss
        uniform = lc.lambda1 * math.log(h.out_dim) + lc.lambda2 * math.log(h.patch_out_dim)
        warning = unstable_warning(record.get("loss", 0.0), uniform)
        if warning and not any("unstable" in n for n in self.notes):
            print(warning, file=sys.stderr)
            self.notes.append(f"loss unstable at epoch {epoch}")
        self._plot()

    def _report_cut(self, log: JsonlLog | None, wall_s: float) -> None:
        """A stop before the configured end (time_limit_min / max_iters): said loudly on the
        console, in log.jsonl ("type": "stopped") and on training.png."""
        o, s = self.cfg.optim, self.state
        done, total = s.epoch * self.iters_per_epoch + s.epoch_iter, o.epochs * self.iters_per_epoch
        over_time = self.cfg.time_limit_min > 0 and wall_s > self.cfg.time_limit_min * 60
        reason = f"time_limit_min={self.cfg.time_limit_min}" if over_time else "max_iters"
        why = "the result depends on this machine's speed" if over_time else "as asked"
        text = (
            f"STOPPED EARLY by {reason} after {done} of {total} steps ({wall_s / 60:.1f} min): "
            f"{why}; rerun to resume"
        )
        print(f"[pretrain] WARNING: {text}", file=sys.stderr)
        if log is not None:
            record = {"type": "stopped", "epoch": s.epoch, "reason": reason, "steps": done}
            log.write({**record, "total_steps": total, "wall_s": wall_s})
        self.notes.append(text)
        self._plot()

    def _plot(self) -> None:
        if not self.cfg.plot:
            return
        o = self.cfg.optim
        title = (
            f"iBOT {self.vit.name} on {self.cfg.data}: {o.epochs} epochs x "
            f"{self.iters_per_epoch} steps, batch {o.batch_size}"
        )
        plot_training(
            self.out / ckpt.LOG,
            self.out / ckpt.PLOT,
            self.iters_per_epoch,
            self.cfg.head.out_dim,
            title,
            "; ".join(self.notes),
        )

    def fit(self) -> dict[str, Any]:
        """Train to the end (or ``max_iters`` / ``time_limit_min``); returns a summary."""
        cfg, o = self.cfg, self.cfg.optim
        start = time.perf_counter()
        log = JsonlLog(self.out / "log.jsonl", cfg.tensorboard) if is_main() else None
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_history()  # config.yaml is replaced only with its change on record
            save_config(cfg, self.out)
            print(
                f"[pretrain] {self.vit.name} on {cfg.data} ({len(self.data)} images), "
                f"{self.iters_per_epoch} it/epoch x {o.epochs} epochs, batch {o.batch_size} "
                f"({self.world_size} rank(s)), device {self.device}, {self.threads} thread(s), "
                f"precision {self.precision}, augment {self.augment}",
                file=sys.stderr,
            )
        if self.resumed_from is None and cfg.save_init:
            self._check_finite()
            state = self.checkpoint_state()
            if is_main():
                ckpt.save_checkpoint(self.out / ckpt.INIT, state)
                if log is not None and self.probe is not None and not self.probe.skip:
                    log.write({"type": "init", "epoch": -1, "knn_top1": self._probe()}, 0)
        if self.probe is not None and self.probe.skip:
            self.notes.append(f"kNN monitor off: {self.probe.skip}")
        monitor = ClusterMonitor()
        stopped = False
        last: dict[str, float] = {}
        try:
            with StopRequests("pretrain") as stop:
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
                    for batch in self.loader:  # its workers ignore the stop signals
                        it = epoch * self.iters_per_epoch + self.state.epoch_iter
                        last = self._step(batch, it, epoch, monitor)
                        self.state.epoch_iter += 1
                        now = time.perf_counter()
                        last["img_per_s"] = self.batch * self.world_size / max(now - t0, 1e-9)
                        t0 = now
                        if log is not None and it % max(cfg.log_every, 1) == 0:
                            log.write({"type": "train", "epoch": epoch, "iter": it, **last}, it)
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{last['loss']:.3f}", img_s=f"{last['img_per_s']:.1f}"
                        )
                        done = it + 1
                        over_time = (
                            cfg.time_limit_min > 0
                            and time.perf_counter() - start > cfg.time_limit_min * 60
                        )
                        stopped = bool(cfg.max_iters and done >= cfg.max_iters) or over_time
                        stopped = stop.requested() or stopped
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
                        if is_main():
                            self._end_epoch(
                                epoch, {**last, **summary}, log, time.perf_counter() - start
                            )
                    if stop.requested():  # collective: a rank's own signal may come late
                        break
                    if stopped and self.state.epoch < o.epochs and is_main():
                        self._report_cut(log, time.perf_counter() - start)
        finally:
            if log is not None:
                log.close()
        if stop.requested():
            s = self.state
            raise TrainingInterrupted(
                f"pretraining stopped by {stop.signal_name or 'a signal to another rank'}; "
                f"checkpoint saved at epoch "
                f"{s.epoch}, batch {s.epoch_iter} in {self.out / ckpt.CHECKPOINT}: rerun the "
                "same command to resume"
            )
        return {
            "output_dir": str(self.out),
            "is_main": is_main(),
            "epochs_done": self.state.epoch,
            "epoch_iter": self.state.epoch_iter,
            "stopped_early": stopped and self.state.epoch < o.epochs,
            "wall_s": time.perf_counter() - start,
            "last": last,
        }


def compile_blocks(student: IbotStudent, teacher: IbotTeacher) -> None:
    """``torch.compile`` every transformer block: the networks call
    ``backbone.forward_tokens``, not ``forward``, so the blocks are what runs.

    The blocks share one code object, and each student block's drop-path rate (a float that
    dynamo treats as a constant) makes its own graph, as do the crop sizes and the teacher's
    blocks. Past torch's default of 8 graphs per code object the remaining blocks would
    silently run uncompiled (a ViT-S with drop-path did), so the limit is raised to cover
    them all."""
    import torch._dynamo.config as dynamo_config

    depth = len(student.backbone.blocks)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4 * depth + 8)
    for network in (student, teacher):
        for block in network.backbone.blocks:
            block.compile()


def _stderr(message: str) -> None:
    print(f"[pretrain] {message}", file=sys.stderr)


def _plain(value: Any) -> Any:
    """YAML-safe copy (paths and tuples as plain values)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def pretrain(
    cfg: PretrainConfig, resume: str | None = None, force_resume: bool = False
) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it. ``force_resume`` continues a checkpoint whose
    settings differ from ``cfg`` (recorded in ``config_history.yaml``) instead of refusing.

    The run's ``threads`` apply to the run only: the caller's torch thread count is restored
    afterwards (a suite evaluates in the same process; ``quick.yaml``'s 1 thread once ran
    every evaluation after it on 1 of 2 cores)."""
    with threads_restored():
        return Trainer(cfg, resume, force_resume).fit()
