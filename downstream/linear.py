"""Linear probes on cached frozen features: many heads trained at once.

docs/protocols.md#linear-probe: ``Linear(D, C)`` heads, weight
N(0, 0.01), bias 0, SGD momentum 0.9, weight decay 0, cosine schedule to 0 (stepped per
iteration here), lr scaled by ``batch_size / 256``. Every (learning rate, feature
variant) pair is one head; all heads train in one model on the same shuffled mini-batches,
as DINOv2 does — one pass over the cached features instead of one run per learning rate
(the reference recomputed the backbone every epoch, dino#141). The heads reading one
feature variant are column blocks of one weight matrix: one matmul forward, one for the
weight gradient, and an SGD-momentum step with a per-column learning rate, so every head
keeps its own lr and its own gradient (the loss is the sum of the heads' losses).

Feature variants (docs/protocols.md#default-features):

- ``cls``: final-block CLS (D); the pooled features for encoders without a CLS token;
- ``cls_last4``: concatenated CLS of the last min(4, depth) blocks (4D for the paper's
  ViT-S feature; a 2-block ViT gives 2D);
- ``cls_patch``: [final CLS, mean patch token] (2D; the paper's ViT-B/L feature).

Encoders without a CLS token (timm CNNs) have neither a CLS per block nor a CLS distinct
from the mean patch feature: ``cls_last4`` and ``cls_patch`` are skipped for them, with a
logged note, as long as another requested variant remains (requesting only unavailable
variants is an error). ``extra["variants"]`` records the variants requested, used and
skipped (with the reason) and the number of blocks ``cls_last4`` used.

Learning-rate grid (default, DINOv2's): 13 base lrs 1e-5, 2e-5, 5e-5, ..., 5e-2, 0.1,
each multiplied by ``batch_size / 256``.

Two protocols, registered as two tasks so their numbers are never mixed:

- ``linear`` (default): the head is chosen on a stratified validation split held out from
  the training features (``val_fraction``), then reported on the test set; optionally
  refit on all training features (``refit``).
- ``linear-paper``: the reference's protocol: all heads train on all training features and
  the reported number is the maximum over heads *and epochs* of the test accuracy
  (selection on the test set). Its default grid is the reference's 45 base lrs
  {1..9} x 10^k, k = -4..0.

``augment=true`` trains on features of RandomResizedCrop + flip views computed live every
epoch, as the paper's 100-epoch protocol does (slow: the backbone runs on every batch);
the protocol name then ends in ``-aug`` (the paper's published linear numbers are
``linear-paper-aug``), so cached and augmented numbers are never compared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ibot_bench.data.subsets import stratified_split
from ibot_bench.downstream.live_features import LiveViews, live_views
from ibot_bench.encoders.base import DEFAULT_LAST_BLOCKS
from ibot_bench.errors import ConfigError, UserError
from ibot_bench.features import FeatureSet, feature_layout
from ibot_bench.interrupt import StopRequests, TrainingInterrupted
from ibot_bench.precision import choose_precision
from ibot_bench.resume_file import ResumeFile
from ibot_bench.runtime import resolve_device
from ibot_bench.tasks import TaskContext, TaskOutput, register_task

log = logging.getLogger(__name__)

FEATURE_VARIANTS = ("cls", "cls_last4", "cls_patch")
DINOV2_BASE_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]
PAPER_BASE_LRS = [round(m * 10.0**e, 6) for e in range(-4, 1) for m in range(1, 10)]


@dataclass
class LinearBaseConfig:
    """Settings shared by both linear protocols (docs/protocols.md#linear-probe)."""

    epochs: int = 100
    batch_size: int = 1024
    base_lrs: list[float] = field(default_factory=lambda: list(DINOV2_BASE_LRS))
    variants: list[str] = field(default_factory=lambda: list(FEATURE_VARIANTS))
    momentum: float = 0.9
    weight_decay: float = 0.0
    # the heads' matmuls: fp32 | auto (the faster, measured once) | bf16; fp32 by default, as
    # bf16 rounds the features (docs/protocols.md#feature-precision)
    precision: str = "fp32"
    eval_batch_size: int = 4096
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    augment: bool = False  # train on live RandomResizedCrop + flip features (paper's protocol)
    aug_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])


