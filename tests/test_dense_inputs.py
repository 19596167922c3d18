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


def test_val_image_of_another_size_than_listed_is_refused(coco):
    """pycocotools scores masks of two sizes as IoU -1: mask AP silently lower."""
    edit_coco(coco, "val", lambda d: d["images"][0].update(width=d["images"][0]["width"] + 3))
    CocoDataset(coco, "train")  # train is not checked: its masks are drawn at the image's size
    with pytest.raises(DatasetError, match=r"COCO val: 1 image\(s\) differ .* listed as"):
        CocoDataset(coco, "val")


def test_train_file_without_categories_says_so(coco):
    edit_coco(coco, "train", lambda d: d.update(categories=[], annotations=[]))
    with pytest.raises(DatasetError, match="instances_train2017.json lists no categories"):
        _check(coco)


# --- bad image and mask files, as the mmdet / mmseg pipelines meet them ----------------------


def pipeline_datasets(task: str, root: Path) -> dict:
    """The train and val datasets of ``task``'s real mmengine config on ``root`` (built by
    mmdet / mmseg with the run's pipelines), without a model or training."""
    from mmengine.registry import DATASETS, init_default_scope

    import ibot_bench.dense.register  # noqa: F401
    from ibot_bench.data import load_split
    from ibot_bench.dense.runner import DenseRuntime

    rt = DenseRuntime("cpu", "fp32", "BN", 1.0, 0.0, 64, 4, 8)
    spec = f"{'coco' if task == 'detection' else 'ade20k'}:{root}"
    train, val = load_split(spec, "train"), load_split(spec, "val")
    if task == "detection":
        from ibot_bench.downstream.detection import DetectionConfig, milestones_for
        from ibot_bench.downstream.detection.models import build_detection_config

        cfg = DetectionConfig(multiscale=False, img_scale=[32, 32])
        classes = check_categories(train, val, None)
        config = build_detection_config(
            cfg, rt, "random:vit_tiny_patch8", train, val, classes, root, milestones_for(cfg)
        )
    else:
        from ibot_bench.downstream.segmentation import SegmentationConfig
        from ibot_bench.downstream.segmentation.models import build_segmentation_config

        cfg = SegmentationConfig(crop_size=32, img_scale=[32, 32])
        config = build_segmentation_config(
            cfg, rt, "random:vit_tiny_patch8", train, val, 1e-4, root
        )
    init_default_scope(config["default_scope"])
    return {
        split: DATASETS.build(config[f"{split}_dataloader"]["dataset"])
        for split in ("train", "test")
    }


def read_all(datasets: dict) -> None:
    for ds in datasets.values():
        for i in range(len(ds)):
            ds[i]


def _corrupt(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:100])
    return path


@pytest.mark.parametrize(
    ("split", "fix"), [("train", "replace or remove it"), ("val", "resumes from its last")]
)
def test_unreadable_coco_image_is_named(coco, split, fix):
    """mmcv asserted 'failed to load image' deep in a loader; for val after all training."""
    read_all(pipeline_datasets("detection", coco))
    bad = _corrupt(sorted((coco / f"{split}2017").iterdir())[0])
    with pytest.raises(DatasetError, match=f"cannot read image {bad}: it does not decode; .*{fix}"):
        read_all(pipeline_datasets("detection", coco))


@pytest.fixture
def ade(synth, tmp_path) -> Path:
    """A private copy of the synthetic ADE20K release (7 classes: 3 shapes + 4 textures)."""
    return shutil.copytree(synth / "ade20k" / "ADEChallengeData2016", tmp_path / "ade")


def _first_mask(root: Path, split: str = "training") -> Path:
    return sorted((root / "annotations" / split).iterdir())[0]


def _rewrite_mask(path: Path, fn: Callable) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(fn(np.array(Image.open(path)))).save(path)


