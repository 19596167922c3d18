"""Training logs: JSON lines, optional TensorBoard, the paper's per-epoch cluster monitor
(NMI / ARI / FMI of the teacher's CLS argmax against the labels, docs/protocols.md#loss), the
collapse monitor (entropy of the teacher's CLS output and the number of prototypes its argmax
uses, per epoch, with a warning near the uniform output) and a cheap kNN probe of the teacher.

Why: a CLS head drifting to the uniform output looks like a converging loss (it settles near
ln(out_dim)); only the entropies and the cluster count tell the two apart
(docs/protocols.md#small-scale-runs).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ibot_bench.data.classification import (
    ClassificationSplit,
    EvalTransform,
    normalize_batch,
    read_for_training,
)
from ibot_bench.distributed import world
from ibot_bench.pretrain.augment import RESUME_NOTE


class JsonlLog:
    """Appends one JSON object per line (resumed runs continue the same file)."""

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                print(
                    "[pretrain] tensorboard=true but the tensorboard package is not installed "
                    "(pip install tensorboard); logging to JSON lines only",
                    file=sys.stderr,
                )

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "iter"):
                    self._tb.add_scalar(f"{record.get('type', 'train')}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of ``probs``."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


@torch.no_grad()
def output_stats(logits: torch.Tensor, center: torch.Tensor | float, temp: float) -> torch.Tensor:
    """(mean per-sample entropy, entropy of the batch-mean distribution) of
    softmax((logits - center) / temp): both near ln(K) is the uniform collapse, both near 0
    the one-prototype collapse; a healthy head has a low first and a high second value."""
    probs = torch.softmax((logits.float() - center) / temp, dim=-1)
    return torch.stack([entropy(probs).mean(), entropy(probs.mean(0))])


class ClusterMonitor:
    """Collects (teacher CLS argmax, student CLS argmax, label) and the output entropies per
    step; per epoch reports NMI/ARI/FMI against the labels, the teacher/student argmax
    agreement, the clusters the teacher's argmax uses and the mean entropies (over all ranks).

    Entropies: teacher = softmax((z_t - c) / tau_t) with the center after the step's update,
    student = softmax(z_s / tau_s) of the first global view."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._teacher: list[torch.Tensor] = []
        self._student: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._stats: list[torch.Tensor] = []

    @torch.no_grad()
    def update(
        self,
        teacher_cls: torch.Tensor,
        student_cls: torch.Tensor,
        labels: torch.Tensor,
        center: torch.Tensor | float = 0.0,
        teacher_temp: float = 1.0,
        student_temp: float = 1.0,
    ) -> None:
        self._teacher.append(teacher_cls.argmax(-1).cpu())
        self._student.append(student_cls.argmax(-1).cpu())
        self._labels.append(labels.cpu())
        t = output_stats(teacher_cls, center, teacher_temp)
        s = output_stats(student_cls, 0.0, student_temp)
        self._stats.append(torch.cat([t, s]).cpu())

    def compute(self) -> dict[str, float]:
        from sklearn import metrics

        if not self._labels:
            return {}
        arrays = [torch.cat(x).numpy() for x in (self._teacher, self._student, self._labels)]
        if world()[1] > 1:
            gathered: list[Any] = [None] * world()[1]
            dist.all_gather_object(gathered, arrays)
            arrays = [np.concatenate([g[i] for g in gathered]) for i in range(3)]
        teacher, student, labels = arrays
        stats = torch.stack(self._stats).mean(0)
        if world()[1] > 1:
            dist.all_reduce(stats)
            stats /= world()[1]
        t_entropy, t_batch_entropy, s_entropy, s_batch_entropy = stats.tolist()
        return {
            "nmi": float(metrics.normalized_mutual_info_score(labels, teacher)),
            "ari": float(metrics.adjusted_rand_score(labels, teacher)),
            "fmi": float(metrics.fowlkes_mallows_score(labels, teacher)),
            "agreement": float((teacher == student).mean()),
            "teacher_clusters": int(len(np.unique(teacher))),
            "teacher_entropy": t_entropy,
            "teacher_batch_entropy": t_batch_entropy,
            "student_entropy": s_entropy,
            "student_batch_entropy": s_batch_entropy,
        }


