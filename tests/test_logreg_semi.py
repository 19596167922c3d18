"""Logistic regression, label subsets and the frozen semi-supervised task.

downstream/logreg.py, downstream/semi.py, ibot_bench/data/subsets.py
(docs/protocols.md#logistic-regression, docs/protocols.md#semi-supervised).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import feature_context, make_imagefolder
from sklearn.linear_model import LogisticRegression

import ibot_bench.downstream.logreg as logreg_mod
from ibot_bench.data.subsets import per_class_fraction, read_split_file, stratified_split
from ibot_bench.downstream.knn import KnnConfig
from ibot_bench.downstream.linear import LinearConfig
from ibot_bench.downstream.logreg import LogregConfig, grid_edge, logreg
from ibot_bench.downstream.semi import SemiConfig, protocol_name, semi
from ibot_bench.errors import ConfigError, UserError
from ibot_bench.features import FeatureSet
from ibot_bench.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def blobs(n: int, seed: int, num_classes: int = 6, dim: int = 16) -> FeatureSet:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(7).standard_normal((num_classes, dim)) * 1.5
    y = np.arange(n) % num_classes
    cls = (means[y] + rng.standard_normal((n, dim))).astype(np.float32)
    names = [f"n{i:08d}" for i in range(num_classes)]
    samples = [f"train/{names[c]}/{names[c]}_{i}.JPEG" for i, c in enumerate(y)]
    return FeatureSet(cls, cls, np.tile(cls, 4), y.astype(np.int64), names, samples)


TRAIN, TEST = blobs(600, seed=0), blobs(240, seed=1)
C_GRID = [0.01, 1.0, 100.0]


# --- logistic regression ---------------------------------------------------------------


def test_logreg_chooses_c_on_holdout_then_refits_on_all_train():
    out = logreg(feature_context(TRAIN, TEST), LogregConfig(c_grid=C_GRID))
    assert out.protocol == "logreg" and set(out.metrics) == {"top1", "top5"}
    assert out.metrics["top1"] > 85
    best = out.extra["best_C"]
    assert best in C_GRID and set(out.extra["val_top1"]) == {"0.01", "1", "100"}
    x = TRAIN.cls / np.linalg.norm(TRAIN.cls, axis=1, keepdims=True)
    x_test = TEST.cls / np.linalg.norm(TEST.cls, axis=1, keepdims=True)
    ref = LogisticRegression(C=best, max_iter=1000).fit(x, TRAIN.labels)
    assert out.metrics["top1"] == pytest.approx(100 * np.mean(ref.predict(x_test) == TEST.labels))


def test_logreg_reaches_the_optimum_when_every_feature_shares_a_large_part():
    """A trained CLS is mostly one vector shared by every image (cosine 0.999 on the quick
    digits teacher). scikit-learn's default tol stopped lbfgs after 11 iterations here,
    with other predictions than the optimum; DINOv2's tol on centred float64 features
    reaches it."""

    def shared(fs: FeatureSet) -> FeatureSet:
        cls = (fs.cls.astype(np.float64) * 0.005 + 1.0).astype(np.float32)
        return FeatureSet(cls, cls, np.tile(cls, 4), fs.labels, fs.class_names, fs.sample_names)

    train, test = shared(TRAIN), shared(TEST)
    out = logreg(feature_context(train, test), LogregConfig(c_grid=[1e4]))
    assert out.extra["threads"] == 1  # a small problem: single-threaded, reproducible
    x = train.cls / np.linalg.norm(train.cls.astype(np.float64), axis=1, keepdims=True)
    x_test = test.cls / np.linalg.norm(test.cls.astype(np.float64), axis=1, keepdims=True)
    optimum = LogisticRegression(C=1e4, max_iter=100_000, tol=1e-14).fit(x, train.labels)
    assert optimum.n_iter_[0] > 100  # a hard problem for lbfgs
    want = 100 * np.mean(optimum.predict(x_test) == test.labels)
    assert out.metrics["top1"] == pytest.approx(want)


def test_logreg_no_top5_below_five_classes():
    train, test = blobs(90, seed=0, num_classes=3), blobs(30, seed=1, num_classes=3)
    out = logreg(feature_context(train, test), LogregConfig(c_grid=[1.0]))
    assert set(out.metrics) == {"top1"}


# --- subsets ---------------------------------------------------------------------------


def test_per_class_fraction_is_deterministic_and_per_class():
    labels = np.repeat(np.arange(4), [10, 20, 30, 15])
    rows = per_class_fraction(labels, 0.1, seed=3)
    assert np.array_equal(rows, per_class_fraction(labels, 0.1, seed=3))
    assert not np.array_equal(rows, per_class_fraction(labels, 0.1, seed=4))
    assert np.bincount(labels[rows]).tolist() == [1, 2, 3, 2]  # round half up: 1.5 -> 2
    with pytest.raises(UserError, match="2 class.*'cat' \\(index 0\\) with 10 images, 'fox'"):
        per_class_fraction(labels, 0.03, seed=0, class_names=["cat", "dog", "emu", "fox"])
    with pytest.raises(ConfigError):
        per_class_fraction(labels, 0.0)


def test_read_split_file_matches_file_names(tmp_path):
    names = ["train/n01/n01_7.JPEG", "train/n01/n01_8.JPEG", "train/n02/n02_1.JPEG"]
    split = tmp_path / "1percent.txt"
    split.write_text("n02_1.JPEG\nn01_7.JPEG\n\n")
    assert read_split_file(split, names).tolist() == [0, 2]
    split.write_text("n01_7.JPEG\nn09_1.JPEG\nn09_2.JPEG\n")
    with pytest.raises(UserError, match="2 of 3 names.*n09_1.JPEG, n09_2.JPEG"):
        read_split_file(split, names)
    with pytest.raises(UserError, match="cannot read"):
        read_split_file(tmp_path / "missing.txt", names)


def test_stratified_split_is_disjoint_and_keeps_singletons_in_train():
    labels = np.array([0] * 20 + [1] * 10 + [2])
    fit, val = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(labels)))
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    assert np.array_equal(val, stratified_split(labels, 0.1, seed=0)[1])


# --- semi ------------------------------------------------------------------------------


def small_semi(**kw) -> SemiConfig:
    return SemiConfig(
        knn=KnnConfig(ks=[1, 5]),
        linear=LinearConfig(epochs=5, batch_size=16, base_lrs=[0.1, 1.0], variants=["cls"]),
        logreg=LogregConfig(c_grid=C_GRID),
        **kw,
    )


def test_semi_runs_every_method_on_the_subset():
    out = semi(feature_context(TRAIN, TEST), small_semi(fraction=0.1))
    assert out.protocol == "semi-10pct"
    assert out.extra["subset_size"] == 60
    for method in ("knn", "linear", "logreg"):
        assert out.metrics[f"{method}_top1"] > 70, method
        assert f"{method}_top5" in out.metrics
    assert "knn_top1_k5" in out.metrics and "knn_best_k" in out.metrics
    assert out.extra["linear"]["chosen_head"]["feature"] == "cls"


def test_semi_split_file_and_errors(tmp_path):
    split = tmp_path / "10percent.txt"
    split.write_text("\n".join(Path(n).name for n in TRAIN.sample_names[::10]))
    out = semi(
        feature_context(TRAIN, TEST),
        small_semi(fraction=0.1, split_file=str(split), methods=["knn"]),
    )
    assert set(out.metrics) >= {"knn_top1", "knn_top5"} and "linear_top1" not in out.metrics
    assert out.extra["subset_size"] == 60
    with pytest.raises(ConfigError, match="fraction"):
        semi(
            feature_context(TRAIN, TEST),
            small_semi(fraction=0.01, split_file=str(split), methods=["knn"]),
        )
    with pytest.raises(ConfigError, match="methods"):
        semi(feature_context(TRAIN, TEST), small_semi(methods=["finetune"]))


def test_semi_relative_split_file_is_found_in_the_dataset_root(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "data")
    (root / "10percent.txt").write_text("\n".join(Path(n).name for n in TRAIN.sample_names[::10]))
    monkeypatch.chdir(tmp_path)
    ctx = feature_context(TRAIN, TEST, data_spec=f"imagefolder:{root}")
    cfg = small_semi(fraction=0.1, split_file="10percent.txt", methods=["knn"])
    assert semi(ctx, cfg).extra["subset_size"] == 60


def test_protocol_names():
    assert protocol_name(0.01) == "semi-1pct" and protocol_name(0.1) == "semi-10pct"
    assert protocol_name(0.005) == "semi-0.5pct"


def test_registered():
    for name, cls in [("logreg", LogregConfig), ("semi", SemiConfig)]:
        assert TASKS.get(name).config_cls is cls


def test_logreg_sweep_resumes_after_the_last_saved_c(tmp_path, monkeypatch):
    """A killed sweep keeps the C values done (and the warm start); the rerun fits only the
    rest and reports what a sweep never stopped would. A damaged file is moved aside."""
    import ibot_bench.downstream.logreg as logreg_mod
    import ibot_bench.resume_file as resume_mod

    grid = [1e-4, 1e-2, 1.0, 100.0]
    cfg = LogregConfig(c_grid=grid)
    whole = logreg(feature_context(TRAIN, TEST), cfg)
    ctx = feature_context(TRAIN, TEST, work_dir=tmp_path)
    real_fit, fitted = logreg_mod._fit, []

    def fit(clf, x, y, threads):
        fitted.append(clf.C)
        if len(fitted) == 3 and crash:
            raise RuntimeError("killed")
        return real_fit(clf, x, y, threads)

    monkeypatch.setattr(logreg_mod, "_fit", fit)
    monkeypatch.setattr(resume_mod, "SAVE_EVERY_S", 0.0)  # save after every C
    crash = True
    with pytest.raises(RuntimeError, match="killed"):
        logreg(ctx, cfg)
    assert (tmp_path / "logreg_sweep.pth").is_file()
    crash, fitted[:] = False, []
    resumed = logreg(ctx, cfg)
    assert fitted == [1.0, 100.0, resumed.extra["best_C"]]  # the rest of the grid, the refit
    assert resumed.metrics == whole.metrics and resumed.extra == whole.extra
    assert not (tmp_path / "logreg_sweep.pth").exists()
    (tmp_path / "logreg_sweep.pth").write_bytes(b"damaged")
    assert logreg(ctx, cfg).metrics == whole.metrics
    assert list(tmp_path.glob("logreg_sweep.pth.unusable-*"))


def test_semi_split_file_leaves_out_images_skipped_as_unreadable(tmp_path):
    """features.skip_corrupt dropped one listed image from the features: the subset is the
    file's other images, not a 'not in the dataset' error."""
    split = tmp_path / "10percent.txt"
    split.write_text("\n".join(Path(n).name for n in TRAIN.sample_names[::10]))
    gone = TRAIN.sample_names[0]
    kept = TRAIN.subset(np.arange(1, len(TRAIN)))
    kept.meta["skipped"] = [gone]
    cfg = small_semi(fraction=0.1, split_file=str(split), methods=["knn"])
    assert semi(feature_context(kept, TEST), cfg).extra["subset_size"] == 59


def test_logreg_flags_a_best_c_at_the_end_of_its_grid(caplog, monkeypatch):
    """A best C at the end of the grid may be short of the optimum: the record says so."""
    scores = {1e-2: 50.0, 1.0: 70.0}
    monkeypatch.setattr(logreg_mod, "select_c", lambda *a, **k: (1.0, scores, True))
    out = logreg(feature_context(TRAIN, TEST), LogregConfig(c_grid=list(scores)))
    assert out.extra["best_C"] == 1.0 and out.extra["best_C_at_grid_edge"] == "largest"
    assert "that also holds 100 " in caplog.text
    monkeypatch.undo()
    plateau = logreg(feature_context(TRAIN, TEST), LogregConfig(c_grid=[1e-2, 1.0, 100.0]))
    assert plateau.extra["best_C_at_grid_edge"] is False  # equal scores: not an edge
    assert grid_edge(1.0, {0.01: 50.0, 1.0: 90.0, 100.0: 80.0}) is None
    assert grid_edge(0.01, {0.01: 90.0, 1.0: 80.0}) == "smallest"
    assert grid_edge(5.0, {5.0: 90.0}) is None
