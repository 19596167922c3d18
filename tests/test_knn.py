"""kNN task (downstream/knn.py; docs/protocols.md#knn, docs/protocols.md#reference-subtleties)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import feature_context

from ibot_bench.downstream.knn import KnnConfig, knn, knn_classify, rank_classes
from ibot_bench.errors import ConfigError, UserError
from ibot_bench.features import FeatureSet
from ibot_bench.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
T = 0.07


def feature_set(x: np.ndarray, y: np.ndarray, num_classes: int) -> FeatureSet:
    x = np.asarray(x, dtype=np.float32)
    return FeatureSet(
        x, x, np.tile(x, 4), np.asarray(y, np.int64), [f"c{i}" for i in range(num_classes)]
    )


def brute_force(bank, bank_labels, queries, k, num_classes):
    """The same formula in plain torch (float64): scores, sorted similarities."""
    b = torch.nn.functional.normalize(torch.from_numpy(bank).double(), dim=1)
    q = torch.nn.functional.normalize(torch.from_numpy(queries).double(), dim=1)
    sims = q @ b.T
    top_sims, top_idx = sims.topk(min(k + 1, len(b)), dim=1)
    w = (top_sims[:, :k] / T).exp()
    scores = torch.zeros(len(q), num_classes, dtype=torch.float64)
    scores.scatter_add_(1, torch.from_numpy(bank_labels)[top_idx[:, :k]], w)
    return scores.numpy(), top_sims.numpy()


def test_same_predictions_as_brute_force_torch():
    rng = np.random.default_rng(0)
    num_classes, ks = 12, [1, 3, 10, 20, 200, 5000]
    bank = rng.standard_normal((2000, 64), dtype=np.float32)
    labels = rng.integers(0, num_classes, len(bank))
    queries = rng.standard_normal((300, 64), dtype=np.float32)
    result = knn_classify(bank, labels, queries, ks, num_classes, T, chunk_size=37, device="cpu")
    assert result.k_effective[5000] == 2000
    for k in ks:
        k_eff = result.k_effective[k]
        scores, sims = brute_force(bank, labels, queries, k_eff, num_classes)
        ordered = np.sort(scores, axis=1)[:, ::-1]
        # queries with a (near-)tie at the k-th neighbour or between ranked scores are left out
        neighbour_gap = sims[:, k_eff - 1] - sims[:, k_eff] if k_eff < len(bank) else np.inf
        score_gap = np.abs(np.diff(ordered[:, :6], axis=1)) / ordered[:, :1]
        clean = (neighbour_gap > 1e-5) & ((score_gap > 1e-6) | (ordered[:, 1:6] == 0)).all(1)
        assert clean.mean() > 0.95, k
        expected_top5 = rank_classes(scores)
        assert np.array_equal(result.top1[k][clean], scores.argmax(1)[clean]), k
        assert np.array_equal(result.top5[k][clean], expected_top5[clean]), k


def test_top5_counts_only_voted_classes_and_ties_go_to_lowest_index():
    bank = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)
    bank_labels = np.array([0, 1, 2, 1])
    query = np.array([[1, 0]], np.float32)
    r = knn_classify(bank, bank_labels, query, [1, 3], num_classes=3, device="cpu")
    assert r.top5[1].tolist() == [[0, -1, -1, -1, -1]]  # k=1 < 5: only the voted class
    assert r.top5[3].tolist() == [[0, 1, 2, -1, -1]]  # fewer than 5 classes
    tie = knn_classify(np.array([[1, 0], [1, 0]], np.float32), np.array([3, 1]), query, [2], 5)
    assert tie.top1[2].tolist() == [1]
    assert tie.top5[2].tolist() == [[1, 3, -1, -1, -1]]


def test_task_metrics_small_test_set_and_k_clipping():
    rng = np.random.default_rng(1)
    means = rng.standard_normal((3, 16)) * 3
    y_train, y_test = np.arange(60) % 3, np.arange(7) % 3  # 7 test samples (< 100), 3 classes
    train = feature_set(means[y_train] + rng.standard_normal((60, 16)), y_train, 3)
    test = feature_set(means[y_test] + rng.standard_normal((7, 16)), y_test, 3)
    out = knn(feature_context(train, test), KnnConfig(ks=[1, 2, 10, 500]))
    assert out.protocol == "knn"
    assert out.extra["faiss_device"] in ("cpu", "gpu")
    assert out.extra["k_effective"] == {"1": 1, "2": 2, "10": 10, "500": 60}
    expected = {f"top{t}_k{k}" for t in (1, 5) for k in (1, 2, 10, 60)} | {  # 500 -> used 60
        "top1",
        "top5",
        "best_k",
    }
    assert set(out.metrics) == expected
    assert out.metrics["top1"] == 100.0 and out.metrics["best_k"] == 1.0
    assert out.metrics["top5"] == out.metrics["top5_k1"]


def test_bad_settings_are_errors():
    x, y = np.ones((4, 3), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ConfigError):
        knn_classify(x, y, x, [], 1)
    with pytest.raises(ConfigError):
        knn_classify(x, y, x, [0, 5], 1)
    with pytest.raises(UserError):
        knn_classify(x, y, np.ones((2, 5), np.float32), [1], 1)
    with pytest.raises(UserError):
        knn_classify(x, y, np.full((2, 3), np.nan, np.float32), [1], 1)
    import faiss

    if faiss.get_num_gpus() == 0:
        with pytest.raises(UserError, match="gpu"):
            knn_classify(x, y, x, [1], 1, device="gpu")


def test_registered():
    assert TASKS.get("knn").config_cls is KnnConfig


MEMORY_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from ibot_bench.downstream.knn import knn_classify

    def hwm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    rng = np.random.default_rng(0)
    bank = rng.standard_normal((100_000, 384), dtype=np.float32)
    labels = rng.integers(0, 1000, len(bank))
    queries = rng.standard_normal((100, 384), dtype=np.float32)
    before = hwm_kb()
    r = knn_classify(bank, labels, queries, [10, 20, 100, 200], 1000, chunk_size=32)
    assert r.top1[200].shape == (100,)
    print((hwm_kb() - before) * 1024)
    """
)


def test_100k_bank_stays_under_2gb_extra_memory():
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    extra_bytes = int(proc.stdout.split()[-1])
    assert extra_bytes < 2 * 1024**3, extra_bytes
