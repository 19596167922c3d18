"""Hostile and broken inputs: one clear message (exit 2), no silent wrong number, nothing
half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_ibot_checkpoint

import ibot_bench.features as features_mod
from ibot_bench.cli import main
from ibot_bench.errors import ConfigError, DatasetError, UserError
from ibot_bench.evaluate import plan_eval, run_eval, task_config
from ibot_bench.features import FeatureConfig, extract_features
from ibot_bench.io import atomic_write_text

FAST = ["features.img_size=32", "features.num_workers=0", "features.precision=fp32"]


def poisoned_checkpoint(tmp_path: Path, where: str) -> str:
    """An iBOT checkpoint whose ``where`` ("backbone" or "head") weights are NaN."""
    path = write_ibot_checkpoint(tmp_path / f"nan_{where}.pth")
    obj = torch.load(path, weights_only=True)
    for state in (obj["teacher"], obj["student"]):
        for key in state:
            if key.startswith(f"{where}.") and state[key].is_floating_point():
                state[key] = torch.full_like(state[key], float("nan"))
    torch.save(obj, path)
    return f"ibot:{path}"


def test_nan_encoder_or_head_fails_without_a_record(tiny_imagefolder, tmp_path):
    data, out = f"imagefolder:{tiny_imagefolder}", tmp_path / "out"
    kwargs = {"overrides": FAST, "output_dir": out, "cache_dir": tmp_path / "c", "log": print}
    with pytest.raises(UserError, match="NaN or inf features"):
        run_eval("knn", poisoned_checkpoint(tmp_path, "backbone"), data, **kwargs)
    with pytest.raises(UserError, match="projection head .* NaN or inf"):
        run_eval("cluster-head", poisoned_checkpoint(tmp_path, "head"), data, **kwargs)
    assert not list(out.glob("records/*.json"))


def test_non_finite_settings_are_refused(tiny_imagefolder, tmp_path):
    data = f"imagefolder:{tiny_imagefolder}"
    for task, bad in (("linear", "base_lrs=[nan]"), ("knn", "temperature=nan")):
        with pytest.raises(ConfigError):
            run_eval(task, "random:vit_tiny_patch8", data, overrides=[*FAST, bad],
                     output_dir=tmp_path, cache_dir=tmp_path / "c", log=print)  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ks=${nope}", "config key 'ks': cannot resolve"),
        ("ks=${oops", "cannot parse override 'ks=${oops'"),
        ("features.batch_size=0", "features.batch_size must be >= 1"),
        ("features.img_size=-8", "features.img_size must be >= 1"),
        ("features.crop_pct=0", "features.crop_pct must be in"),
        ("features.interpolation=foo", "features.interpolation must be one of bicubic, bilinear"),
        ("seeds=[]", "seeds must list at least one seed"),
    ],
)
def test_bad_settings_are_one_line_errors(override, message, tmp_path, capsys):
    args = ["eval", "knn", "--encoder", "random:vit_tiny_patch8", "--data", "digits",
            "--output", str(tmp_path), override]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_yaml_interpolation_and_patch_size(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ks: ${missing.key}\n")
    args = ["eval", "knn", "--encoder", "random:vit_tiny_patch8", "--data", "digits", "--config"]
    assert main([*args, str(bad), "--output", str(tmp_path)]) == 2
    assert "config key 'ks': cannot resolve" in capsys.readouterr().err
    args = ["eval", "knn", "--encoder", "random:vit_tiny_patch0", "--data", "digits"]
    assert main([*args, "--output", str(tmp_path)]) == 2
    assert "patch size must be >= 1" in capsys.readouterr().err


CFG = FeatureConfig(img_size=32, batch_size=8, num_workers=0, precision="fp32")


def extract(spec: str, cache: Path, log=lambda _m: None):
    return extract_features("random:vit_tiny_patch8", spec, "val", CFG, cache_dir=cache,
                            progress=False, log=log)  # fmt: skip


def _poke(entry: Path, name: str, value: float) -> None:
    """Write ``value`` into the first cell of the cached array ``name``."""
    array = np.load(entry / f"{name}.npy")
    array[0, 0] = value
    np.save(entry / f"{name}.npy", array)


@pytest.mark.parametrize(
    "damage",
    ["truncate", "pickle", "meta", "foreign", "directory", "nan", "inf", "empty", "file", "link"],
)
def test_damaged_or_planted_cache_entries_are_misses(damage, tiny_imagefolder, tmp_path):
    spec = f"imagefolder:{tiny_imagefolder}"
    first = extract(spec, tmp_path)
    entry = Path(first.meta["cache_path"])
    if damage == "nan":  # extraction never caches a NaN: the file is damaged, not the encoder
        _poke(entry, "cls", np.nan)
    elif damage == "inf":
        _poke(entry, "cls_last_n", -np.inf)
    elif damage == "truncate":
        (entry / "cls.npy").write_bytes((entry / "cls.npy").read_bytes()[:100])
    elif damage == "pickle":  # an object array: loading it would unpickle
        np.save(entry / "labels.npy", np.array([object()] * len(first), dtype=object))
    elif damage == "empty":  # no rows (an old entry of a split whose images were all skipped)
        for name in ("cls", "patch_mean", "cls_last_n", "labels"):
            np.save(entry / f"{name}.npy", np.load(entry / f"{name}.npy")[:0])
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({**meta, "sample_names": []}))
    elif damage in ("file", "link"):  # the entry replaced by a file, or a dangling link
        shutil.rmtree(entry)
        entry.write_text("garbage") if damage == "file" else entry.symlink_to(tmp_path / "gone")
    elif damage == "meta":
        (entry / "meta.json").write_text("{not json")
    elif damage == "foreign":  # a valid entry of another key planted under this one's name
        (entry / "meta.json").write_text((entry / "meta.json").read_text().replace("fp32", "x"))
    else:
        (entry / "cls.npy").unlink()
        (entry / "cls.npy").mkdir()
    logs: list[str] = []
    again = extract(spec, tmp_path, logs.append)
    assert not again.meta["cache_hit"]  # recomputed, not trusted
    if damage != "link":  # a dangling link is no entry at all
        assert any(f"cache entry {entry} is damaged" in line for line in logs), logs
    np.testing.assert_array_equal(again.cls, first.cls)
    assert extract(spec, tmp_path).meta["cache_hit"]  # and rewritten
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_two_processes_writing_one_cache_entry(tiny_imagefolder, tmp_path):
    cmd = [sys.executable, "-m", "ibot_bench.cli", "features", "--encoder",
           "random:vit_tiny_patch8", "--data", f"imagefolder:{tiny_imagefolder}", "--split",
           "val", "--cache-dir", str(tmp_path), "features.img_size=32",
           "features.precision=fp32"]  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # fmt: skip
    for proc in procs:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out
    assert extract(f"imagefolder:{tiny_imagefolder}", tmp_path).meta["cache_hit"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_full_disk_is_a_clear_error_and_leaves_nothing(tiny_imagefolder, tmp_path, monkeypatch):
    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(UserError, match="no space left on the device of .*records"):
        atomic_write_text(tmp_path / "records" / "r.json", "{}")
    assert not list((tmp_path / "records").iterdir())
    monkeypatch.undo()
    monkeypatch.setattr(features_mod.np, "save", no_space)
    with pytest.raises(UserError, match="no space left on the device of the feature cache"):
        extract(f"imagefolder:{tiny_imagefolder}", tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_written_files_follow_the_umask_and_unwritable_targets_are_named(tmp_path, monkeypatch):
    """Results are readable by whoever the umask lets read them (not mkstemp's 0600); a file
    that cannot be replaced is a one-line error naming it."""
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "r.json", "{}")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic_write_text(tmp_path / "s.json", "{}").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)

    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(UserError, match=r"cannot write .*r\.json \(Permission denied\)"):
        atomic_write_text(tmp_path / "r.json", "[]")
    monkeypatch.undo()
    assert (tmp_path / "r.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_crafted_checkpoint_claiming_huge_tensors_is_refused_before_building(tmp_path, capsys):
    huge = torch.zeros(1).expand(1, 200_000, 100_000)  # 74.5 GiB of shape over 4 bytes
    torch.save({"teacher": {"backbone.pos_embed": huge}}, tmp_path / "crafted.pth")
    args = ["features", "--encoder", f"ibot:{tmp_path / 'crafted.pth'}", "--data", "digits"]
    assert main(args) == 2
    assert "backed by only 4 bytes" in capsys.readouterr().err


@pytest.mark.parametrize("planted", ["directory", "missing keys", "garbage"])
def test_planted_fine_tuning_checkpoint_is_refused_before_training(planted, tmp_path):
    from ibot_bench.downstream.finetune import FinetuneConfig, finetune_eval
    from ibot_bench.tasks import TaskContext

    work = tmp_path / "work"
    work.mkdir()
    target = work / "checkpoint.pth"
    if planted == "directory":
        target.mkdir()
    elif planted == "missing keys":
        torch.save({"model": {}}, target)
    else:
        target.write_bytes(b"not a checkpoint")
    cfg = FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=4, img_size=32, mixup=0.0,
                         cutmix=0.0, num_workers=0, precision="fp32")  # fmt: skip
    ctx = TaskContext("random:vit_tiny_patch8", "digits", work, log=lambda _m: None)
    with pytest.raises(UserError, match="checkpoint"):
        finetune_eval(ctx, cfg)
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pth"]  # nothing trained


def test_skipped_images_of_both_splits_are_recorded(tiny_imagefolder, tmp_path):
    """features.skip_corrupt: the record names the skipped test images too (its metrics
    cover the others only), and a cache hit says images were skipped."""
    (tiny_imagefolder / "train" / "class_0" / "bad.jpg").write_bytes(b"not an image")
    (tiny_imagefolder / "val" / "class_2" / "bad.jpg").write_bytes(b"")
    logs: list[str] = []
    kwargs = {"output_dir": tmp_path / "out", "cache_dir": tmp_path / "c", "log": logs.append}
    overrides = [*FAST, "features.skip_corrupt=true"]
    record = run_eval("knn", "random:vit_tiny_patch8", f"imagefolder:{tiny_imagefolder}",
                      overrides=overrides, **kwargs)  # fmt: skip
    assert record.details["features"]["skipped"] == ["class_0/bad.jpg"]
    assert record.details["features"]["skipped_val"] == ["class_2/bad.jpg"]
    assert record.dataset["num_test"] == 12
    logs.clear()
    cfg = FeatureConfig(**{**CFG.__dict__, "skip_corrupt": True})
    spec = f"imagefolder:{tiny_imagefolder}"
    extract_features("random:vit_tiny_patch8", spec, "val", cfg, cache_dir=tmp_path / "c",
                     progress=False, log=logs.append)  # fmt: skip
    assert any("cache hit" in line for line in logs)
    assert any("skipped 1 unreadable image(s)" in line for line in logs), logs


def test_every_image_unreadable_is_an_error_naming_one(tiny_imagefolder, tmp_path):
    for jpg in (tiny_imagefolder / "val").rglob("*.jpg"):
        jpg.write_bytes(b"garbage")
    cfg = FeatureConfig(**{**CFG.__dict__, "skip_corrupt": True})
    with pytest.raises(DatasetError, match=r"every one of the 12 images .*\[val\] is unreadable"):
        extract_features("random:vit_tiny_patch8", f"imagefolder:{tiny_imagefolder}", "val",
                         cfg, cache_dir=tmp_path / "c", progress=False)  # fmt: skip
    assert not [p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]


def test_a_task_seed_outside_seeds_is_refused(tmp_path, capsys):
    """The runner sets each run's seed from ``seeds``: ``seed=1`` alone once ran seed 0."""
    args = ["eval", "cluster", "--encoder", "random:vit_tiny_patch8", "--data", "digits",
            "--output", str(tmp_path), "seed=1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "seed=1 is not used" in err and "seeds=[1]" in err and "Traceback" not in err
    plan = plan_eval(
        "cluster", "random:vit_tiny_patch8", "digits", overrides=["seed=1", "seeds=[1]"]
    )
    assert task_config(plan, 1).seed == 1
