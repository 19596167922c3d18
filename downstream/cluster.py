"""Unsupervised classification: clustering frozen features, scored against the labels.

docs/protocols.md#clustering. Two protocols:

- ``cluster-kmeans`` (the task ``cluster``): faiss k-means on the L2-normalised final CLS
  of the test split, K = number of classes (or ``k``), best of ``restarts`` runs; works for
  any encoder.
- ``cluster-head``: the paper's: cluster = argmax of the teacher head's output on the CLS
  token (a model pretrained with out_dim = number of classes). The runner computes the
  argmax and calls :func:`cluster_head_metrics`.

Metrics (percent, like the paper's table): ``nmi``, ``ami``, ``ari``, ``fmi`` from
scikit-learn and ``acc``, the accuracy under the best one-to-one cluster -> class matching
(Hungarian algorithm, scipy). With K > classes the unmatched clusters count as wrong;
with K < classes the unmatched classes do. Predictions are scored on the whole split at
once (the reference scored per-rank shards, so its ARI/FMI drifted with world size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

from ibot_bench.encoders import build_head
from ibot_bench.errors import ConfigError, NotApplicableError, UserError
from ibot_bench.faiss_device import faiss_device
from ibot_bench.features import cls_feature
from ibot_bench.tasks import TaskContext, TaskOutput, register_task

log = logging.getLogger(__name__)

PROTOCOL_KMEANS = "cluster-kmeans"
PROTOCOL_HEAD = "cluster-head"


@dataclass
class ClusterConfig:
    """Settings of k-means clustering (docs/protocols.md#clustering)."""

    k: int = 0  # number of clusters; 0 = number of classes
    restarts: int = 10  # faiss nredo: the run with the lowest objective is kept
    niter: int = 100
    spherical: bool = False  # renormalise centroids after each iteration
    seed: int = 0
    device: str = "auto"  # auto | cpu | gpu (faiss)


def hungarian_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples correct under the best one-to-one matching of clusters to classes.

    Uses scipy's ``linear_sum_assignment`` on the contingency table; K need not equal the
    number of classes.
    """
    table = skm.cluster.contingency_matrix(labels, pred)  # (classes, clusters)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum()) / len(labels)


def clustering_metrics(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``nmi``, ``ami``, ``ari``, ``fmi``, ``acc`` in percent (docs/protocols.md#clustering)."""
    pred, labels = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    if len(pred) != len(labels):
        raise UserError(f"{len(pred)} cluster assignments for {len(labels)} labels")
    if len(labels) == 0:
        raise UserError("cannot score an empty clustering")
    scores = {
        "nmi": skm.normalized_mutual_info_score(labels, pred),
        "ami": skm.adjusted_mutual_info_score(labels, pred),
        "ari": skm.adjusted_rand_score(labels, pred),
        "fmi": skm.fowlkes_mallows_score(labels, pred),
        "acc": hungarian_accuracy(pred, labels),
    }
    return {name: 100.0 * float(v) for name, v in scores.items()}


def cluster_head_metrics(head_argmax: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Protocol ``cluster-head`` (docs/protocols.md#clustering): score the teacher head's CLS argmax.

    ``head_argmax`` (N,) and ``labels`` (N,) must cover the whole split, gathered in the
    same order. Returns the metrics of :func:`clustering_metrics`.
    """
    return clustering_metrics(head_argmax, labels)


def kmeans_assign(x: np.ndarray, k: int, cfg: ClusterConfig) -> tuple[np.ndarray, bool]:
    """faiss k-means of the L2-normalised rows of ``x``: (cluster per row, ran on GPU)."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise UserError("features contain NaN or inf; the encoder produced invalid outputs")
    x = np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    if not 1 <= k <= len(x):
        raise UserError(f"cannot make {k} clusters of {len(x)} images")
    if cfg.restarts < 1 or cfg.niter < 1:
        raise ConfigError("restarts and niter must be >= 1")
    gpu = faiss_device(cfg.device) == "gpu"
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=cfg.niter,
        nredo=cfg.restarts,
        seed=cfg.seed,
        spherical=cfg.spherical,
        gpu=gpu,
        verbose=False,
        min_points_per_centroid=1,  # no warning for small splits
        max_points_per_centroid=len(x),  # use every point, no subsampling
    )
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    return assign[:, 0].astype(np.int64), gpu


@register_task("cluster", ClusterConfig)
def cluster(ctx: TaskContext, cfg: ClusterConfig) -> TaskOutput:
    """k-means on the test split's L2-normalised CLS vs its labels (docs/protocols.md#clustering)."""
    if cfg.k < 0:
        raise ConfigError(f"k must be >= 0 (0 = number of classes), got {cfg.k}")
    test = ctx.features("val")
    num_classes = max(test.num_classes, len(np.unique(test.labels)))
    k = cfg.k or num_classes
    pred, gpu = kmeans_assign(test.cls, k, cfg)
    log.info(
        "cluster: k-means K=%d on %d images, faiss on %s", k, len(pred), "gpu" if gpu else "cpu"
    )
    extra = {
        "k": k,
        "faiss_device": "gpu" if gpu else "cpu",
        "num_images": len(pred),
        "feature": cls_feature(test),
    }
    return TaskOutput(clustering_metrics(pred, test.labels), PROTOCOL_KMEANS, extra)


@dataclass
class ClusterHeadConfig:
    """Settings of the ``cluster-head`` protocol (nothing to tune: the head decides)."""

    batch_size: int = 4096  # CLS features pushed through the head at once


@register_task("cluster-head", ClusterHeadConfig)
def cluster_head(ctx: TaskContext, cfg: ClusterHeadConfig) -> TaskOutput:
    """The paper's clustering: argmax of the teacher head's CLS output (docs/protocols.md#clustering).

    Needs an encoder whose checkpoint carries the iBOT/DINO projection head; for others
    the protocol is not applicable (use the ``cluster`` task, k-means, instead).
    """
    head_state = ctx.encoder().head_state
    if head_state is None:
        raise NotApplicableError(
            f"cluster-head needs a projection head, and encoder {ctx.encoder_spec!r} has none; "
            "use the cluster task (k-means) for this encoder"
        )
    test = ctx.features("val")
    head = build_head(head_state).eval()
    feats = torch.from_numpy(np.array(test.cls, dtype=np.float32))  # a copy: cache is read-only
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    with torch.inference_mode():
        logits = torch.cat([head(chunk) for chunk in feats.split(cfg.batch_size)])
    if not torch.isfinite(logits).all():
        raise UserError(
            f"the projection head of {ctx.encoder_spec!r} gives NaN or inf outputs: its weights "
            "are not finite (a diverged checkpoint?); use a finite checkpoint"
        )
    pred = logits.argmax(-1).numpy().astype(np.int64)
    extra = {"out_dim": int(head.last_layer.out_features), "clusters_used": int(len(set(pred)))}
    return TaskOutput(cluster_head_metrics(pred, test.labels), PROTOCOL_HEAD, extra)
