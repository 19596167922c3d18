"""No silent wrong result from the data: fingerprints that see replaced files, val labels
matched to train's classes by name, and bad files reported as errors naming them."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pytest

import ibot_bench.data.classification as classification
from ibot_bench.data import load_split
from ibot_bench.data.ade20k import ADE20KDataset
from ibot_bench.data.coco import CocoDataset
from ibot_bench.data.subsets import label_subset, read_split_file
from ibot_bench.errors import DatasetError, UserError
from ibot_bench.features import FeatureConfig, extract_features

ENC = "random:vit_tiny_patch8"
CFG = FeatureConfig(img_size=32, batch_size=5, num_workers=0, precision="fp32")


def _same_size_replace(path: Path) -> None:
    """Other bytes of exactly the same length (every byte inverted), and a later mtime."""
    old = path.stat()
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == old.st_size


def _touch(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


# --- fingerprints ------------------------------------------------------------------------


def test_same_size_replacement_changes_fingerprint_and_misses_cache(tiny_imagefolder, tmp_path):
    spec = f"imagefolder:{tiny_imagefolder}"
    first = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, progress=False)
    assert extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, progress=False).meta[
        "cache_hit"
    ]
    before = load_split(spec, "val").fingerprint()
    # a real image of the same byte size: another image's bytes padded/cut to the length
    img = tiny_imagefolder / "val" / "class_0" / "val_0_0.jpg"
    other = (tiny_imagefolder / "val" / "class_2" / "val_2_0.jpg").read_bytes()
    size = img.stat().st_size
    img.write_bytes(other[:size].ljust(size, b"\0"))
    os.utime(img, ns=(0, img.stat().st_mtime_ns + 1_000_000_000))
    assert img.stat().st_size == size
    assert load_split(spec, "val").fingerprint() != before
    second = extract_features(ENC, spec, "val", CFG, cache_dir=tmp_path, progress=False)
    assert not second.meta["cache_hit"]
    assert second.meta["cache_path"] != first.meta["cache_path"]


def test_stat_mode_sees_mtime_content_mode_sees_bytes(tiny_imagefolder):
    spec = f"imagefolder:{tiny_imagefolder}"
    cspec = f"{spec}?verify=content"
    stat_fp, content_fp = load_split(spec, "train").fingerprint(), load_split(cspec, "train")
    content_fp = content_fp.fingerprint()
    assert stat_fp != content_fp  # the mode is part of the fingerprint
    assert load_split(cspec, "train").verify == "content"

    img = tiny_imagefolder / "train" / "class_1" / "train_1_0.jpg"
    # same bytes, new mtime (rewritten, copied, touched): stat mode changes, content does not
    img.write_bytes(img.read_bytes())
    _touch(img)
    assert load_split(spec, "train").fingerprint() != stat_fp
    assert load_split(cspec, "train").fingerprint() == content_fp

    # other bytes of the same size: both modes change
    _same_size_replace(img)
    assert load_split(cspec, "train").fingerprint() != content_fp

    # the label subset of a content-verified split is content-verified too
    sub = load_split(f"{cspec}&fraction=0.5", "train")
    assert sub.verify == "content" and len(sub) == 6


def test_content_digests_read_once_per_process(tiny_imagefolder, monkeypatch):
    spec = f"imagefolder:{tiny_imagefolder}?verify=content"
    fp = load_split(spec, "val").fingerprint()

    def no_read(*args, **kwargs):
        raise AssertionError("file read again")

    monkeypatch.setattr(classification, "open", no_read, raising=False)
    assert load_split(spec, "val").fingerprint() == fp  # digests from the per-process cache
    img = tiny_imagefolder / "val" / "class_0" / "val_0_1.jpg"
    _touch(img)
    with pytest.raises(AssertionError, match="read again"):  # new mtime: hashed again
        load_split(spec, "val").fingerprint()
    monkeypatch.undo()
    assert load_split(spec, "val").fingerprint() == fp  # same bytes, same fingerprint


def test_verify_option_checked():
    with pytest.raises(UserError, match="verify='bytes'.*'content'"):
        load_split("digits?verify=bytes", "train")
    digits = load_split("digits?verify=content", "train")
    assert digits.fingerprint() == load_split("digits", "train").fingerprint()  # arrays: bytes


@pytest.fixture(scope="module")
def dense_root(tmp_path_factory) -> Path:
    from ibot_bench.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("dense") / "shapes"
    write_synthetic(out, num_classes=2, train_per_class=2, val_per_class=1, image_size=32, seed=1)
    return out


@pytest.mark.parametrize("kind", ["coco", "ade20k"])
def test_dense_fingerprints_see_same_size_replacement(dense_root, kind):
    if kind == "coco":
        root, split = dense_root / "coco", "train"
        make = lambda verify="stat": CocoDataset(root, split, verify)  # noqa: E731
        files = [root / "train2017" / sorted(os.listdir(root / "train2017"))[0]]
        files.append(root / "annotations" / "instances_train2017.json")
    else:
        root, split = dense_root / "ade20k" / "ADEChallengeData2016", "training"
        make = lambda verify="stat": ADE20KDataset(root, split, verify)  # noqa: E731
        files = [
            root / sub / "training" / sorted(os.listdir(root / sub / "training"))[0]
            for sub in ("images", "annotations")
        ]
    spec_fp = load_split(
        f"{kind}:{root.parent if kind == 'ade20k' else root}?verify=content", "train"
    )
    assert spec_fp.verify == "content" and spec_fp.fingerprint() == make("content").fingerprint()
    for path in files:
        stat_fp, content_fp = make().fingerprint(), make("content").fingerprint()
        _touch(path)  # same bytes, new mtime
        assert make().fingerprint() != stat_fp
        assert make("content").fingerprint() == content_fp
        if path.suffix == ".json":  # must stay parseable: a same-size edit of the text
            text = path.read_bytes()
            edited = text.replace(b'"height":32', b'"height":33', 1)
            assert edited != text and len(edited) == len(text)
            path.write_bytes(edited)
            _touch(path, 10)
        else:
            _same_size_replace(path)
        assert make().fingerprint() != stat_fp
        assert make("content").fingerprint() != content_fp


def test_fingerprint_cost_is_one_stat_per_file(tmp_path, monkeypatch):
    """Default mode never opens an image; it stats each file once."""
    root = tmp_path / "many"
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(50):
                (root / split / f"c{c}" / f"{i}.jpg").write_bytes(b"x" * i)
    data = load_split(f"imagefolder:{root}", "train")
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(
        classification.os, "stat", lambda p, *a, **k: calls.append(p) or real_stat(p, *a, **k)
    )
    monkeypatch.setattr(classification, "open", lambda *a, **k: 1 / 0, raising=False)
    data.fingerprint()
    assert len(calls) == len(data) == 100


# --- class lists ------------------------------------------------------------------------


def _label_of_folder(data) -> list[int]:
    """Each sample's expected label: its class folder's index in the split's class list."""
    return [data.class_names.index(Path(p).parent.name) for p in data.paths]


