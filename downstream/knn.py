"""Weighted k-NN classification on frozen features.

docs/protocols.md#knn (the DINO protocol): the L2-normalised final CLS
of every test image is compared by cosine similarity with the training bank; each of the
top-k neighbours votes for its class with weight ``exp(sim / T)``, ``T = 0.07``; a class's
score is its summed weight. Top-1 / top-5 are reported for every k of ``ks`` and for the
best k.

Differences from the reference (docs/protocols.md#reference-subtleties, last bullet), on purpose:

- One faiss search at ``max(ks)`` serves every k (neighbours come sorted), in query chunks
  of ``chunk_size`` so memory stays bounded for 1.28M x 384 banks; any number of test
  samples works (the reference's chunk size was 0 below 100 samples).
- k larger than the bank is clipped to the bank size (the effective k is in ``extra``).
- Top-5 counts only classes that received votes: a query is a top-5 hit when its true
  class has a positive score and fewer than 5 classes rank ahead of it. Classes are
  ranked by score, ties broken by the lowest class index; this is deterministic and
  well defined for k < 5 and for fewer than 5 classes (the reference sorted zero-vote
  classes arbitrarily, or crashed for k < 5).
- The faiss device (GPU when faiss has GPU support and a GPU, else CPU) is logged and
  returned as ``extra["faiss_device"]``; asking for ``device: gpu`` without one is an error,
  never a silent fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import faiss
import numpy as np

from ibot_bench.errors import ConfigError, UserError
from ibot_bench.faiss_device import faiss_device
from ibot_bench.tasks import TaskContext, TaskOutput, register_task

if TYPE_CHECKING:  # annotations only: the kNN core needs numpy and faiss, not torch
    from ibot_bench.features import FeatureSet

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  # faiss GPU flat indexes return at most 2048 neighbours
Searcher = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class KnnConfig:
    """Settings of the kNN task (defaults: docs/protocols.md#knn)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    chunk_size: int = 4096  # test queries per faiss search
    device: str = "auto"  # auto | cpu | gpu (faiss)


@dataclass
class KnnResult:
    """Predictions for every k: ``top1[k]`` (Q,) and ``top5[k]`` (Q, 5), -1 = no class."""

    ks: list[int]
    k_effective: dict[int, int]
    top1: dict[int, np.ndarray]
    top5: dict[int, np.ndarray]
    faiss_device: str


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def l2_normalize(x: np.ndarray, eps: float = 1e-12, chunk: int = 16384) -> np.ndarray:
    """Row-wise L2-normalised float32 copy of ``x`` (rows of norm < eps are divided by eps).

    Works ``chunk`` rows at a time, so the only large allocation is the output itself.
    """
    x = np.asarray(x)
    out = np.empty(x.shape, dtype=np.float32)
    for rows in _chunks(len(x), chunk):
        part = np.asarray(x[rows], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", part, part))
        if not np.isfinite(norms).all():
            raise UserError("features contain NaN or inf; the encoder produced invalid outputs")
        out[rows] = part / np.maximum(norms, eps)[:, None]
    return out


def _make_searcher(bank: np.ndarray, device: str) -> Searcher:
    """Inner-product top-k search over ``bank`` (rows already L2-normalised)."""
    if device == "gpu":
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, bank.shape[1])
        index.add(bank)

        def search_gpu(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            _ = res  # keep the GPU resources alive as long as the index
            return index.search(queries, k)

        return search_gpu

    def search_cpu(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # faiss.knn searches the array in place: no second copy of the bank in an index
        return faiss.knn(queries, bank, k, metric=faiss.METRIC_INNER_PRODUCT)

    return search_cpu


def class_scores(
    sims: np.ndarray, neighbor_labels: np.ndarray, temperature: float, num_classes: int
) -> np.ndarray:
    """(Q, C) float64 summed vote weights ``sum_j exp(sim_j / T)`` of the given neighbours."""
    q = sims.shape[0]
    weights = np.exp(sims.astype(np.float64) / temperature)
    flat = (np.arange(q)[:, None] * num_classes + neighbor_labels).ravel()
    votes = np.bincount(flat, weights=weights.ravel(), minlength=q * num_classes)
    return votes.reshape(q, num_classes)


def rank_classes(scores: np.ndarray, top: int = 5) -> np.ndarray:
    """(Q, top) best classes by score, ties by lowest class index; -1 where the score is 0."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    voted = np.take_along_axis(scores, order, axis=1) > 0
    ranked = np.full((scores.shape[0], top), -1, dtype=np.int64)
    ranked[:, : order.shape[1]] = np.where(voted, order, -1)
    return ranked


def _check_inputs(
    bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int
) -> None:
    if bank.ndim != 2 or len(bank) == 0:
        raise UserError(f"kNN needs a non-empty (N, D) training bank, got shape {bank.shape}")
    if len(bank_labels) != len(bank):
        raise UserError(f"{len(bank_labels)} labels for a bank of {len(bank)} features")
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        lo, hi = int(bank_labels.min()), int(bank_labels.max())
        raise UserError(f"training labels must lie in [0, {num_classes}), got {lo}..{hi}")
    if queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise UserError(
            f"test features {queries.shape} do not match the training bank {bank.shape}"
        )


def _check_config(ks: list[int], temperature: float, chunk_size: int) -> None:
    if not ks or any(int(k) < 1 for k in ks):
        raise ConfigError(f"ks must be a non-empty list of positive integers, got {ks}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")


def knn_classify(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    ks: list[int],
    num_classes: int,
    temperature: float = 0.07,
    chunk_size: int = 4096,
    device: str = "auto",
) -> KnnResult:
    """Weighted kNN predictions of ``queries`` for every k in ``ks`` from one search.

    docs/protocols.md#knn: cosine similarity on L2-normalised features (normalised
    here), votes ``exp(sim / temperature)`` summed per class. The search runs once at
    ``max(ks)`` clipped to the bank size, ``chunk_size`` queries at a time.
    """
    _check_config(ks, temperature, chunk_size)
    bank_labels = np.asarray(bank_labels, dtype=np.int64)
    _check_inputs(np.asarray(bank), bank_labels, np.asarray(queries), num_classes)
    ks = sorted({int(k) for k in ks})
    k_eff = {k: min(k, len(bank_labels)) for k in ks}
    k_max = max(k_eff.values())
    clamped = [k for k in ks if k_eff[k] != k]
    if clamped:
        log.warning(
            "kNN: k=%s larger than the bank of %d images: used k=%d (recorded as used)",
            clamped,
            len(bank_labels),
            len(bank_labels),
        )
    device = faiss_device(device)
    if device == "gpu" and k_max > GPU_MAX_K:
        raise ConfigError(f"faiss on GPU supports k <= {GPU_MAX_K}, got {k_max}")
    log.info(
        "kNN: %d queries, bank %s, k_max %d, faiss on %s", len(queries), bank.shape, k_max, device
    )

    search = _make_searcher(l2_normalize(bank), device)
    n_q = len(queries)
    top1 = {k: np.empty(n_q, dtype=np.int64) for k in ks}
    top5 = {k: np.empty((n_q, 5), dtype=np.int64) for k in ks}
    for rows in _chunks(n_q, chunk_size):
        sims, idx = search(l2_normalize(queries[rows]), k_max)
        neighbor_labels = bank_labels[idx]
        for k in ks:
            scores = class_scores(
                sims[:, : k_eff[k]], neighbor_labels[:, : k_eff[k]], temperature, num_classes
            )
            ranked = rank_classes(scores)
            top1[k][rows] = ranked[:, 0]
            top5[k][rows] = ranked
    return KnnResult(ks, k_eff, top1, top5, device)


def knn_metrics(result: KnnResult, labels: np.ndarray) -> dict[str, float]:
    """``top1_k{k}``, ``top5_k{k}`` (percent) for every k, plus best-k ``top1``/``top5``/``best_k``.

    Every k is the one actually used: a requested k larger than the bank is named by the
    bank size (``result.k_effective``). The best k is the one with the highest top-1 (ties:
    the smallest k); ``top5`` is the top-5 at that same k.
    """
    labels = np.asarray(labels, dtype=np.int64)
    metrics: dict[str, float] = {}
    used = {result.k_effective[k]: k for k in reversed(result.ks)}  # used k -> a requested k
    for k_used, k in sorted(used.items()):
        metrics[f"top1_k{k_used}"] = 100.0 * float(np.mean(result.top1[k] == labels))
        top5_hits = (result.top5[k] == labels[:, None]).any(1)
        metrics[f"top5_k{k_used}"] = 100.0 * float(np.mean(top5_hits))
    best_k = max(used, key=lambda k: (metrics[f"top1_k{k}"], -k))
    metrics.update(
        top1=metrics[f"top1_k{best_k}"], top5=metrics[f"top5_k{best_k}"], best_k=float(best_k)
    )
    return metrics


def knn_eval(train: FeatureSet, test: FeatureSet, cfg: KnnConfig) -> tuple[dict[str, float], dict]:
    """kNN core on two feature sets (final CLS): ``(metrics, extra)``; reused by ``semi``."""
    if len(test) == 0:
        raise UserError("kNN needs at least one test sample")
    num_classes = max(train.num_classes, int(train.labels.max()) + 1, int(test.labels.max()) + 1)
    result = knn_classify(
        train.cls,
        train.labels,
        test.cls,
        list(cfg.ks),
        num_classes,
        cfg.temperature,
        cfg.chunk_size,
        cfg.device,
    )
    extra = {
        "faiss_device": result.faiss_device,
        "k_effective": {str(k): v for k, v in result.k_effective.items()},
        "bank_size": len(train),
        "num_queries": len(test),
        "feature": {"variant": "cls", "source": train.layout["cls"]},
    }
    return knn_metrics(result, test.labels), extra


@register_task("knn", KnnConfig)
def knn(ctx: TaskContext, cfg: KnnConfig) -> TaskOutput:
    """Weighted k-NN on L2-normalised final CLS (docs/protocols.md#knn)."""
    metrics, extra = knn_eval(ctx.features("train"), ctx.features("val"), cfg)
    return TaskOutput(metrics=metrics, protocol="knn", extra=extra)