@dataclass
class LinearConfig(LinearBaseConfig):
    """Protocol ``linear``: head chosen on a held-out stratified validation split."""

    val_fraction: float = 0.1
    refit: bool = False  # retrain the chosen head on all training features


@dataclass
class LinearPaperConfig(LinearBaseConfig):
    """Protocol ``linear-paper``: max over heads and epochs on the test set (reference)."""

    base_lrs: list[float] = field(default_factory=lambda: list(PAPER_BASE_LRS))
    eval_every: int = 1  # epochs between test evaluations (the last epoch always counts)


@dataclass(frozen=True)
class HeadSpec:
    """One linear head: the feature variant it reads and its learning rates."""

    feature: str
    base_lr: float
    lr: float

    def as_dict(self) -> dict:
        return {"feature": self.feature, "base_lr": self.base_lr, "lr": self.lr}


class LinearHeads(nn.Module):
    """Every head's ``Linear(D_f, C)``, weight N(0, 0.01), bias 0 (docs/protocols.md#linear-probe).

    The heads reading one feature variant are column blocks of one ``(D_f, H_f * C)`` weight
    (and one ``H_f * C`` bias), so their forward pass is a single matmul and so is the
    gradient of their weights. Initial values are drawn head by head in ``specs`` order, as
    separate ``(C, D_f)`` weights would be.
    """

    def __init__(
        self, specs: list[HeadSpec], dims: dict[str, int], num_classes: int, seed: int
    ) -> None:
        super().__init__()
        self.specs = specs
        self.num_classes = num_classes
        gen = torch.Generator().manual_seed(seed)
        drawn = [
            torch.normal(0.0, 0.01, (num_classes, dims[s.feature]), generator=gen) for s in specs
        ]
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(specs):
            groups.setdefault(s.feature, []).append(i)
        self.groups = groups
        self.weight = nn.ParameterDict(
            {
                f: nn.Parameter(torch.cat([drawn[i] for i in idx]).T.contiguous())
                for f, idx in groups.items()
            }
        )
        self.bias = nn.ParameterDict(
            {f: nn.Parameter(torch.zeros(len(idx) * num_classes)) for f, idx in groups.items()}
        )
        order = torch.tensor([i for idx in groups.values() for i in idx])
        self.register_buffer("restore", torch.argsort(order), persistent=False)
        self.scratch: dict[str, torch.Tensor] = {}  # training logits, reused across steps
        self.bf16 = False  # matmuls in bfloat16 (set by train_heads from cfg.precision)

    def logits(self, feature: str, x: torch.Tensor) -> torch.Tensor:
        """(B, H_f, C) logits of the heads reading ``feature``: one ``x @ W_f + b_f``."""
        out = torch.addmm(self.bias[feature], x, self.weight[feature])
        return out.view(len(x), -1, self.num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(H, B, C) logits of every head, in ``specs`` order."""
        outs = [self.logits(f, feats[f]).transpose(0, 1) for f in self.groups]
        return torch.cat(outs)[self.restore]

    def column_lrs(self, specs_lr: list[float]) -> dict[str, torch.Tensor]:
        """Per-column learning rate of every variant's weight (each head's lr over its C columns)."""
        return {
            f: torch.tensor([specs_lr[i] for i in idx], dtype=torch.float32)
            .repeat_interleave(self.num_classes)
            .to(self.weight[f].device)
            for f, idx in self.groups.items()
        }


@torch.no_grad()
def heads_gradients(
    model: LinearHeads, feats: dict[str, torch.Tensor], y: torch.Tensor, bf16: bool = False
) -> float:
    """Set every weight's and bias's ``.grad`` for the loss ``sum over heads of the batch-mean
    cross-entropy`` (each head's gradient is its own), and return that loss.

    Written out instead of autograd: logits ``x @ W + b`` (one matmul per feature variant),
    softmax minus one-hot in place, weight gradient ``x.T @ dlogits`` (one matmul); the
    ``.grad`` buffers are reused. ``bf16`` runs both matmuls in bfloat16 as autocast would.
    """
    low = (lambda t: t.bfloat16()) if bf16 else (lambda t: t)
    batch, loss = len(y), 0.0
    for f, idx in model.groups.items():
        x, weight, bias = feats[f], model.weight[f], model.bias[f]
        if bf16:
            z = torch.addmm(low(bias), low(x), low(weight)).float()
        else:  # into a kept buffer: no fresh (B, H_f x C) allocation every step
            size = (batch, weight.shape[1])
            if model.scratch.get(f) is None or model.scratch[f].shape[0] < batch:
                model.scratch[f] = torch.empty(size, device=x.device)
            z = torch.addmm(bias, x, weight, out=model.scratch[f][:batch])
        heads = z.view(batch, len(idx), model.num_classes)
        lse = heads.logsumexp(2, keepdim=True)
        target = y.view(-1, 1, 1).expand(-1, len(idx), 1)
        loss += float((lse - heads.gather(2, target)).sum()) / batch
        heads.sub_(lse).exp_()  # softmax
        heads.scatter_add_(2, target, torch.full_like(lse, -1.0)).div_(batch)
        if weight.grad is None:
            weight.grad, bias.grad = torch.empty_like(weight), torch.empty_like(bias)
        if bf16:
            weight.grad.copy_(torch.mm(low(x).T, low(z)))
        else:
            torch.mm(x.T, z, out=weight.grad)
        torch.sum(z, 0, out=bias.grad)
    return loss


class HeadsSGD:
    """SGD with momentum and weight decay (``torch.optim.SGD``'s update) over the heads' flat
    weights, with a per-column learning rate: each head keeps its own lr, in one update."""

    def __init__(self, model: LinearHeads, momentum: float, weight_decay: float) -> None:
        self.model, self.momentum, self.weight_decay = model, momentum, weight_decay
        self.lrs = model.column_lrs([s.lr for s in model.specs])
        self.buffers: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, factor: float) -> None:
        """One update with every head's lr scaled by ``factor`` (the schedule)."""
        for f in self.model.groups:
            for p in (self.model.weight[f], self.model.bias[f]):
                grad = p.grad if not self.weight_decay else p.grad.add(p, alpha=self.weight_decay)
                buf = self.buffers.get(id(p))
                if buf is None:
                    buf = self.buffers[id(p)] = grad.clone()
                else:
                    buf.mul_(self.momentum).add_(grad)
                p.addcmul_(buf, self.lrs[f], value=-factor)

    def named_buffers(self) -> dict[str, torch.Tensor]:
        """The momentum buffers by parameter name (``weight.<variant>``, ``bias.<variant>``)."""
        named = {}
        for f in self.model.groups:
            for kind, p in (("weight", self.model.weight[f]), ("bias", self.model.bias[f])):
                if id(p) in self.buffers:
                    named[f"{kind}.{f}"] = self.buffers[id(p)]
        return named

    def load_named_buffers(self, named: dict[str, torch.Tensor]) -> None:
        for f in self.model.groups:
            for kind, p in (("weight", self.model.weight[f]), ("bias", self.model.bias[f])):
                if f"{kind}.{f}" in named:
                    self.buffers[id(p)] = named[f"{kind}.{f}"].to(p.device)


@dataclass
class Position:
    """Where a heads training stands: ``epoch``, the first row ``start`` of that epoch's
    shuffled order still to train, the global ``step``, and the shuffling RNG's state at that
    epoch's start (the order is drawn again from it on resume)."""

    epoch: int = 0
    start: int = 0
    step: int = 0
    rng_state: dict | None = None


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` steps (``CosineAnnealingLR`` with eta_min 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def _check_known(features: list[str]) -> None:
    if not features:
        raise ConfigError(f"variants must name at least one of {', '.join(FEATURE_VARIANTS)}")
    unknown = [f for f in features if f not in FEATURE_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown feature variant(s) {unknown}; known: {list(FEATURE_VARIANTS)}")


def last_blocks_expected(fs: FeatureSet) -> int:
    """Blocks ``cls_last4`` reads: min(4, depth), or 4 when the depth is unknown."""
    depth = feature_layout(fs).get("num_blocks")
    return min(DEFAULT_LAST_BLOCKS, int(depth)) if depth else DEFAULT_LAST_BLOCKS


def unavailable_variants(fs: FeatureSet, features: list[str]) -> dict[str, str]:
    """Requested variants this encoder cannot have at all (no CLS token), with the reason."""
    layout = feature_layout(fs)
    reasons = {}
    if "cls_last4" in features and not layout.get("block_features", True):
        reasons["cls_last4"] = (
            "the encoder has no CLS token per block (pooled features only), so there is no "
            "CLS of the last blocks"
        )
    if "cls_patch" in features and not layout.get("cls_token", True):
        reasons["cls_patch"] = (
            "the encoder has no CLS token: its cls feature is already the pooled patch "
            "features, so [cls, mean patch] would repeat it"
        )
    return reasons


def usable_variants(fs: FeatureSet, features: list[str]) -> tuple[list[str], dict[str, str]]:
    """``(variants to train, {skipped variant: reason})`` for the encoder of ``fs``.

    Variants the encoder cannot have (:func:`unavailable_variants`) are skipped while another
    requested variant remains; requesting only such variants is a :class:`UserError`.
    """
    features = list(dict.fromkeys(features))
    _check_known(features)
    skipped = unavailable_variants(fs, features)
    used = [f for f in features if f not in skipped]
    if not used:
        why = "; ".join(f"{f}: {r}" for f, r in skipped.items())
        raise UserError(
            f"none of the requested feature variants {features} exists for this encoder ({why}); "
            "use variants=[cls]"
        )
    return used, skipped


def check_variants(fs: FeatureSet, features: list[str]) -> dict[str, int]:
    """Dimension of every requested feature variant of ``fs``; clear errors when one is missing."""
    _check_known(features)
    d = fs.cls.shape[1] if fs.cls.ndim == 2 else 0
    if d == 0:
        raise UserError(f"feature set has no CLS features (shape {fs.cls.shape})")
    unavailable = unavailable_variants(fs, features)
    if unavailable:
        why = "; ".join(f"{f}: {r}" for f, r in unavailable.items())
        raise UserError(f"feature variant(s) {list(unavailable)} not available: {why}")
    n = last_blocks_expected(fs)
    dims = {"cls": d, "cls_last4": n * d, "cls_patch": 2 * d}
    if "cls_last4" in features and (fs.cls_last_n.ndim != 2 or fs.cls_last_n.shape[1] != n * d):
        raise UserError(
            f"feature variant 'cls_last4' needs the CLS of the last min(4, depth) = {n} blocks "
            f"({n} x {d} = {n * d} columns in cls_last_n), got shape {fs.cls_last_n.shape}; "
            f"extract features with features.n_last_blocks unset (or n_last_blocks={n}) or drop "
            "'cls_last4' from variants"
        )
    if "cls_patch" in features and (fs.patch_mean.ndim != 2 or fs.patch_mean.shape[1] != d):
        raise UserError(
            f"feature variant 'cls_patch' needs patch_mean of shape (N, {d}), "
            f"got {fs.patch_mean.shape}; drop 'cls_patch' from variants"
        )
    return {f: dims[f] for f in features}


def resolve_variants(train: FeatureSet, test: FeatureSet, cfg: Any) -> tuple[Any, dict[str, Any]]:
    """``cfg`` restricted to the variants this encoder has, and the record of that choice.

    The record (``extra["variants"]``): ``requested``, ``used``, ``skipped`` (variant ->
    reason), ``cls`` (what the cls feature is) and ``cls_last4_blocks`` (blocks in
    ``cls_last4`` when used).
    """
    used, skipped = usable_variants(train, cfg.variants)
    for name, reason in skipped.items():
        log.info("linear: feature variant %s skipped: %s", name, reason)
    check_variants(train, used)
    check_variants(test, used)
    layout = feature_layout(train)
    record = {
        "requested": list(cfg.variants),
        "used": used,
        "skipped": skipped,
        "cls": layout["cls"],
        "cls_last4_blocks": last_blocks_expected(train) if "cls_last4" in used else None,
    }
    return dataclasses.replace(cfg, variants=used), record


def feature_batch(
    fs: FeatureSet, rows: np.ndarray, features: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """The requested feature variants of rows ``rows``, as float32 tensors on ``device``."""

    def rows_of(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a[rows], dtype=np.float32)).to(device)

    out: dict[str, torch.Tensor] = {}
    if {"cls", "cls_patch"} & set(features):
        out["cls"] = rows_of(fs.cls)
    if "cls_last4" in features:
        out["cls_last4"] = rows_of(fs.cls_last_n)
    if "cls_patch" in features:
        out["cls_patch"] = torch.cat([out["cls"], rows_of(fs.patch_mean)], dim=1)
    return out


def head_specs(cfg: LinearBaseConfig) -> list[HeadSpec]:
    """Every (feature variant, base lr) pair; lr = base_lr x batch_size / 256."""
    if not cfg.base_lrs or not all(math.isfinite(lr) and lr > 0 for lr in cfg.base_lrs):
        raise ConfigError(f"base_lrs must be a non-empty list of positive numbers: {cfg.base_lrs}")
    scale = cfg.batch_size / 256.0
    features = list(dict.fromkeys(cfg.variants))
    return [HeadSpec(f, float(lr), float(lr) * scale) for f in features for lr in cfg.base_lrs]


def _check_config(cfg: LinearBaseConfig) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise ConfigError("epochs, batch_size and eval_batch_size must be >= 1")


@torch.no_grad()
def evaluate_heads(
    model: LinearHeads,
    fs: FeatureSet,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and top-5 accuracy (percent) of every head on rows ``rows`` of ``fs``."""
    features = sorted({s.feature for s in model.specs})
    labels = torch.from_numpy(np.asarray(fs.labels, dtype=np.int64)[rows]).to(device)
    hits1 = torch.zeros(len(model.specs), dtype=torch.float64)
    hits5 = torch.zeros(len(model.specs), dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        y = labels[start : start + batch_size]
        feats = feature_batch(fs, rows[start : start + batch_size], features, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=model.bf16):
            logits = model(feats)
        top = logits.float().topk(min(5, logits.shape[2]), dim=2).indices  # (H, B, 5)
        hits1 += (top[:, :, 0] == y).sum(1).double().cpu()
        hits5 += (top == y[None, :, None]).any(2).sum(1).double().cpu()
    n = max(len(rows), 1)
    return (100.0 * hits1 / n).numpy(), (100.0 * hits5 / n).numpy()


def heads_precision(
    model: LinearHeads, dims: dict[str, int], cfg: LinearBaseConfig, device: torch.device
) -> str:
    """``cfg.precision`` for the heads' matmuls; ``auto`` times one training step of these
    heads (on random features of their shape) in fp32 and bf16 once per machine and shape
    and keeps the faster (:func:`ibot_bench.precision.choose_precision`)."""
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(
            f"precision {cfg.precision!r}: the linear heads run in auto, fp32 or bf16"
        )
    rows = min(cfg.batch_size, 256)  # the ratio, not the step, is what is measured
    gen = torch.Generator().manual_seed(0)
    feats = {f: torch.randn(rows, d, generator=gen).to(device) for f, d in dims.items()}
    y = torch.randint(0, model.num_classes, (rows,), generator=gen).to(device)
    key = {
        "work": "linear-heads",
        "dims": dict(sorted(dims.items())),
        "heads": {f: len(idx) for f, idx in sorted(model.groups.items())},
        "classes": model.num_classes,
        "rows": rows,
    }
    return choose_precision(
        device,
        cfg.precision,
        key,
        lambda p: heads_gradients(model, feats, y, bf16=p == "bf16"),
        log=log.info,
        every_rank=False,  # a frozen task: under torchrun only rank 0 trains the heads
        allowed=("fp32", "bf16"),
    )


def train_heads(
    fs: FeatureSet,
    rows: np.ndarray,
    specs: list[HeadSpec],
    num_classes: int,
    cfg: LinearBaseConfig,
    on_epoch: Callable[[int, LinearHeads], None] | None = None,
    views: LiveViews | None = None,
    checkpoint: Path | None = None,
    tracked: dict[str, Any] | None = None,
) -> LinearHeads:
    """Train all heads of ``specs`` together on rows ``rows`` of ``fs``.

    docs/protocols.md#linear-probe: SGD (momentum, weight decay from ``cfg``), every head with
    its own lr (:class:`HeadsSGD`), cosine decay to 0 per iteration, seeded shuffling; the
    heads of one feature variant run as one matmul (:class:`LinearHeads`).
    ``on_epoch(epoch, model)`` is called after every epoch. With ``cfg.augment`` the
    training features of each batch are computed live from augmented ``views``.
    ``checkpoint``: a file that keeps long runs resumable (:mod:`ibot_bench.resume_file`: saved every
    few minutes and on Ctrl-C / SIGTERM, restored by a rerun); ``tracked`` is the caller's
    mutable record of results (values: numbers, lists, tensors), saved and restored with it.
    """
    if cfg.augment and views is None:
        raise UserError("augment=true needs the encoder: run it as a task (ibot-bench eval)")
    source = views(fs) if cfg.augment else None
    device = resolve_device(cfg.device)
    dims = check_variants(fs, [s.feature for s in specs])
    model = LinearHeads(specs, dims, num_classes, cfg.seed).to(device)
    opt = HeadsSGD(model, cfg.momentum, cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    rng = np.random.default_rng(cfg.seed)
    labels = np.asarray(fs.labels, dtype=np.int64)
    features = sorted(dims)
    saver = _heads_checkpoint(checkpoint, specs, num_classes, rows, cfg)
    state = saver.load(log.info) if saver is not None else None
    if state is None:
        model.bf16, at = heads_precision(model, dims, cfg, device) == "bf16", Position()
    else:
        at = _restore(state, model, opt, source, tracked, rng)
        log.info("linear: resuming from %s at epoch %d, row %d", saver.path, at.epoch + 1, at.start)
    step = at.step
    with (
        StopRequests("linear probe") if saver is not None else contextlib.nullcontext() as stop,
        tqdm(total=total_steps, initial=step, desc="linear heads", unit="step", leave=False) as bar,
    ):
        for epoch in range(at.epoch, cfg.epochs):
            epoch_rng = rng.bit_generator.state
            perm = rng.permutation(rows)
            first = at.start if epoch == at.epoch else 0
            for start in range(first, len(perm), cfg.batch_size):
                batch = perm[start : start + cfg.batch_size]
                if source is None:
                    feats = feature_batch(fs, batch, features, device)
                else:
                    feats = {k: v.to(device) for k, v in source(batch).items() if k in features}
                y = torch.from_numpy(labels[batch]).to(device)
                # sum over heads of each head's batch-mean cross-entropy
                heads_gradients(model, feats, y, model.bf16)
                opt.step(cosine_factor(step, total_steps))
                step += 1
                bar.update()
                asked = stop is not None and stop.signal_name is not None
                if saver is not None and (asked or saver.due()):
                    where = Position(epoch, start + cfg.batch_size, step, epoch_rng)
                    saver.save(_heads_state(model, opt, source, tracked, where))
                    if asked:
                        raise TrainingInterrupted(
                            f"linear probe stopped by {stop.signal_name}; saved at epoch "
                            f"{epoch + 1}, row {start + len(batch)} of {len(perm)} in "
                            f"{saver.path}: rerun the same command to resume"
                        )
            if on_epoch is not None:
                on_epoch(epoch, model)
    if saver is not None:
        saver.finish()
    return model


def _heads_checkpoint(
    path: Path | None, specs: list[HeadSpec], num_classes: int, rows: np.ndarray, cfg: Any
) -> ResumeFile | None:
    """The checkpoint of this training at ``path`` (None: not resumable), named by what it
    trains: the heads, classes, training rows and schedule."""
    if path is None:
        return None
    signature = {
        "heads": [s.as_dict() for s in specs],
        "classes": num_classes,
        "rows": len(rows),  # which rows: the work folder is keyed by the data and config
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }
    return ResumeFile(path, signature, "linear")


def _restore(
    state: dict[str, Any],
    model: LinearHeads,
    opt: HeadsSGD,
    source: Any,
    tracked: dict[str, Any] | None,
    rng: np.random.Generator,
) -> Position:
    """Put a saved training state (:func:`_heads_state`) back; returns where it stood."""
    model.load_state_dict(state["heads"])
    opt.load_named_buffers(state["momentum"])
    model.bf16 = state["bf16"]
    if source is not None:
        source.set_state(state["views"])
    if tracked is not None:
        tracked.update(state["tracked"])
    at = Position(**state["position"])
    rng.bit_generator.state = at.rng_state
    return at


def _heads_state(
    model: LinearHeads,
    opt: HeadsSGD,
    source: Any,
    tracked: dict[str, Any] | None,
    position: Position,
) -> dict[str, Any]:
    return {
        "position": dataclasses.asdict(position),
        "heads": model.state_dict(),
        "momentum": opt.named_buffers(),
        "bf16": model.bf16,
        "views": source.get_state() if source is not None else None,
        "tracked": dict(tracked or {}),
    }


def _num_classes(train: FeatureSet, test: FeatureSet) -> int:
    return max(train.num_classes, int(train.labels.max()) + 1, int(test.labels.max()) + 1)


def _test_metrics(top1: float, top5: float, num_classes: int) -> dict[str, float]:
    metrics = {"top1": float(top1)}
    if num_classes >= 5:
        metrics["top5"] = float(top5)
    return metrics


def linear_probe(
    train: FeatureSet,
    test: FeatureSet,
    cfg: LinearConfig,
    views: LiveViews | None = None,
    work_dir: Path | None = None,
) -> tuple[dict[str, float], dict]:
    """Protocol ``linear``: choose the head on a held-out split, report it on ``test``.

    The validation split is stratified and deterministic (``val_fraction``, ``seed``); the
    chosen head has the best validation top-1 (ties: first in (feature, lr) order). Returns
    ``(metrics, extra)``; extra holds the chosen head and every head's validation score.
    Reused by ``semi`` as a plain function. ``work_dir``: where long runs keep their resume
    state (:func:`train_heads`).
    """
    _check_config(cfg)
    cfg, variants = resolve_variants(train, test, cfg)
    specs, num_classes = head_specs(cfg), _num_classes(train, test)
    fit_rows, val_rows = stratified_split(train.labels, cfg.val_fraction, cfg.seed)
    model = train_heads(
        train, fit_rows, specs, num_classes, cfg, views=views, checkpoint=_in(work_dir, "heads")
    )
    device = next(model.parameters()).device
    val1, _ = evaluate_heads(model, train, val_rows, cfg.eval_batch_size, device)
    best = int(np.argmax(val1))
    chosen = specs[best]
    log.info("linear: chose %s (val top-1 %.2f)", chosen, val1[best])
    if cfg.refit:
        all_rows = np.arange(len(train))
        refit = _in(work_dir, "refit")
        model = train_heads(
            train, all_rows, [chosen], num_classes, cfg, views=views, checkpoint=refit
        )
        best = 0
    test_rows = np.arange(len(test))
    top1, top5 = evaluate_heads(model, test, test_rows, cfg.eval_batch_size, device)
    extra = {
        "chosen_head": {**chosen.as_dict(), "val_top1": float(val1.max())},
        "heads": [{**s.as_dict(), "val_top1": float(v)} for s, v in zip(specs, val1)],
        "refit": cfg.refit,
        "precision": "bf16" if model.bf16 else "fp32",
        "num_train": len(fit_rows),
        "num_val": len(val_rows),
        "variants": variants,
    }
    return _test_metrics(top1[best], top5[best], num_classes), extra


def linear_probe_paper(
    train: FeatureSet,
    test: FeatureSet,
    cfg: LinearPaperConfig,
    views: LiveViews | None = None,
    work_dir: Path | None = None,
) -> tuple[dict[str, float], dict]:
    """Protocol ``linear-paper``: max over heads and epochs of the test top-1 (reference).

    All heads train on all training features; every ``eval_every`` epochs (and after the
    last) every head is evaluated on ``test``. ``top5`` is the top-5 of the (head, epoch)
    with the best top-1.
    """
    _check_config(cfg)
    if cfg.eval_every < 1:
        raise ConfigError(f"eval_every must be >= 1, got {cfg.eval_every}")
    cfg, variants = resolve_variants(train, test, cfg)
    specs, num_classes = head_specs(cfg), _num_classes(train, test)
    test_rows = np.arange(len(test))
    # the best (head, epoch) and each head's best: saved and restored with the heads
    tracked: dict[str, Any] = {"best": {"top1": -1.0}, "per_head": [-1.0] * len(specs)}

    def on_epoch(epoch: int, model: LinearHeads) -> None:
        if (epoch + 1) % cfg.eval_every and epoch + 1 != cfg.epochs:
            return
        device = next(model.parameters()).device
        top1, top5 = evaluate_heads(model, test, test_rows, cfg.eval_batch_size, device)
        tracked["per_head"] = np.maximum(tracked["per_head"], top1).tolist()
        h = int(np.argmax(top1))
        if top1[h] > tracked["best"]["top1"]:
            tracked["best"] = {
                "top1": float(top1[h]),
                "top5": float(top5[h]),
                "head": h,
                "epoch": epoch + 1,
            }

    model = train_heads(
        train,
        np.arange(len(train)),
        specs,
        num_classes,
        cfg,
        on_epoch,
        views,
        checkpoint=_in(work_dir, "heads"),
        tracked=tracked,
    )
    best, per_head = tracked["best"], tracked["per_head"]
    extra = {
        "chosen_head": {**specs[best["head"]].as_dict(), "epoch": best["epoch"]},
        "heads": [{**s.as_dict(), "best_test_top1": float(v)} for s, v in zip(specs, per_head)],
        "selection": "max over heads and epochs on the test set (reference protocol)",
        "precision": "bf16" if model.bf16 else "fp32",
        "variants": variants,
    }
    return _test_metrics(best["top1"], best["top5"], num_classes), extra


def _in(work_dir: Path | None, name: str) -> Path | None:
    """The resume file ``name`` of a linear training in ``work_dir`` (None: not resumable)."""
    return None if work_dir is None else Path(work_dir) / f"linear_{name}.pth"


def variants_need(variants: list[str], features: Any = None) -> dict[str, int | None]:
    """Feature settings the linear ``variants`` need, given the user's ``features`` settings.

    ``cls_last4`` is the CLS of the last min(4, depth) blocks: ``n_last_blocks`` unset (None,
    resolved per encoder by the feature engine) gives it; an explicit value must be 4 (the
    paper's count), anything else is refused before any work.
    """
    if "cls_last4" not in variants:
        return {}
    explicit = getattr(features, "n_last_blocks", None) if features is not None else None
    return {"n_last_blocks": None if explicit is None else DEFAULT_LAST_BLOCKS}


def feature_needs(cfg: LinearBaseConfig) -> dict[str, int | None]:
    """What ``cfg.variants`` need (see :func:`variants_need`); ``cfg`` may carry ``features``."""
    return variants_need(cfg.variants, getattr(cfg, "features", None))


def log_skipped(ctx: TaskContext, extra: dict, task: str = "linear") -> None:
    """Tell the user which feature variants were skipped for this encoder, and why."""
    for name, reason in (extra.get("variants") or {}).get("skipped", {}).items():
        ctx.log(f"{task}: feature variant {name} skipped: {reason}")


@register_task("linear", LinearConfig, features=feature_needs)
def linear(ctx: TaskContext, cfg: LinearConfig) -> TaskOutput:
    """Linear probes, head chosen on a held-out split (docs/protocols.md#linear-probe)."""
    train, test = ctx.features("train"), ctx.features("val")
    metrics, extra = linear_probe(train, test, cfg, live_views(ctx, cfg), ctx.work_dir)
    log_skipped(ctx, extra)
    return TaskOutput(metrics=metrics, protocol=protocol_name("linear", cfg), extra=extra)


@register_task("linear-paper", LinearPaperConfig, features=feature_needs)
def linear_paper(ctx: TaskContext, cfg: LinearPaperConfig) -> TaskOutput:
    """Linear probes, max over heads and epochs on test as the reference (docs/protocols.md#linear-probe)."""
    train, test = ctx.features("train"), ctx.features("val")
    metrics, extra = linear_probe_paper(train, test, cfg, live_views(ctx, cfg), ctx.work_dir)
    log_skipped(ctx, extra, "linear-paper")
    return TaskOutput(metrics=metrics, protocol=protocol_name("linear-paper", cfg), extra=extra)


def protocol_name(base: str, cfg: LinearBaseConfig) -> str:
    """``-aug`` marks live augmented training features: numbers differ from the cached run."""
    return f"{base}-aug" if cfg.augment else base
