"""Weighted k-NN classification on frozen features.

docs/protocols.md#knn (the DINO protocol): the L2-normalised final CLS
of every test image is compared by cosine similarity with the training bank; each of the
top-k neighbours votes for its class with weight ``exp(sim / T)``, ``T = 0.07``; a class's
score is its summed weight. Top-1 / top-5 are reported for every k of ``ks`` and for the
best k.

The search is exact but cheap: a reduced-precision matmul (bf16 on CPUs where it is measured
faster than fp32, fp16 on CUDA) picks the ``max(k) + margin`` best candidates of every query,
which are re-ranked with fp32 similarities. A query keeps that answer only when its k-th
fp32 similarity is above every excluded candidate's approximate similarity plus a proven
bound on the reduced-precision error (:func:`error_bound`); otherwise it is searched again
with 4x the candidates, up to the whole bank. Predictions therefore equal those of the
exact fp32 formula (the fp32 similarity of the normalised vectors, one element-wise
product and sum per pair).

Differences from the reference (docs/protocols.md#reference-subtleties, last bullet), on purpose:

- One search at ``max(ks)`` serves every k, in query chunks of ``chunk_size`` and bank
  blocks of ``BANK_BLOCK`` rows, so memory stays bounded for 1.28M x 384 banks; any number
  of test samples works (the reference's chunk size was 0 below 100 samples).
- Neighbours with equal similarity are ordered by their bank index (lowest first), so the
  k-th neighbour is well defined.
- k larger than the bank is clipped to the bank size (the effective k is in ``extra``).
- Top-5 counts only classes that received votes: a query is a top-5 hit when its true
  class has a positive score and fewer than 5 classes rank ahead of it. Classes are
  ranked by score, ties broken by the lowest class index; this is deterministic and
  well defined for k < 5 and for fewer than 5 classes (the reference sorted zero-vote
  classes arbitrarily, or crashed for k < 5).
- The search runs in torch on ``device`` (``auto``: CUDA when available, else CPU); the
  device, the candidate-search dtype and the number of re-searched queries are logged and
  returned in ``extra`` (``search_device``, ``search_dtype``, ``researched``); asking for
  ``device: gpu`` without CUDA is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ibot_bench.errors import ConfigError, UserError
from ibot_bench.tasks import TaskContext, TaskOutput, register_task

if TYPE_CHECKING:
    from ibot_bench.features import FeatureSet

log = logging.getLogger(__name__)

BANK_BLOCK = 131072  # bank rows per candidate-search matmul (bounds the similarity block)
GROUP = 16  # column groups of top_m (the max pass is fast for 16 on CPU; 24 and 32 were not)
RERANK_ELEMS = 1 << 21  # gathered bank elements per exact re-ranking step
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}
_CPU_SEARCH_DTYPE: list[torch.dtype] = []  # measured once per process


@dataclass
class KnnConfig:
    """Settings of the kNN task (defaults: docs/protocols.md#knn)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    chunk_size: int = 1024  # test queries per search step
    device: str = "auto"  # auto | cpu | gpu (CUDA)


@dataclass
class KnnResult:
    """Predictions for every k: ``top1[k]`` (Q,) and ``top5[k]`` (Q, 5), -1 = no class."""

    ks: list[int]
    k_effective: dict[int, int]
    top1: dict[int, np.ndarray]
    top5: dict[int, np.ndarray]
    device: str
    search_dtype: str
    researched: int  # re-searches with more candidates (a query widened twice counts twice)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def l2_normalize(x: np.ndarray, eps: float = 1e-12, chunk: int = 16384) -> torch.Tensor:
    """Row-wise L2-normalised float32 CPU tensor of ``x`` (rows of norm < eps are divided by eps).

    Works ``chunk`` rows at a time, so the only large allocation is the output itself.
    """
    x = np.asarray(x)
    out = torch.empty(x.shape, dtype=torch.float32)
    for rows in _chunks(len(x), chunk):
        part = torch.as_tensor(np.array(x[rows], dtype=np.float32))  # a copy: x may be read-only
        norms = torch.linalg.vector_norm(part, dim=1)
        if not torch.isfinite(norms).all():
            raise UserError("features contain NaN or inf; the encoder produced invalid outputs")
        torch.div(part, norms.clamp_min(eps)[:, None], out=out[rows])
    return out


def search_device(requested: str = "auto") -> torch.device:
    """Where the search runs for ``requested`` in {auto, cpu, gpu}: CUDA or CPU, never silently."""
    if requested not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"device must be auto, cpu or gpu, got {requested!r}")
    has_gpu = torch.cuda.is_available()
    if requested == "gpu" and not has_gpu:
        raise UserError("device: gpu asked for, but torch sees no CUDA GPU (use device: cpu)")
    return torch.device("cuda" if requested != "cpu" and has_gpu else "cpu")


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def search_dtype(device: torch.device, dim: int) -> torch.dtype:
    """Candidate-search dtype: fp16 on CUDA; on CPU bf16 when a measured matmul is faster.

    The CPU choice times one bf16 and one fp32 (512, dim) x (dim, 16384) product, once per
    process; exactness never depends on it (candidates are re-ranked in fp32).
    """
    if device.type == "cuda":
        return torch.float16
    if not _CPU_SEARCH_DTYPE:
        a, b = torch.randn(512, dim), torch.randn(16384, dim)
        fp32 = _best_seconds(lambda: a @ b.T)
        a16, b16 = a.bfloat16(), b.bfloat16()
        bf16 = _best_seconds(lambda: a16 @ b16.T)
        _CPU_SEARCH_DTYPE.append(torch.bfloat16 if bf16 < fp32 else torch.float32)
        log.info("kNN: bf16 matmul %.2fx the speed of fp32 here", fp32 / bf16)
    return _CPU_SEARCH_DTYPE[0]


