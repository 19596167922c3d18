"""``training.png``: a pretraining run at a glance, drawn from its ``log.jsonl``.

Six panels against the epoch: the losses (total, CLS, MIM, with ln(out_dim), the uniform
output's CLS loss), the learning rate, the teacher temperatures, the teacher/student CLS
output entropies, the clusters the teacher's argmax uses (with NMI against the labels) and
the kNN monitor of the teacher (its random init at epoch 0). Rewritten atomically after every
epoch, so it can be opened while the run trains; 1500 x 750 px.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from ibot_bench.io import atomic_write  # noqa: E402

SIZE_IN, DPI = (15.0, 7.5), 100  # 1500 x 750 px


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``; a half-written last line (a killed run) is dropped,
    and of records repeated by a resume the last one counts."""
    records: dict[tuple[str, Any], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = (
            rec.get("type", ""),
            rec.get("iter") if rec.get("type") == "train" else rec.get("epoch"),
        )
        records.pop(key, None)
        records[key] = rec
    return list(records.values())


def _series(records: list[dict[str, Any]], kind: str, key: str, x: str) -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in records if r.get("type") == kind and key in r and x in r]
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training(
    log_path: Path, out: Path, iters_per_epoch: int, out_dim: int, title: str, note: str = ""
) -> Path:
    """Draw ``log_path``'s run into ``out`` (PNG, written atomically); ``note`` (e.g. a time
    limit that cut the run, a collapse, a probe that is off) goes under the title in red."""
    recs = read_log(log_path)
    per_iter = [dict(r, x=(r["iter"] + 1) / iters_per_epoch) for r in recs if "iter" in r]
    per_epoch = [dict(r, x=r["epoch"] + 1) for r in recs if r.get("type") == "epoch"]
    init = [r for r in recs if r.get("type") == "init"]
    fig, axes = plt.subplots(2, 3, figsize=SIZE_IN, dpi=DPI)
    ax = axes[0, 0]
    for key in ("loss", "cls", "mim"):
        ax.plot(*_series(per_iter, "train", key, "x"), label=key, lw=0.8)
    ax.axhline(math.log(out_dim), color="grey", ls=":", label=f"ln {out_dim} (uniform)")
    ax.set_title("loss")
    ax = axes[0, 1]
    ax.plot(*_series(per_iter, "train", "lr", "x"), label="lr")
    ax.set_title("learning rate")
    ax = axes[0, 2]
    ax.plot(*_series(per_iter, "train", "teacher_temp", "x"), label="CLS")
    ax.plot(*_series(per_iter, "train", "teacher_patch_temp", "x"), label="patch")
    ax.set_title("teacher temperature")
    ax = axes[1, 0]
    for key, label in (
        ("teacher_entropy", "teacher, per image"),
        ("teacher_batch_entropy", "teacher, batch mean"),
        ("student_entropy", "student, per image"),
        ("student_batch_entropy", "student, batch mean"),
    ):
        ls = "--" if "batch" in key else "-"
        ax.plot(*_series(per_epoch, "epoch", key, "x"), ls=ls, marker="o", ms=3, label=label)
    ax.axhline(math.log(out_dim), color="grey", ls=":", label="uniform")
    ax.axhline(math.log(out_dim) - 0.1, color="red", ls=":", lw=0.8, label="collapse warning")
    ax.set_title(
        "CLS output entropy (nats)\nper image = batch mean: a constant output", fontsize=10
    )
    ax = axes[1, 1]
    ax.plot(
        *_series(per_epoch, "epoch", "teacher_clusters", "x"), marker="o", ms=3, label="clusters"
    )
    ax.set_title("prototypes used by the teacher's argmax")
    nmi = _series(per_epoch, "epoch", "nmi", "x")
    if nmi[0]:
        twin = ax.twinx()
        twin.plot(*nmi, color="C1", marker="s", ms=3, label="NMI vs labels")
        twin.set_ylim(0, 1)
        twin.legend(loc="lower right", fontsize=8)
    ax = axes[1, 2]
    xs, ys = _series(per_epoch, "epoch", "knn_top1", "x")
    if init and "knn_top1" in init[-1]:
        xs, ys = [0, *xs], [init[-1]["knn_top1"], *ys]
        ax.axhline(init[-1]["knn_top1"], color="grey", ls=":", label="random init")
    ax.plot(xs, ys, marker="o", ms=3, label="teacher")
    student = _series(per_epoch, "epoch", "knn_student_top1", "x")
    if student[0]:
        ax.plot(*student, marker="s", ms=3, color="C2", label="student")
    ax.set_title("kNN top-1 (%), leave-one-out on training images")
    if not xs:
        ax.text(0.5, 0.5, "kNN monitor off", ha="center", va="center", transform=ax.transAxes)
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    if note:
        fig.text(0.5, 0.93, note, ha="center", color="red", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        plt.close(fig)