def test_val_missing_a_class_warns_and_keeps_train_labels(tiny_imagefolder, caplog):
    import shutil

    shutil.rmtree(tiny_imagefolder / "val" / "class_0")
    spec = f"imagefolder:{tiny_imagefolder}"
    train = load_split(spec, "train")
    with caplog.at_level(logging.WARNING, logger="ibot_bench"):
        val = load_split(spec, "val")
    assert "lacks 1 of the 3 classes" in caplog.text and "'class_0'" in caplog.text
    assert val.class_names == train.class_names == ["class_0", "class_1", "class_2"]
    assert val.labels.tolist() == [1] * 4 + [2] * 4  # not shifted down to 0, 1
    assert val.labels.tolist() == _label_of_folder(val)


def test_val_extra_class_sorting_first_is_an_error(tiny_imagefolder):
    extra = tiny_imagefolder / "val" / "aaa_extra"
    extra.mkdir()
    (extra / "x.jpg").write_bytes((tiny_imagefolder / "val/class_0/val_0_0.jpg").read_bytes())
    with pytest.raises(
        DatasetError,
        match=r"class folder\(s\) that the train split lacks: 'aaa_extra'.*add the class",
    ):
        load_split(f"imagefolder:{tiny_imagefolder}", "val")
    load_split(f"imagefolder:{tiny_imagefolder}", "train")  # train itself is fine