def residual_norm(x: torch.Tensor, dtype: torch.dtype, chunk: int = 16384) -> torch.Tensor:
    """Row norms of ``x - x.to(dtype)``: what rounding to ``dtype`` moved each row.

    The difference is exact in fp32 (a rounding residual); the norm's own rounding is far
    below the 0.1% slack of :func:`error_bound`.
    """
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for rows in _chunks(len(x), chunk):
        out[rows] = torch.linalg.vector_norm(x[rows] - x[rows].to(dtype).float(), dim=1).double()
    return out


def error_bound(
    dtype: torch.dtype,
    dim: int,
    query_residual: torch.Tensor,
    bank_residual: float,
    outside: torch.Tensor,
) -> torch.Tensor:
    """Per query, a bound on how far the fp32 similarity of any bank row whose ``dtype``
    similarity is at most ``outside`` can lie above ``outside``.

    With q~ = q + dq, b~ = b + db (unit q, b): |q.b - q~.b~| <= |dq| + |q~| max|db|
    (Cauchy-Schwarz, measured residuals); rounding the output to nearest moves a value by at
    most u |value|, so a rounded value <= ``outside`` came from one <= outside + u|outside|/(1-u);
    the fp32 accumulations of the search and of the re-ranking add at most ``dim`` x 2^-22
    together (generous for any summation order and truncating accumulators). CUDA matmuls
    run with fp16 reduced-precision reductions off (:func:`candidates`), so they accumulate
    in fp32.
    """
    u = UNIT_ROUNDOFF[dtype] if dtype != torch.float32 else 0.0
    inputs = query_residual + (1.0 + query_residual) * bank_residual
    output = u * outside.double().abs() / (1.0 - u) + 2.0**-24  # 2^-24: subnormal outputs
    return ((inputs + output) * 1.001 + dim * 2.0**-22).float()