def collapse_warning(teacher_entropy: float, out_dim: int, margin: float = 0.1) -> str | None:
    """The warning for a teacher whose mean CLS output entropy reached ln(out_dim) - margin
    (the uniform output: every image gets the same target), else None."""
    limit = math.log(out_dim) - margin
    if not teacher_entropy >= limit:
        return None
    return (
        f"[pretrain] WARNING: the CLS head collapsed to the uniform output (teacher entropy "
        f"{teacher_entropy:.2f} >= ln(head.out_dim={out_dim}) - {margin} = {limit:.2f}): every "
        "image gets the same target, so the CLS loss teaches nothing. In short runs the "
        "views the student cannot yet predict drive it: crops.local_number and "
        "crops.local_scale first (local crops of any size made a tiny run's head constant "
        "within an epoch), then crops.global_scale and crops.color_jitter; a lower "
        "loss.teacher_temp, a lower optim.lr with more optim.warmup_epochs, or a higher "
        "optim.momentum_teacher only delayed it there (docs/protocols.md#small-scale-runs)."
    )


def unstable_warning(loss: float, uniform: float, factor: float = 2.0) -> str | None:
    """The warning for a loss above ``factor`` x ``uniform``, the loss of a student whose
    output is uniform: predicting nothing costs less, so the updates are too large."""
    if not loss > factor * uniform:
        return None
    return (
        f"[pretrain] WARNING: the loss is {loss:.2f}, more than {factor:g}x the {uniform:.2f} "
        "of a uniform output: training is unstable. Lower optim.lr or raise "
        "optim.warmup_epochs, then rerun in a new output_dir (or resume with --force-resume)."
    )


class KnnProbe:
    """A cheap kNN monitor: leave-one-out top-1 (k nearest by cosine, votes weighted by
    exp(sim / 0.07), as the kNN task) of the teacher's CLS features on a fixed subset of the
    *training* images, resized and centre-cropped to the global crop size as evaluation does.
    ``skip`` says why it is off (a dataset with one class has no labels to probe)."""

    def __init__(
        self, data: ClassificationSplit, img_size: int, max_images: int, k: int = 20, seed: int = 0
    ) -> None:
        self.skip = ""
        if len(np.unique(data.labels)) < 2:
            self.skip = "the training data has a single class, so there are no labels to probe"
            return
        n = min(max_images, len(data))
        rows = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
        transform = EvalTransform.for_size(img_size)
        images = [read_for_training(data, int(i), "pretraining", RESUME_NOTE) for i in rows]
        self.images = torch.stack([transform(image) for image in images])
        self.labels = torch.as_tensor(data.labels[rows], dtype=torch.long)
        self.k = min(k, n - 1)

    @torch.no_grad()
    def __call__(self, backbone: torch.nn.Module, device: torch.device) -> float:
        """Top-1 in percent of ``backbone`` (a ``forward_tokens`` ViT, CLS token first)."""
        feats = [
            backbone.forward_tokens(normalize_batch(chunk.to(device)))[:, 0].float()
            for chunk in self.images.split(256)
        ]
        f = torch.nn.functional.normalize(torch.cat(feats), dim=1)
        sim = f @ f.T
        sim.fill_diagonal_(-math.inf)  # leave one out
        top, idx = sim.topk(self.k, dim=1)
        labels = self.labels.to(f.device)
        votes = torch.zeros(len(f), int(labels.max()) + 1, device=f.device)
        votes.scatter_add_(1, labels[idx], (top / 0.07).exp())
        return float((votes.argmax(1) == labels).float().mean()) * 100