def test_val_classes_matched_by_name(tiny_imagefolder):
    spec = f"imagefolder:{tiny_imagefolder}"
    train, val = load_split(spec, "train"), load_split(spec, "val")
    assert val.class_names == train.class_names  # the normal case is unchanged
    assert val.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 == _label_of_folder(val)
    # the synthetic set goes through the same rule (its class names are shape names)
    syn = "synthetic:shapes?classes=3&size=32&train=2&val=1"
    assert load_split(syn, "val").class_names == load_split(syn, "train").class_names


def test_val_without_train_folder_uses_its_own_classes(tiny_imagefolder):
    import shutil

    shutil.rmtree(tiny_imagefolder / "train")
    val = load_split(f"imagefolder:{tiny_imagefolder}", "val")
    assert val.class_names == ["class_0", "class_1", "class_2"]


# --- bad files ------------------------------------------------------------------------


def test_binary_split_file_is_a_clear_error(tiny_imagefolder, tmp_path):
    names = load_split(f"imagefolder:{tiny_imagefolder}", "train").sample_names
    binary = tmp_path / "1percent.txt"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(
        UserError, match=r"1percent.txt.*is not a text file.*one image file name per line"
    ):
        read_split_file(binary, names)
    with pytest.raises(UserError, match="not a text file"):
        load_split(f"imagefolder:{tiny_imagefolder}?split_file={binary}", "train")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"train_0_0.jpg\n\0\0\0\n")
    with pytest.raises(UserError, match="NUL byte"):
        label_subset(np.zeros(len(names)), names, split_file=nul)
    bom = tmp_path / "bom.txt"  # a UTF-8 byte-order mark is fine
    bom.write_bytes(b"\xef\xbb\xbftrain_0_0.jpg\n")
    assert read_split_file(bom, names).tolist() == [0]


def test_symlink_loop_image_is_reported_not_a_crash(tiny_imagefolder, caplog):
    loop = tiny_imagefolder / "val" / "class_1" / "zz_loop.jpg"
    loop.symlink_to(loop.name)  # points at itself: ELOOP
    spec = f"imagefolder:{tiny_imagefolder}"
    with caplog.at_level(logging.WARNING, logger="ibot_bench"):
        val = load_split(spec, "val")
    assert "zz_loop.jpg" in caplog.text and "skip_corrupt" in caplog.text
    assert len(val) == 13 and len(val.fingerprint()) == 64
    row = val.paths.index(str(loop))
    assert val.labels[row] == 1
    with pytest.raises(DatasetError, match="cannot read image .*zz_loop.jpg.*skip_corrupt"):
        val.read(row)
    assert len(load_split(f"{spec}?verify=content", "val").fingerprint()) == 64
    feats = extract_features(
        ENC, spec, "val", dataclasses.replace(CFG, skip_corrupt=True), progress=False
    )
    assert len(feats.labels) == 12


def test_symlink_loop_class_folder_is_an_error(tiny_imagefolder):
    loop = tiny_imagefolder / "train" / "class_9"
    loop.symlink_to(loop.name)
    with pytest.raises(DatasetError, match="class_9 is a symbolic link that cannot be followed"):
        load_split(f"imagefolder:{tiny_imagefolder}", "train")


def test_synthetic_copies_on_two_nodes_share_their_fingerprint(tmp_path, monkeypatch):
    """Each node of a job without a shared cache generates its own copy (other mtimes): the
    copies must give the same cache and resume keys, so synthetic sets hash by content."""
    spec = "synthetic:shapes?classes=3&train=4&val=2&size=32"
    prints = []
    for node in ("node0", "node1"):
        monkeypatch.setenv("IBOT_BENCH_CACHE", str(tmp_path / node))
        data = load_split(spec, "train")
        assert data.verify == "content"
        prints.append(data.fingerprint())
    assert prints[0] == prints[1]
    assert load_split(f"{spec}&verify=stat", "train").fingerprint() != prints[1]
