"""Clustering metrics and k-means (downstream/cluster.py; docs/protocols.md#clustering)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import feature_context
from sklearn import metrics as skm

from ibot_bench.downstream.cluster import (
    PROTOCOL_HEAD,
    PROTOCOL_KMEANS,
    ClusterConfig,
    cluster,
    cluster_head_metrics,
    clustering_metrics,
    hungarian_accuracy,
)
from ibot_bench.errors import UserError
from ibot_bench.features import FeatureSet
from ibot_bench.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    for k in (10, 7, 14):  # K == and != number of classes
        pred = np.where(rng.random(500) < 0.6, labels % k, rng.integers(0, k, 500))
        m = cluster_head_metrics(pred, labels)
        assert set(m) == {"nmi", "ami", "ari", "fmi", "acc"}
        expected = {
            "nmi": skm.normalized_mutual_info_score(labels, pred),
            "ami": skm.adjusted_mutual_info_score(labels, pred),
            "ari": skm.adjusted_rand_score(labels, pred),
            "fmi": skm.fowlkes_mallows_score(labels, pred),
        }
        for name, value in expected.items():
            assert abs(m[name] / 100 - value) < 1e-9, name


def test_acc_on_permuted_and_hand_computed_cases():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    permuted = np.array([2, 0, 1])[labels] + 5  # any renaming of the clusters
    assert hungarian_accuracy(permuted, labels) == 1.0
    assert clustering_metrics(permuted, labels)["acc"] == 100.0
    # clusters: A = {0,0,1}, B = {0,1}, C = {2,2,2,2}; best matching A->0, B->1, C->2: 2+1+4
    pred = np.array(["A", "A", "B", "A", "B", "C", "C", "C", "C"])
    assert hungarian_accuracy(pred, labels) == pytest.approx(7 / 9)
    # more clusters than classes: D is left unmatched and counts as wrong: 2+1+3 correct
    pred = np.array([0, 0, 1, 0, 1, 2, 2, 2, 3])
    assert hungarian_accuracy(pred, labels) == pytest.approx(6 / 9)
    # fewer clusters than classes: one cluster for everything -> the largest class
    assert hungarian_accuracy(np.zeros(9, int), labels) == pytest.approx(4 / 9)


def test_cluster_head_rejects_mismatched_lengths():
    with pytest.raises(UserError):
        cluster_head_metrics(np.zeros(5, int), np.zeros(6, int))
    assert PROTOCOL_HEAD == "cluster-head"


def blobs(n: int, num_classes: int = 5) -> FeatureSet:
    rng = np.random.default_rng(0)
    centers = np.eye(num_classes, 8) * 10
    y = rng.permutation(np.arange(n) % num_classes)
    x = (centers[y] + rng.standard_normal((n, 8))).astype(np.float32)
    return FeatureSet(
        x, x, np.tile(x, 4), y.astype(np.int64), [f"c{i}" for i in range(num_classes)]
    )


def test_kmeans_task_recovers_separated_blobs():
    test = blobs(200)
    out = cluster(feature_context(test, test), ClusterConfig(restarts=3))
    assert out.protocol == PROTOCOL_KMEANS == "cluster-kmeans"
    assert out.extra["k"] == 5 and out.extra["faiss_device"] in ("cpu", "gpu")
    assert out.metrics["acc"] == 100.0 and out.metrics["nmi"] == pytest.approx(100.0)
    again = cluster(feature_context(test, test), ClusterConfig(restarts=3))
    assert again.metrics == out.metrics
    more = cluster(feature_context(test, test), ClusterConfig(k=8, restarts=2))
    assert more.extra["k"] == 8 and more.metrics["acc"] <= 100.0
    with pytest.raises(UserError, match="clusters"):
        cluster(feature_context(test, blobs(4)), ClusterConfig())


def test_registered():
    assert TASKS.get("cluster").config_cls is ClusterConfig


def test_cluster_head_task_uses_the_checkpoint_head(tmp_path, tiny_imagefolder):
    import torch

    from ibot_bench.encoders import ProjectionHead, load_encoder
    from ibot_bench.errors import NotApplicableError
    from ibot_bench.features import FeatureConfig, extract_features
    from ibot_bench.tasks import discover_tasks

    backbone = load_encoder("random:vit_tiny_patch8").model.state_dict()
    torch.manual_seed(0)
    head = ProjectionHead([192, 64, 32], out_dim=3)
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"teacher": state, "student": state}, ckpt)

    cfg = FeatureConfig(img_size=32, num_workers=0, precision="fp32")
    data = f"imagefolder:{tiny_imagefolder}"
    feats = extract_features(f"ibot:{ckpt}", data, "val", cfg, progress=False)
    task = discover_tasks().get("cluster-head")
    out = task.fn(feature_context(feats, feats, f"ibot:{ckpt}", data), task.config_cls())
    with torch.inference_mode():
        expected = head(torch.from_numpy(np.asarray(feats.cls))).argmax(-1).numpy()
    assert out.protocol == "cluster-head"
    assert out.metrics == cluster_head_metrics(expected, feats.labels)

    plain = extract_features("random:vit_tiny_patch8", data, "val", cfg, progress=False)
    ctx = feature_context(plain, plain, "random:vit_tiny_patch8", data)
    with pytest.raises(NotApplicableError, match="no.*head|has none"):
        task.fn(ctx, task.config_cls())
