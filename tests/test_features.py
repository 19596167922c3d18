"""The cached feature engine: correctness against the raw model, cache behaviour, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import on_call

import ibot_bench.features as features_mod
import ibot_bench.runtime as runtime
from ibot_bench.data import load_split
from ibot_bench.data.classification import EvalTransform, normalize_batch
from ibot_bench.encoders import load_encoder
from ibot_bench.errors import DatasetError, UserError
from ibot_bench.features import FeatureConfig, extract_features

ENC = "random:vit_tiny_patch8"
CFG = FeatureConfig(img_size=32, batch_size=5, num_workers=0, precision="fp32")


def test_features_equal_direct_model_forward(tiny_imagefolder, tmp_path):
    """With the default precision too: fp32, the reference's (bf16 would miss by ~1e-2)."""
    spec = f"imagefolder:{tiny_imagefolder}"
    default = FeatureConfig(img_size=32, batch_size=5, num_workers=0)
    feats = extract_features(ENC, spec, "val", default, cache_dir=tmp_path, progress=False)
    assert feats.meta["key"]["precision"] == "fp32"
    data = load_split(spec, "val")
    t = EvalTransform.for_size(32)
    batch = normalize_batch(torch.stack([t(data.read(i)) for i in range(len(data))]))
    with torch.inference_mode():
        ref = load_encoder(ENC).forward_features(batch, n_last_blocks=4)
    assert feats.cls.shape == (12, 192) and feats.cls_last_n.shape == (12, 4 * 192)
    np.testing.assert_allclose(feats.cls, ref["cls"].numpy(), atol=1e-5)
    np.testing.assert_allclose(feats.patch_mean, ref["patch_mean"].numpy(), atol=1e-5)
    np.testing.assert_allclose(feats.cls_last_n, ref["cls_last_n"].numpy(), atol=1e-5)
    assert feats.labels.tolist() == data.labels.tolist()
    assert feats.meta["sample_names"] == data.sample_names


def test_cache_hit_skips_model_and_refresh_recomputes(tiny_imagefolder, tmp_path, monkeypatch):
    spec = f"imagefolder:{tiny_imagefolder}"
    first = extract_features(ENC, spec, "train", CFG, cache_dir=tmp_path, progress=False)
    assert not first.meta["cache_hit"]

    def no_model(*args, **kwargs):
        raise AssertionError("model loaded on a cache hit")

    monkeypatch.setattr(features_mod, "load_encoder", no_model)
    hit = extract_features(ENC, spec, "train", CFG, cache_dir=tmp_path, progress=False)
    assert hit.meta["cache_hit"] and hit.meta["cache_path"] == first.meta["cache_path"]
    np.testing.assert_array_equal(hit.cls, first.cls)
    with pytest.raises(AssertionError, match="model loaded"):
        extract_features(ENC, spec, "train", CFG, cache_dir=tmp_path, refresh=True, progress=False)
    monkeypatch.undo()
    # other settings -> other key; no temp folders left behind
    other = FeatureConfig(img_size=24, batch_size=5, num_workers=0, precision="fp32")
    assert (
        extract_features(ENC, spec, "train", other, cache_dir=tmp_path, progress=False).meta[
            "cache_path"
        ]
        != first.meta["cache_path"]
    )
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_changed_dataset_is_never_stale(tiny_imagefolder, tmp_path):
    spec = f"imagefolder:{tiny_imagefolder}"
    first = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, progress=False)
    img = tiny_imagefolder / "val" / "class_0" / "val_0_0.jpg"
    img.write_bytes((tiny_imagefolder / "val" / "class_2" / "val_2_0.jpg").read_bytes())
    second = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, progress=False)
    assert not second.meta["cache_hit"]
    assert not np.allclose(first.cls[0], second.cls[0])


def test_corrupt_image_fails_or_is_skipped(tiny_imagefolder, tmp_path):
    bad = tiny_imagefolder / "val" / "class_1" / "val_1_3.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    spec = f"imagefolder:{tiny_imagefolder}"
    with pytest.raises(DatasetError, match="val_1_3.jpg.*features.skip_corrupt=true"):
        extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    skip = FeatureConfig(**{**CFG.__dict__, "skip_corrupt": True})
    feats = extract_features(ENC, spec, "val", skip, cache_dir=tmp_path, progress=False)
    assert len(feats) == 11 and feats.meta["skipped"] == ["class_1/val_1_3.jpg"]
    assert "class_1/val_1_3.jpg" not in feats.meta["sample_names"]


def test_unwritable_cache_dir(tiny_imagefolder, tmp_path):
    if os.geteuid() == 0:
        locked = tmp_path / "file"
        locked.write_text("a file, not a folder")  # root ignores permissions; use a file
        target = locked / "cache"
    else:
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        target = locked / "cache"
    spec = f"imagefolder:{tiny_imagefolder}"
    with pytest.raises(UserError, match="not writable"):
        extract_features(ENC, spec, "val", CFG, cache_dir=target, progress=False)


def test_precision_choice_is_explicit():
    cpu = torch.device("cpu")
    assert runtime.check_precision(cpu, "fp32") == "fp32"
    assert runtime.check_precision(cpu, "auto") == "auto"  # measured: tests/test_precision.py
    with pytest.raises(
        UserError, match="fp16 is not available on this CPU.*available here: auto, fp32"
    ):
        runtime.check_precision(cpu, "fp16")
    with pytest.raises(UserError, match="unknown"):
        runtime.check_precision(cpu, "int8")


