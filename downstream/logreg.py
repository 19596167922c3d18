"""Multinomial logistic regression on frozen features.

docs/protocols.md#logistic-regression (semi-supervised frozen protocol):
L2-normalised final CLS, multinomial logistic regression with an L2 penalty
(scikit-learn, lbfgs). Following DINOv2, the inverse regularisation strength C is chosen
on a stratified hold-out of ``val_fraction`` of the training features, then the model is
refit with that C on all training features and reported on the test set.

C grid (default): 12 values 10^-6 .. 10^5, a one-per-decade version of DINOv2's 45-point
grid 10^linspace(-6, 5, 45) (pass that grid via ``c_grid`` for the full sweep). The
reference's lambdas {0.01, 0.1, 1} (cyanure's ``lambda/2 |w|^2 + mean loss``) correspond to
C = 1 / (lambda * N) in scikit-learn's ``|w|^2 / 2 + C * sum loss``. The sweep runs in
ascending C with warm starts (the optimum is unique, so only speed changes).

Solved as DINOv2 does: float64 features, ``tol`` 1e-12 and at most 1,000 lbfgs iterations,
so a weakly regularised C runs all 1,000 (scikit-learn's default ``tol`` 1e-4 stopped
those fits far from their optimum: docs/protocols.md#logistic-regression). The normalised
features are centred on the training mean before fitting: the intercept is not penalised,
so the optimum is the same classifier, but lbfgs gets nearer to it in the same iterations
(the common part of every image's CLS no longer dominates the curvature). Small problems
run single-threaded (:func:`solver_threads`): faster there, and the same numbers on any
machine's core count.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ibot_bench.data.subsets import stratified_split
from ibot_bench.errors import ConfigError, UserError
from ibot_bench.features import FeatureSet, cls_feature
from ibot_bench.resume_file import ResumeFile
from ibot_bench.tasks import TaskContext, TaskOutput, register_task

log = logging.getLogger(__name__)

DEFAULT_C_GRID = [10.0**p for p in range(-6, 6)]
SINGLE_THREAD_WORK = 2e9  # multiply-adds per lbfgs evaluation (see solver_threads)


@dataclass
class LogregConfig:
    """Settings of the logistic-regression task (docs/protocols.md#logistic-regression)."""

    c_grid: list[float] = field(default_factory=lambda: list(DEFAULT_C_GRID))
    val_fraction: float = 0.1
    max_iter: int = 1000  # DINOv2's
    tol: float = 1e-12  # DINOv2's: lbfgs stops at max_iter or when it can make no progress
    seed: int = 0


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise UserError("features contain NaN or inf; the encoder produced invalid outputs")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _centre(fit: np.ndarray, *others: np.ndarray) -> None:
    """Subtract the mean of ``fit`` from ``fit`` and ``others``, in place (float64 copies of
    ImageNet-size features are large): the same classifier at the optimum, as the intercept
    is not penalised, and better conditioned for lbfgs."""
    mean = fit.mean(0)
    for a in (fit, *others):
        a -= mean


def solver_threads(x: np.ndarray, num_classes: int) -> int | None:
    """1 (single-threaded) for problems of at most :data:`SINGLE_THREAD_WORK` multiply-adds
    per lbfgs evaluation, else None (the default thread pools).

    On a 2-core CPU one thread was 1.6-10x faster up to 7.7e8 (thread start-up costs more
    than the work) and 2.7x slower at 1.5e10. A rule rather than a timing, because the thread
    count changes the rounding, and with it where lbfgs stops for a weakly regularised C:
    a rerun must give the same numbers.
    """
    return 1 if x.shape[0] * x.shape[1] * num_classes <= SINGLE_THREAD_WORK else None


def topk_accuracy(proba: np.ndarray, classes: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of ``labels`` among the ``k`` most probable of ``classes`` (ties: lowest column).

    A label the model never saw in training (not in ``classes``) counts as a miss.
    """
    top = classes[np.argsort(-proba, axis=1, kind="stable")[:, :k]]
    return 100.0 * float(np.mean((top == np.asarray(labels)[:, None]).any(1)))


def _fit(clf: LogisticRegression, x: np.ndarray, y: np.ndarray, threads: int | None) -> bool:
    """Fit ``clf`` under ``threads``; returns False when lbfgs used all of max_iter."""
    with threadpool_limits(limits=threads), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _check(cfg: LogregConfig, labels: np.ndarray) -> None:
    if not cfg.c_grid or any(c <= 0 for c in cfg.c_grid):
        raise ConfigError(f"c_grid must be a non-empty list of positive numbers: {cfg.c_grid}")
    if len(np.unique(labels)) < 2:
        raise UserError("logistic regression needs training images of at least 2 classes")


def select_c(
    x: np.ndarray,
    y: np.ndarray,
    cfg: LogregConfig,
    state: Path | None = None,
    threads: int | None = None,
) -> tuple[float, dict[float, float], bool]:
    """Best C of ``cfg.c_grid`` by top-1 on a stratified hold-out (ties: the smallest C),
    features centred on the fitted part's mean; ``threads``: see :func:`solver_threads`.

    Returns ``(best_c, {C: val_top1}, all_converged)``. ``state``: a file that keeps a long
    sweep resumable (:mod:`ibot_bench.resume_file`): the scores so far and the warm start
    are saved after a C when a few minutes have passed, and a rerun continues from them with
    the same results (lbfgs from the same warm start).
    """
    fit_rows, val_rows = stratified_split(y, cfg.val_fraction, cfg.seed)
    x_fit, x_val = x[fit_rows], x[val_rows]  # copies
    _centre(x_fit, x_val)
    y_fit, y_val = y[fit_rows], y[val_rows]
    clf = LogisticRegression(max_iter=cfg.max_iter, tol=cfg.tol, warm_start=True)
    saver = _sweep_file(state, x, y, cfg)
    saved = saver.load(log.info) if saver is not None else None
    scores: dict[float, float] = {}
    converged = True
    if saved is not None:
        scores = {float(c): v for c, v in saved["scores"]}
        converged = saved["converged"]
        clf.coef_, clf.intercept_ = saved["coef"].numpy(), saved["intercept"].numpy()
        clf.classes_ = saved["classes"].numpy()
        log.info("logreg: resuming the C sweep from %s after %d C values", state, len(scores))
    grid = sorted(cfg.c_grid)
    todo = [c for c in grid if c not in scores]
    for c in tqdm(todo, desc="logreg C sweep", total=len(grid), initial=len(scores), leave=False):
        clf.set_params(C=c)
        converged &= _fit(clf, x_fit, y_fit, threads)
        scores[c] = 100.0 * float(np.mean(clf.predict(x_val) == y_val))
        log.debug("logreg C=%g val top-1 %.2f", c, scores[c])
        if saver is not None and saver.due() and c != grid[-1]:
            saver.save(_sweep_state(clf, scores, converged))
    if saver is not None:
        saver.finish()
    best = max(scores, key=lambda c: (scores[c], -c))
    return best, scores, converged


def grid_edge(best: float, scores: dict[float, float]) -> str | None:
    """``"largest"`` / ``"smallest"`` when ``best`` is that end of a grid of several C values
    and scores above its neighbour (a plateau is not an edge: ties go to the smallest C)."""
    grid = sorted(scores)
    if len(grid) < 2 or best not in (grid[0], grid[-1]):
        return None
    inner = grid[-2] if best == grid[-1] else grid[1]
    if scores[best] <= scores[inner]:
        return None
    return "largest" if best == grid[-1] else "smallest"


def _sweep_file(
    path: Path | None, x: np.ndarray, y: np.ndarray, cfg: LogregConfig
) -> ResumeFile | None:
    """The resume file of this sweep (None: not resumable), named by its settings and data
    shape; the work folder it lives in is already keyed by the encoder, data and config."""
    if path is None:
        return None
    return ResumeFile(
        path, {"shape": list(x.shape), "classes": int(y.max()) + 1, **asdict(cfg)}, "logreg"
    )


def _sweep_state(
    clf: LogisticRegression, scores: dict[float, float], converged: bool
) -> dict[str, Any]:
    return {
        "scores": [[c, v] for c, v in scores.items()],
        "converged": converged,
        "coef": torch.from_numpy(clf.coef_),
        "intercept": torch.from_numpy(clf.intercept_),
        "classes": torch.from_numpy(clf.classes_),
    }


def logreg_eval(
    train: FeatureSet, test: FeatureSet, cfg: LogregConfig, work_dir: Path | None = None
) -> tuple[dict[str, float], dict]:
    """Logistic-regression core (docs/protocols.md#logistic-regression): ``(metrics, extra)``; reused by ``semi``.

    Metrics: ``top1`` and, with at least 5 classes, ``top5`` (percent). Extra: ``best_C``,
    the validation top-1 of every C, and whether lbfgs converged everywhere. ``work_dir``:
    where a long C sweep keeps its resume state (:func:`select_c`).
    """
    y = np.asarray(train.labels, dtype=np.int64)
    _check(cfg, y)
    x, x_test = _normalize(train.cls), _normalize(test.cls)
    state = None if work_dir is None else Path(work_dir) / "logreg_sweep.pth"
    threads = solver_threads(x, len(np.unique(y)))
    best_c, scores, converged = select_c(x, y, cfg, state, threads)
    clf = LogisticRegression(C=best_c, max_iter=cfg.max_iter, tol=cfg.tol)
    _centre(x, x_test)
    converged &= _fit(clf, x, y, threads)
    if not converged:  # expected with tol 1e-12 for weakly regularised C, as in DINOv2
        log.info("logreg: lbfgs ran all max_iter=%d iterations for some C", cfg.max_iter)
    log.info("logreg: best C %g (val top-1 %.2f)", best_c, scores[best_c])
    edge = grid_edge(best_c, scores)
    if edge:
        log.warning(
            "logreg: the best C (%g) is the %s of c_grid, so the optimum may lie beyond it; "
            "a c_grid that also holds %g would show it",
            best_c,
            edge,
            best_c * 100 if edge == "largest" else best_c / 100,
        )

    proba = clf.predict_proba(x_test)
    metrics = {"top1": topk_accuracy(proba, clf.classes_, test.labels, 1)}
    num_classes = max(test.num_classes, train.num_classes)
    if num_classes >= 5:
        metrics["top5"] = topk_accuracy(proba, clf.classes_, test.labels, 5)
    extra = {
        "best_C": best_c,
        "val_top1": {f"{c:g}": v for c, v in scores.items()},
        "converged": converged,
        "best_C_at_grid_edge": edge or False,
        "threads": threads or "default",
        "feature": cls_feature(train),
    }
    return metrics, extra


@register_task("logreg", LogregConfig)
def logreg(ctx: TaskContext, cfg: LogregConfig) -> TaskOutput:
    """Logistic regression on L2-normalised CLS, C chosen on a hold-out (docs/protocols.md#logistic-regression)."""
    metrics, extra = logreg_eval(ctx.features("train"), ctx.features("val"), cfg, ctx.work_dir)
    return TaskOutput(metrics=metrics, protocol="logreg", extra=extra)
