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

from ibot_bench.downstream.knn import KnnConfig, knn, knn_classify, top_m
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


def exact_formula(bank, bank_labels, queries, k, num_classes):
    """The documented formula in float64 numpy, independently: neighbours by (similarity desc,
    bank index asc), votes summed in neighbour order, classes by (score desc, class asc) among
    classes with votes. Returns the (Q, 5) ranked classes and the sorted similarities."""
    b = bank / np.linalg.norm(bank.astype(np.float64), axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    sims = q @ b.T
    ranked = np.full((len(q), 5), -1)
    top_sims = np.empty((len(q), min(k + 1, len(b))))
    for i, row in enumerate(sims):
        order = np.lexsort((np.arange(len(row)), -row))
        top_sims[i] = row[order[: top_sims.shape[1]]]
        scores = np.zeros(num_classes)
        for j in order[:k]:
            scores[bank_labels[j]] += np.exp(row[j] / T)
        voted = [c for c in np.lexsort((np.arange(num_classes), -scores)) if scores[c] > 0]
        ranked[i, : min(5, len(voted))] = voted[:5]
    return ranked, top_sims


def test_same_predictions_as_the_exact_formula_on_random_data():
    rng = np.random.default_rng(0)
    num_classes, ks = 12, [1, 3, 10, 20, 200, 5000]
    bank = rng.standard_normal((2000, 64), dtype=np.float32)
    labels = rng.integers(0, num_classes, len(bank))
    queries = rng.standard_normal((120, 64), dtype=np.float32)
    result = knn_classify(bank, labels, queries, ks, num_classes, T, chunk_size=37, device="cpu")
    assert result.k_effective[5000] == 2000
    for k in ks:
        expected, _ = exact_formula(bank, labels, queries, result.k_effective[k], num_classes)
        assert np.array_equal(result.top5[k], expected), k
        assert np.array_equal(result.top1[k], expected[:, 0]), k


def hard_case(rng):
    """Duplicate training vectors with different labels (equal similarities, also at the k
    boundary), near-duplicates closer than bf16 resolution, queries on the duplicates."""
    dim, classes = 16, 7
    base = rng.standard_normal((30, dim)).astype(np.float32)
    copies = np.repeat(base, rng.integers(1, 5, len(base)), axis=0)  # exact duplicates
    near = base[:, None] + 4e-3 * rng.standard_normal((30, 3, dim)).astype(np.float32)
    bank = np.concatenate([copies, near.reshape(-1, dim)])
    perm = rng.permutation(len(bank))
    bank = bank[perm]
    labels = rng.integers(0, classes, len(bank))
    queries = np.concatenate([base[:10], base[10:20] + 0.05 * rng.standard_normal((10, dim))])
    return bank, labels, queries.astype(np.float32), classes


def test_same_predictions_as_the_exact_formula_with_ties_and_near_duplicates():
    bank, labels, queries, classes = hard_case(np.random.default_rng(3))
    ks = [1, 2, 3, 4, 5, 7, 10, 25, len(bank) + 10]
    result = knn_classify(bank, labels, queries, ks, classes, T, chunk_size=7, device="cpu")
    assert result.k_effective[len(bank) + 10] == len(bank)
    boundary_ties = near_ties = 0
    for k in ks:
        k_eff = result.k_effective[k]
        expected, sims = exact_formula(bank, labels, queries, k_eff, classes)
        assert np.array_equal(result.top5[k], expected), k
        assert np.array_equal(result.top1[k], expected[:, 0]), k
        if k_eff < len(bank):
            gap = sims[:, k_eff - 1] - sims[:, k_eff]
            boundary_ties += int((gap == 0).sum())
            near_ties += int(((gap > 0) & (gap < 2.0**-8)).sum())  # below bf16 resolution
    assert boundary_ties > 0 and near_ties > 0  # the case is hard: the search must re-rank


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
    assert out.extra["search_device"] in ("cpu", "cuda")
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
    if not torch.cuda.is_available():
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


def test_more_equal_neighbours_than_candidates_are_searched_again():
    rng = np.random.default_rng(4)
    copies = np.ones((100, 8), np.float32)  # 100 equal vectors: more than the candidate margin
    bank = np.concatenate([rng.standard_normal((50, 8)).astype(np.float32), copies])
    labels = np.concatenate([np.zeros(50, np.int64), np.arange(100) % 5])
    labels[50:53] = [4, 3, 3]  # the three lowest-index copies decide k=3
    result = knn_classify(bank, labels, np.ones((1, 8), np.float32), [3], 5, device="cpu")
    assert result.researched > 0
    assert result.top5[3].tolist() == [[3, 4, -1, -1, -1]]


def test_bank_blocks_share_one_similarity_workspace(monkeypatch):
    """Several bank blocks (the last one shorter) and re-searched queries fill the one
    workspace of the run; predictions stay those of the exact formula."""
    monkeypatch.setattr("ibot_bench.downstream.knn.BANK_BLOCK", 300)
    bank, labels, queries, classes = hard_case(np.random.default_rng(5))
    bank = np.concatenate([bank] * 6)  # > 3 blocks, duplicates across blocks
    labels = np.concatenate([labels] * 6)
    result = knn_classify(bank, labels, queries, [3, 40], classes, T, chunk_size=8, device="cpu")
    assert len(bank) % 300 and len(bank) > 900
    for k in (3, 40):
        expected, _ = exact_formula(bank, labels, queries, k, classes)
        assert np.array_equal(result.top5[k], expected), k


def test_top_m_picks_the_same_values_as_topk():
    """The grouped selection (rows of >= 64 m columns) against torch's topk: the same
    multiset of values, at columns holding those values, with coarse bf16 values (many ties)
    and the largest values in the last, ungrouped columns."""
    gen = torch.Generator().manual_seed(0)
    sims = (torch.randn(40, 20_007, generator=gen) * 8).round().bfloat16() / 8
    sims[:5, -3:] = 100.0  # the tail columns (20,007 mod 16) hold the best values
    for m in (1, 40, 300):
        values, cols = top_m(sims, m)
        expected = sims.topk(m, dim=1).values
        assert torch.equal(values.sort(1, descending=True).values, expected), m
        assert torch.equal(sims.gather(1, cols), values), m
        assert all(len(set(row)) == m for row in cols.tolist())  # m distinct columns


def test_grouped_search_keeps_exact_predictions_on_a_large_bank():
    """A bank large enough for the grouped candidate selection, with duplicated rows and
    labels, still gives the exact formula's predictions."""
    rng = np.random.default_rng(6)
    base = rng.standard_normal((6_000, 12)).astype(np.float32)
    bank = np.concatenate([base, base[:2_000]])  # exact duplicates with other labels
    labels = rng.integers(0, 9, len(bank))
    queries = np.concatenate([base[:20], rng.standard_normal((20, 12)).astype(np.float32)])
    result = knn_classify(bank, labels, queries, [5, 20], 9, T, chunk_size=16, device="cpu")
    for k in (5, 20):
        expected, _ = exact_formula(bank, labels, queries, k, 9)
        assert np.array_equal(result.top5[k], expected), k