@pytest.mark.parametrize(
    ("split", "edit", "message"),
    [
        ("training", lambda p: _corrupt(p), "cannot be read"),
        ("training", lambda p: _rewrite_mask(p, lambda m: m[:16]), "of the image's size 32x32"),
        ("training", lambda p: _rewrite_mask(p, lambda m: m[..., None].repeat(3, 2)), "mode RGB"),
        (
            "training",
            lambda p: _rewrite_mask(p, lambda m: m * 0 + 8),
            r"value\(s\) \[8\] above the 7",
        ),
        ("validation", lambda p: _rewrite_mask(p, lambda m: m * 0 + 200), r"\[200\] .*resumes"),
    ],
)
def test_bad_ade20k_mask_is_named(ade, split, edit, message):
    """mmseg crashed on None (unreadable), trained on misaligned labels (other size), hit an
    IndexError in the loss or lowered val mIoU without a word (values above the classes)."""
    read_all(pipeline_datasets("segmentation", ade))  # values 0..7 and 255 pass
    path = _first_mask(ade, split)
    edit(path)
    with pytest.raises(DatasetError, match=f"ADE20K mask {path} .*{message}"):
        read_all(pipeline_datasets("segmentation", ade))


def test_ade20k_runs_read_exactly_the_checked_pairs(ade):
    """mmseg listed the folder again by the case-sensitive '.jpg' and walked subfolders: an
    image named '.JPG' was left out of training and of val mIoU, a stray subfolder added."""
    from ibot_bench.data import load_split

    for split in ("training", "validation"):
        image = sorted((ade / "images" / split).iterdir())[0]
        image.rename(image.with_suffix(".JPG"))
        stray = ade / "images" / split / "extra"
        stray.mkdir()
        shutil.copy(sorted((ade / "images" / split).glob("*.jpg"))[0], stray / "x.jpg")
    datasets = pipeline_datasets("segmentation", ade)
    for name, split in (("train", "train"), ("test", "val")):
        want = [(str(i), str(m)) for i, m in load_split(f"ade20k:{ade}", split).pairs]
        infos = [datasets[name].get_data_info(i) for i in range(len(datasets[name]))]
        got = [(d["img_path"], d["seg_map_path"]) for d in infos]
        assert got == want and any(i.endswith(".JPG") for i, _ in got)
    read_all(datasets)


def test_ade20k_class_list_shorter_than_the_masks(ade):
    (ade / "classes.txt").write_text("circle\nsquare\n")
    with pytest.raises(DatasetError, match="above the 2 classes .*classes.txt"):
        read_all(pipeline_datasets("segmentation", ade))


# --- settings torch or mmengine would reject from deep inside ---------------------------------


@pytest.mark.parametrize(
    ("task", "setting", "message"),
    [
        ("detection", {"lr": -0.1}, "lr must be > 0, got -0.1"),
        ("detection", {"weight_decay": -1}, "weight_decay must be >= 0"),
        ("detection", {"warmup_iters": 0}, "warmup_iters must be >= 1"),
        ("detection", {"num_workers": -1}, "num_workers must be >= 0"),
        ("detection", {"img_scale": [0, 0]}, "img_scale must be"),
        ("detection", {"milestones": [5, 20]}, r"milestones must be epochs in 1..12"),
        ("segmentation", {"lr": 0.0}, "lr must be > 0"),
        ("segmentation", {"clip_grad": 0.0}, "clip_grad must be > 0 or null"),
        ("segmentation", {"ratio_range": [2.0, 0.5]}, "ratio_range must be"),
    ],
)
def test_out_of_range_settings_are_config_errors(task, setting, message):
    """torch's AdamW, mmengine's schedulers and mmcv's crop raised these from a built run."""
    from ibot_bench.downstream import detection, segmentation
    from ibot_bench.errors import ConfigError

    module = detection if task == "detection" else segmentation
    config_cls = (
        detection.DetectionConfig if task == "detection" else segmentation.SegmentationConfig
    )
    module.validate(config_cls())
    with pytest.raises(ConfigError, match=message):
        module.validate(config_cls(**setting))
