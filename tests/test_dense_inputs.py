"""Hostile inputs to the dense tasks: each is refused before training with one message
naming the file and the fix, instead of a traceback deep in mmdet / mmseg, a crash after
hours of training, or a silently wrong number."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ibot_bench.data.coco import CocoDataset
from ibot_bench.data.synthetic import write_synthetic
from ibot_bench.downstream.detection.models import check_categories, check_instances
from ibot_bench.errors import DatasetError


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dense_inputs") / "synth"
    write_synthetic(root, num_classes=3, train_per_class=2, val_per_class=1, image_size=32)
    return root


@pytest.fixture
def coco(synth, tmp_path) -> Path:
    """A private copy of the synthetic COCO layout, to edit."""
    return shutil.copytree(synth / "coco", tmp_path / "coco")


def edit_coco(root: Path, split: str, fn: Callable[[dict], object]) -> None:
    path = root / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _set(key: str, value: object, index: int = 0) -> Callable[[dict], None]:
    return lambda d: d["annotations"][index].update({key: value})


# --- COCO annotation files -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (
            lambda d: d["annotations"][0].pop("bbox"),
            r"1 annotation\(s\) \(index 0\) have no 'bbox'",
        ),
        (lambda d: d["annotations"][0].pop("segmentation"), "have no 'segmentation'"),
        (lambda d: d["annotations"][0].pop("area"), "have no 'area'"),
        (
            lambda d: d["images"][0].pop("file_name"),
            r"1 image\(s\) \(index 0\) have no 'file_name'",
        ),
        (_set("category_id", 77), r"\(id 1\) have a category_id not in 'categories'"),
        (_set("image_id", 999), r"\(id 1\) have an image_id not in 'images'"),
        (_set("bbox", [1, 2, 3]), r"a bbox that is not \[x, y, w, h\]"),
        (_set("segmentation", []), "an empty segmentation"),
        (
            lambda d: d["images"][1].update(id=d["images"][0]["id"]),
            "image id.* used more than once",
        ),
        (_set("id", 2), "annotation id.* 2 are used more than once"),
        (lambda d: d.pop("images"), "no 'images' list"),
        (lambda d: d.pop("categories"), "no 'categories' list"),
    ],
)
def test_broken_coco_entries_are_named(coco, fn, message):
    edit_coco(coco, "train", fn)
    with pytest.raises(DatasetError, match=f"instances_train2017.json: .*{message}"):
        CocoDataset(coco, "train")


def test_coco_file_that_is_not_an_object(coco):
    (coco / "annotations" / "instances_val2017.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="not valid COCO instances JSON .*a JSON list"):
        CocoDataset(coco, "val")


def _check(root: Path) -> None:
    train, val = CocoDataset(root, "train"), CocoDataset(root, "val")
    check_categories(train, val, None)
    check_instances(train, val)


def test_train_boxes_mmdet_skips_all_leave_nothing_to_train(coco):
    _check(coco)  # the synthetic set passes
    # zero-size and crowd boxes only: mmdet would train on empty images and report a number
    edit_coco(coco, "train", lambda d: [a.update(bbox=[4, 4, 0, 3]) for a in d["annotations"]])
    edit_coco(coco, "train", lambda d: d["annotations"][0].update(bbox=[4, 4, 9, 9], iscrowd=1))
    with pytest.raises(DatasetError, match="instances_train2017.json has no box to train on"):
        _check(coco)


@pytest.mark.parametrize("drop", ["list", "key"])
def test_val_without_annotations_is_refused(coco, drop):
    """COCO evaluation without ground truth is -1: the record said AP -100."""
    edit_coco(
        coco, "val", lambda d: d.update(annotations=[]) if drop == "list" else d.pop("annotations")
    )
    with pytest.raises(DatasetError, match="instances_val2017.json has no .*annotation"):
        _check(coco)


def test_val_polygon_of_two_points_is_refused_before_training(coco):
    """COCOeval reads a 4-number polygon as a box and fails, after the whole training."""
    edit_coco(coco, "val", _set("segmentation", [[1, 2, 3, 4]]))
    with pytest.raises(
        DatasetError, match=r"instances_val2017.json: 1 annotation\(s\) .*fewer than 3"
    ):
        _check(coco)


def test_train_file_without_categories_says_so(coco):
    edit_coco(coco, "train", lambda d: d.update(categories=[], annotations=[]))
    with pytest.raises(DatasetError, match="instances_train2017.json lists no categories"):
        _check(coco)