def exact_similarities(
    bank: torch.Tensor, queries: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """(Q, M) fp32 similarities of ``queries`` with bank rows ``idx``: one element-wise product
    and sum per pair, so equal vectors get equal similarities wherever they sit."""
    q, m = idx.shape
    d = bank.shape[1]
    out = torch.empty(q, m, dtype=torch.float32, device=bank.device)
    rows = max(1, RERANK_ELEMS // max(m * d, 1))
    cols = min(m, max(1, RERANK_ELEMS // d))
    for r in range(0, q, rows):
        for c in range(0, m, cols):
            part = idx[r : r + rows, c : c + cols]
            vecs = bank.index_select(0, part.reshape(-1)).view(*part.shape, d)
            out[r : r + rows, c : c + cols] = (vecs * queries[r : r + rows, None]).sum(-1)
    return out


def similarity_workspace(bank_lp: torch.Tensor, queries: int) -> torch.Tensor:
    """A flat buffer for one (queries, bank block) similarity matrix, reused by every
    :func:`candidates` call of a run: allocating it afresh per query chunk costs page faults
    (about 20% of the bf16 matmul's time on a 2-core CPU for a 1024 x 100k block)."""
    return torch.empty(
        queries * min(len(bank_lp), BANK_BLOCK), dtype=bank_lp.dtype, device=bank_lp.device
    )


def top_m(sims: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` largest values of every row of ``sims`` and their columns (any order; among
    equal values any may be picked), as ``topk(m, sorted=False)`` but faster on CPUs.

    The row's columns are split into ``GROUP`` strided sets (column ``c`` in group
    ``c mod g``, ``g = cols // GROUP``) and the ``m`` groups with the largest maxima are
    kept: every value of the row's top m is at most its group's maximum and at least the
    m-th largest maximum, so its group is among the kept ones (or ties with one that is).
    The exact top m of those ``m x GROUP`` values (plus the last ``cols mod GROUP`` columns)
    is the answer. One max pass and two small top-k's instead of a top-k over the whole
    row: half the time of ``topk`` for m = 52 and two thirds for m = 300 over 100k bf16
    columns on a 2-core CPU. CUDA and short rows use ``topk`` itself.
    """
    rows, cols = sims.shape
    g = cols // GROUP
    if sims.device.type == "cuda" or g < 4 * m:
        return sims.topk(m, dim=1, sorted=False)
    maxima = sims[:, : g * GROUP].view(rows, GROUP, g).amax(1)
    groups = maxima.topk(m, dim=1, sorted=False).indices
    offsets = torch.arange(0, g * GROUP, g, device=sims.device)
    picked = (groups[:, :, None] + offsets).reshape(rows, -1)
    if g * GROUP < cols:
        tail = torch.arange(g * GROUP, cols, device=sims.device).expand(rows, -1)
        picked = torch.cat([picked, tail], 1)
    values, order = sims.gather(1, picked).topk(m, dim=1, sorted=False)
    return values, picked.gather(1, order)


def candidates(
    bank_lp: torch.Tensor,
    queries_lp: torch.Tensor,
    m: int,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``m`` best bank rows of every query by reduced-precision similarity, and
    an upper bound of the approximate similarity of every bank row left out (-inf if none).
    ``workspace`` (:func:`similarity_workspace`, at least as many queries) holds the
    similarities; without it they are allocated per call."""
    n = bank_lp.shape[0]
    if m >= n:
        idx = torch.arange(n, device=bank_lp.device).expand(len(queries_lp), n)
        return idx, torch.full((len(queries_lp),), -math.inf, device=bank_lp.device)
    vals, idxs = [], []
    matmul = torch.backends.cuda.matmul
    reduced = matmul.allow_fp16_reduced_precision_reduction
    for block in _chunks(n, BANK_BLOCK):
        matmul.allow_fp16_reduced_precision_reduction = False  # fp32 accumulation, bounded
        try:
            shape = (len(queries_lp), block.stop - block.start)
            out = None if workspace is None else workspace[: shape[0] * shape[1]].view(shape)
            sims = torch.matmul(queries_lp, bank_lp[block].T, out=out)
        finally:
            matmul.allow_fp16_reduced_precision_reduction = reduced
        v, i = top_m(sims, min(m, sims.shape[1]))
        vals.append(v.float())
        idxs.append(i + block.start)
    v, i = torch.cat(vals, 1), torch.cat(idxs, 1)
    if v.shape[1] > m:  # every row left out of a block is below m rows of that block
        v, pick = v.topk(m, dim=1, sorted=False)
        i = i.gather(1, pick)
    return i, v.amin(1)


def nearest(
    bank: torch.Tensor,
    bank_lp: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    bank_residual: float,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact top-``k`` (fp32 similarity desc, bank index asc) of every query: ``(sims, idx,
    researched)``; queries whose candidates do not provably hold the top-k are searched again
    with 4x the candidates (the whole bank at most). ``workspace``: see :func:`candidates`."""
    n = bank.shape[0]
    sims = torch.empty(len(queries), k, device=bank.device)
    idx = torch.empty(len(queries), k, dtype=torch.int64, device=bank.device)
    todo = torch.arange(len(queries), device=bank.device)
    m, researched = min(n, k + max(32, k // 2)), 0
    while len(todo):
        cand, outside = candidates(bank_lp, queries[todo].to(bank_lp.dtype), m, workspace)
        cand = cand.sort(1).values  # index order first: stable sort keeps it within equal sims
        exact = exact_similarities(bank, queries[todo], cand)
        exact, order = exact.sort(dim=1, descending=True, stable=True)
        residual = residual_norm(queries[todo], bank_lp.dtype)
        eps = error_bound(bank_lp.dtype, bank.shape[1], residual, bank_residual, outside)
        ok = (exact[:, k - 1] > outside + eps) | (m >= n)  # m >= n: nothing left out
        done = todo[ok]
        sims[done] = exact[ok, :k]
        idx[done] = cand.gather(1, order[:, :k])[ok]
        todo = todo[~ok]
        researched += len(todo)
        m = min(n, 4 * m)
    return sims, idx, researched


def vote(
    sims: torch.Tensor, labels: torch.Tensor, ks: list[int], temperature: float, num_classes: int
) -> dict[int, torch.Tensor]:
    """(Q, 5) best classes for every k of ``ks`` (sorted) from neighbours sorted by similarity.

    A class's score is its float64 summed ``exp(sim / T)``, accumulated in neighbour order
    (one running sum serves every k); ranked by score, ties by the lowest class index; -1
    where fewer than 5 classes have a positive score.
    """
    q = sims.shape[0]
    weights = (sims.double() / temperature).exp()
    scores = torch.zeros(q, num_classes, dtype=torch.float64, device=sims.device)
    ranked, done = {}, 0
    for k in ks:
        scores.scatter_add_(1, labels[:, done:k], weights[:, done:k])
        done = k
        lab = labels[:, :k].sort(1).values
        val, order = scores.gather(1, lab).sort(dim=1, descending=True, stable=True)
        lab = lab.gather(1, order)  # (score desc, class asc); a class's copies are adjacent
        first = torch.ones_like(lab, dtype=torch.bool)
        first[:, 1:] = lab[:, 1:] != lab[:, :-1]
        keep = first & (val > 0)
        rank = torch.where(keep, keep.cumsum(1) - 1, 5).clamp(max=5)
        out = torch.full((q, 6), -1, dtype=torch.int64, device=sims.device)
        out.scatter_(1, rank, torch.where(rank < 5, lab, -1))
        ranked[k] = out[:, :5]
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
    chunk_size: int = 1024,
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
    dev = search_device(device)
    bank_t = l2_normalize(bank).to(dev)
    dtype = search_dtype(dev, bank_t.shape[1])
    bank_lp = bank_t.to(dtype)
    bank_residual = float(residual_norm(bank_t, dtype).max())
    labels_t = torch.tensor(bank_labels, device=dev)  # a copy: the labels may be read-only
    log.info(
        "kNN: %d queries, bank %s, k_max %d, search on %s in %s (bank rounding <= %.2g)",
        len(queries),
        tuple(bank.shape),
        k_max,
        dev.type,
        str(dtype).removeprefix("torch."),
        bank_residual,
    )
    n_q = len(queries)
    top1 = {k: np.empty(n_q, dtype=np.int64) for k in ks}
    top5 = {k: np.empty((n_q, 5), dtype=np.int64) for k in ks}
    researched = 0
    workspace = similarity_workspace(bank_lp, min(chunk_size, n_q))
    for rows in _chunks(n_q, chunk_size):
        q = l2_normalize(queries[rows]).to(dev)
        sims, idx, again = nearest(bank_t, bank_lp, q, k_max, bank_residual, workspace)
        researched += again
        ranked = vote(sims, labels_t[idx], sorted(set(k_eff.values())), temperature, num_classes)
        for k in ks:
            top5[k][rows] = ranked[k_eff[k]].cpu().numpy()
            top1[k][rows] = top5[k][rows, 0]
    if researched:
        log.info("kNN: %d of %d queries searched again with more candidates", researched, n_q)
    return KnnResult(ks, k_eff, top1, top5, dev.type, str(dtype).removeprefix("torch."), researched)


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
        "search_device": result.device,
        "search_dtype": result.search_dtype,
        "researched": result.researched,
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
