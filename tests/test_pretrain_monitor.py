"""The pretraining monitors: CLS output entropies and the collapse warning, the kNN probe,
training.png, and a loud record when a safety limit cuts a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ibot_bench.config import load_config
from ibot_bench.data.classification import ClassificationSplit
from ibot_bench.pretrain.config import PretrainConfig
from ibot_bench.pretrain.monitor import (
    ClusterMonitor,
    KnnProbe,
    collapse_warning,
    output_stats,
    unstable_warning,
)
from ibot_bench.pretrain.plot import plot_training
from ibot_bench.pretrain.train import Trainer

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "smoke.yaml"
K = 64


def test_entropies_tell_uniform_from_peaked_outputs():
    uniform = output_stats(torch.zeros(32, K), 0.0, 0.1)
    assert torch.allclose(uniform, torch.full((2,), math.log(K)), atol=1e-5)
    # each image sharply on its own prototype: low per-image, high batch-mean entropy
    peaked = output_stats(torch.eye(K)[:32] * 10, 0.0, 0.1)
    assert peaked[0] < 0.01 and abs(peaked[1] - math.log(32)) < 0.01
    # the same prototype for every image: both low (the other collapse)
    one = output_stats(torch.eye(K)[[0] * 32] * 10, 0.0, 0.1)
    assert one.max() < 0.01
    # centering removes what every image shares
    shared = torch.eye(K)[:32] * 10 + torch.linspace(0, 50, K)
    assert torch.allclose(output_stats(shared, torch.linspace(0, 50, K), 0.1), peaked, atol=1e-4)


def test_cluster_monitor_reports_entropy_and_clusters_per_epoch():
    monitor = ClusterMonitor()
    labels = torch.arange(32) % 4
    teacher = torch.eye(K)[labels] * 10  # argmax = label: 4 clusters, NMI 1
    monitor.update(teacher, teacher, labels, torch.zeros(1, K), 0.1, 0.1)
    out = monitor.compute()
    assert out["teacher_clusters"] == 4 and out["nmi"] > 0.99 and out["agreement"] == 1.0
    assert out["teacher_entropy"] < 0.01 and abs(out["teacher_batch_entropy"] - math.log(4)) < 0.01
    monitor.reset()
    monitor.update(torch.zeros(32, K), torch.zeros(32, K), labels, 0.0, 0.04, 0.1)
    out = monitor.compute()
    assert out["teacher_entropy"] > math.log(K) - 1e-4
    assert collapse_warning(out["teacher_entropy"], K) is not None


def test_collapse_warning_only_near_uniform_and_names_the_settings():
    assert collapse_warning(math.log(K) - 0.5, K) is None
    assert collapse_warning(float("nan"), K) is None
    text = collapse_warning(math.log(K) - 0.05, K)
    assert text is not None and "WARNING" in text and f"head.out_dim={K}" in text
    for setting in (
        "crops.local_number",
        "crops.local_scale",
        "loss.teacher_temp",
        "optim.lr",
        "momentum_teacher",
    ):
        assert setting in text


def test_unstable_warning_only_far_above_the_uniform_loss():
    uniform = 2 * math.log(K)
    assert unstable_warning(1.9 * uniform, uniform) is None
    assert unstable_warning(float("nan"), uniform) is None  # NaN is the divergence stop's
    text = unstable_warning(2.5 * uniform, uniform)
    assert text is not None and "unstable" in text and "optim.lr" in text


class _Features(torch.nn.Module):
    """A 'backbone' whose CLS token is a fixed feature per image (keyed by its flat value)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        # normalised pixel -> back to the uint8 value that indexes the table
        idx = (x[:, 0, 0, 0] * 0.229 * 255 + 0.485 * 255).round().long()
        return self.table[idx].unsqueeze(1)


def _split(labels: np.ndarray) -> ClassificationSplit:
    arrays = np.zeros((len(labels), 8, 8, 3), np.uint8)
    arrays[:] = np.arange(len(labels))[:, None, None, None]  # flat: survives the resize
    names = [str(c) for c in range(labels.max() + 1)]
    return ClassificationSplit("crafted", "train", names, labels, arrays=arrays, default_img_size=8)


def test_knn_probe_scores_separable_features_high_and_noise_at_chance():
    labels = np.arange(60) % 3
    probe = KnnProbe(_split(labels), img_size=8, max_images=60, k=5)
    assert not probe.skip and len(probe.images) == 60
    separable = torch.eye(3)[labels] + 0.01 * torch.randn(60, 3)
    assert probe(_Features(separable), torch.device("cpu")) == 100.0
    noise = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    assert probe(_Features(noise), torch.device("cpu")) < 70.0
    assert len(KnnProbe(_split(labels), 8, 10).images) == 10  # a fixed subset
    assert KnnProbe(_split(np.zeros(10, int)), 8, 10).skip  # one class: nothing to probe


def _log(path: Path, epochs: int, per_epoch: int) -> None:
    lines = [{"type": "init", "epoch": -1, "knn_top1": 20.0}]
    for e in range(epochs):
        for i in range(per_epoch):
            it = e * per_epoch + i
            lines.append(
                {"type": "train", "epoch": e, "iter": it, "loss": 5.0 - it / 10, "cls": 3.0,
                 "mim": 2.0, "lr": 1e-4, "teacher_temp": 0.04, "teacher_patch_temp": 0.04}
            )  # fmt: skip
        lines.append(
            {"type": "epoch", "epoch": e, "teacher_entropy": 1.0, "teacher_batch_entropy": 3.0,
             "student_entropy": 2.0, "teacher_clusters": 10 + e, "nmi": 0.3, "knn_top1": 30.0 + e,
             "knn_student_top1": 31.0 + e}
        )  # fmt: skip
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"type": "tra')  # killed writer


def test_training_png_is_written_readable_and_at_most_1600_px(tmp_path):
    _log(tmp_path / "log.jsonl", epochs=3, per_epoch=4)
    out = plot_training(tmp_path / "log.jsonl", tmp_path / "training.png", 4, K, "t", "a note")
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG" and img.width <= 1600 and img.height > 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "training.png"]


def test_run_logs_monitors_draws_training_png_and_says_when_cut(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(
        PretrainConfig,
        SMOKE,
        [f"output_dir={out}", "threads=1", "optim.epochs=3", "max_iters=5", "save_every_iters=0"],
    )
    summary = Trainer(cfg).fit()
    assert summary["stopped_early"]
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    init = [r for r in lines if r["type"] == "init"]
    assert len(init) == 1 and 0 <= init[0]["knn_top1"] <= 100
    epochs = [r for r in lines if r["type"] == "epoch"]
    assert len(epochs) == 2
    for key in ("teacher_entropy", "teacher_batch_entropy", "teacher_clusters", "knn_top1"):
        assert key in epochs[0]
    assert 0 <= epochs[0]["knn_student_top1"] <= 100
    assert 0 <= epochs[0]["teacher_entropy"] <= math.log(cfg.head.out_dim) + 1e-4
    stopped = [r for r in lines if r["type"] == "stopped"]
    assert stopped and stopped[0]["reason"] == "max_iters" and stopped[0]["steps"] == 5
    assert "STOPPED EARLY by max_iters after 5 of 6 steps" in capsys.readouterr().err
    with Image.open(out / "training.png") as img:
        assert img.width <= 1600