def test_default_last_blocks_resolved_per_encoder_and_recorded(tiny_imagefolder, tmp_path):
    spec = f"imagefolder:{tiny_imagefolder}"
    assert FeatureConfig().n_last_blocks is None  # min(4, depth), resolved per encoder
    feats = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, progress=False)
    assert feats.meta["layout"]["n_last_blocks"] == 4 and feats.meta["key"]["n_last_blocks"] is None
    assert feats.layout["cls_token"] and feats.layout["num_blocks"] == 12
    hit = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, progress=False)
    assert hit.meta["cache_hit"] and hit.layout == feats.layout
    two = FeatureConfig(img_size=32, batch_size=5, num_workers=0, precision="fp32", n_last_blocks=2)
    explicit = extract_features(ENC, spec, "val", two, cache_dir=tmp_path, progress=False)
    assert explicit.cls_last_n.shape == (12, 2 * 192) and explicit.layout["n_last_blocks"] == 2
    legacy = features_mod.FeatureSet(
        feats.cls, feats.patch_mean, feats.cls_last_n, feats.labels, feats.class_names
    )  # no meta (built by hand, or cached before layouts were recorded): inferred
    assert legacy.layout["n_last_blocks"] == 4 and legacy.layout["num_blocks"] is None


def _stopping_encoder(after_calls: int, stop):
    """The test encoder, whose forward calls ``stop()`` on call ``after_calls``."""
    enc = load_encoder(ENC)
    enc.forward_features = on_call(after_calls, stop, enc.forward_features)
    return enc


def _counting_encoder(calls: list[int]):
    """The test encoder, appending each forward batch's size to ``calls``."""
    enc = load_encoder(ENC)
    forward = enc.forward_features
    enc.forward_features = lambda x, **kw: calls.append(len(x)) or forward(x, **kw)
    return enc


def _assert_resumes_last_two(spec: str, cache: Path, whole, capsys) -> None:
    """A rerun into ``cache`` extracts only the last 2 of the 12 val images and gives the
    features of the run ``whole`` that was never stopped."""
    calls = []
    resumed = extract_features(
        ENC, spec, "val", CFG, cache_dir=cache, encoder=_counting_encoder(calls), progress=False
    )
    assert calls == [2] and "resuming after 10 of 12 images" in capsys.readouterr().out
    for name in ("cls", "patch_mean", "cls_last_n", "labels"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))


def test_stopped_extraction_resumes_where_it_stopped(tiny_imagefolder, tmp_path, capsys):
    """Ctrl-C saves the rows done; the rerun extracts only the rest and equals a run that was
    never stopped; the saved rows are removed with the cache entry written."""
    import signal

    from ibot_bench.interrupt import TrainingInterrupted

    spec = f"imagefolder:{tiny_imagefolder}"
    whole = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path / "a", progress=False)
    enc = _stopping_encoder(2, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingInterrupted, match="10 of 12 images.*rerun the same command"):
        extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, encoder=enc, progress=False)
    (partial,) = tmp_path.glob("*.partial")
    assert [p.name for p in partial.iterdir()] == ["rank0of1-0-10.npz"]
    _assert_resumes_last_two(spec, tmp_path, whole, capsys)
    assert not partial.exists()


def test_saved_rows_serve_a_rerun_under_another_rank_count(tiny_imagefolder, tmp_path, capsys):
    """Rows saved by the ranks of a 2-process run resume a 1-process run, and a 1-process
    run's rows resume rank 1 of 2 from the middle of its chunk."""
    import signal

    from ibot_bench.feature_progress import ExtractionProgress
    from ibot_bench.interrupt import TrainingInterrupted

    spec = f"imagefolder:{tiny_imagefolder}"
    whole = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path / "a", progress=False)
    enc = _stopping_encoder(2, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingInterrupted):
        extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, encoder=enc, progress=False)
    (partial,) = tmp_path.glob("*.partial")
    saved = dict(np.load(partial / "rank0of1-0-10.npz"))
    names = tuple(k for k in saved if k != "ok")
    rank1 = ExtractionProgress(partial.with_suffix(""), range(6, 12), 1, 2).resume(names, print)
    assert rank1 is not None and len(rank1["ok"]) == 4
    np.testing.assert_array_equal(rank1["cls"], saved["cls"][6:10])

    (partial / "rank0of1-0-10.npz").unlink()  # as if rank 0 of 2 had done its 6, rank 1 four
    for name, (lo, hi) in {"rank0of2-0-6.npz": (0, 6), "rank1of2-6-10.npz": (6, 10)}.items():
        np.savez(partial / name, **{k: v[lo:hi] for k, v in saved.items()})
    _assert_resumes_last_two(spec, tmp_path, whole, capsys)


def test_killed_extraction_keeps_saved_rows_and_drops_damaged_ones(
    tiny_imagefolder, tmp_path, monkeypatch, capsys
):
    """A crash (or kill -9) loses only the rows since the last save; a damaged chunk is
    discarded and extracted again, never trusted."""
    import ibot_bench.resume_file as resume_mod

    monkeypatch.setattr(resume_mod, "SAVE_EVERY_S", 0.0)  # save after every batch
    spec = f"imagefolder:{tiny_imagefolder}"
    whole = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path / "a", progress=False)

    def crash():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        enc = _stopping_encoder(3, crash)
        extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, encoder=enc, progress=False)
    (partial,) = tmp_path.glob("*.partial")
    assert sorted(p.name for p in partial.iterdir()) == ["rank0of1-0-5.npz", "rank0of1-5-10.npz"]
    (partial / "rank0of1-5-10.npz").write_bytes(b"PK\x03\x04 truncated")
    again = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, progress=False)
    assert "discarding the saved rows" in capsys.readouterr().out
    np.testing.assert_array_equal(again.cls, whole.cls)
    assert not partial.exists()
