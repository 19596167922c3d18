"""Training logs: JSON lines, optional TensorBoard, and the paper's per-epoch cluster monitor
(NMI / ARI / FMI of the teacher's CLS argmax against the labels, docs/protocols.md#loss)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ibot_bench.distributed import world


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


class ClusterMonitor:
    """Collects (teacher CLS argmax, student CLS argmax, label) per step; per epoch reports
    NMI/ARI/FMI against the labels and the teacher/student argmax agreement, over all ranks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._teacher: list[torch.Tensor] = []
        self._student: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, teacher_cls: torch.Tensor, student_cls: torch.Tensor, labels: torch.Tensor):
        self._teacher.append(teacher_cls.argmax(-1).cpu())
        self._student.append(student_cls.argmax(-1).cpu())
        self._labels.append(labels.cpu())

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
        return {
            "nmi": float(metrics.normalized_mutual_info_score(labels, teacher)),
            "ari": float(metrics.adjusted_rand_score(labels, teacher)),
            "fmi": float(metrics.fowlkes_mallows_score(labels, teacher)),
            "agreement": float((teacher == student).mean()),
            "teacher_clusters": int(len(np.unique(teacher))),
        }
