"""The synthetic shapes generator and the COCO / ADE20K readers that load what it writes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ibot_bench.data import synthetic
from ibot_bench.data.ade20k import ADE20KDataset
from ibot_bench.data.coco import CocoDataset
from ibot_bench.data.synthetic import write_synthetic
from ibot_bench.errors import DatasetError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY = {"num_classes": 3, "train_per_class": 4, "val_per_class": 4, "image_size": 32, "seed": 3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "shapes"
    write_synthetic(out, **TINY)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_deterministic(tiny: Path, tmp_path: Path) -> None:
    write_synthetic(tmp_path / "again", **TINY)
    assert _files(tiny) == _files(tmp_path / "again")
    other = write_synthetic(tmp_path / "seed4", **{**TINY, "seed": 4})
    assert other["seed"] == 4
    assert (
        _files(tiny)["coco/val2017/val_000000.jpg"]
        != _files(tmp_path / "seed4")["coco/val2017/val_000000.jpg"]
    )


def test_counts_and_layout(tiny: Path) -> None:
    meta = json.loads((tiny / "synthetic.json").read_text())
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["counts"] == {"train": 12, "val": 12}
    for split, n in (("train", 4), ("val", 4)):
        dirs = sorted(p.name for p in (tiny / "imagenet" / split).iterdir())
        assert dirs == meta["classes"]
        assert all(len(list((tiny / "imagenet" / split / d).glob("*.jpg"))) == n for d in dirs)
    for coco_dir, ade_dir in (("train2017", "training"), ("val2017", "validation")):
        assert len(list((tiny / "coco" / coco_dir).glob("*.jpg"))) == 12
        assert len(list((tiny / "ade20k" / "images" / ade_dir).glob("*.jpg"))) == 12
        assert len(list((tiny / "ade20k" / "annotations" / ade_dir).glob("*.png"))) == 12
    lines = (tiny / "ade20k" / "classes.txt").read_text().split()
    assert lines == meta["ade20k_classes"] == meta["classes"] + list(synthetic.BACKGROUND_KINDS)
    with Image.open(tiny / "coco" / "train2017" / "train_000000.jpg") as im:
        assert (im.mode, im.size) == ("RGB", (32, 32))
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")]  # no temp folders


def test_coco_loads_and_gt_scores_ap_one(tiny: Path) -> None:
    from pycocotools.cocoeval import COCOeval

    ds = CocoDataset(tiny / "coco", "val")
    assert len(ds) == 12
    assert [c["name"] for c in ds.categories] == ["circle", "square", "triangle"]
    image, anns = ds[0]
    assert image.size == (32, 32) and len(anns) == 1 and anns[0]["iscrowd"] == 0
    x, y, w, h = anns[0]["bbox"]
    assert min(x, y) >= 0 and max(x + w, y + h) <= 32
    gt = ds.coco.dataset["annotations"]
    for iou_type in ("bbox", "segm"):  # detector-style results: boxes, RLE masks
        dets = [
            {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0}
            | ({"bbox": a["bbox"]} if iou_type == "bbox" else {"segmentation": ds.coco.annToRLE(a)})
            for a in gt
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(ds.coco, ds.coco.loadRes(dets), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou_type


def test_polygons_agree_with_ade_masks(tiny: Path) -> None:
    inter = union = 0
    for coco_split, ade_split in (("train", "training"), ("val", "validation")):
        coco, ade = (
            CocoDataset(tiny / "coco", coco_split),
            ADE20KDataset(tiny / "ade20k", ade_split),
        )
        assert len(coco) == len(ade) and ade.num_classes == 3 + len(synthetic.BACKGROUND_KINDS)
        for i in range(len(coco)):
            _, (ann,) = coco[i]
            _, mask = ade[i]
            assert mask.dtype == np.uint8 and mask.max() <= ade.num_classes
            poly = coco.coco.annToMask(ann).astype(bool)
            shape = mask == ann["category_id"]
            assert (poly & shape).sum() / (poly | shape).sum() > 0.85  # pycocotools' raster
            inter, union = inter + (poly & shape).sum(), union + (poly | shape).sum()
            assert set(np.unique(mask[~shape])) <= {0, 4, 5, 6, 7}  # unlabelled or stuff
    assert inter / union > 0.9


def test_class_not_predictable_from_mean_colour(tmp_path: Path) -> None:
    cfg = {"num_classes": 3, "train_per_class": 40, "val_per_class": 1, "image_size": 32}
    meta = write_synthetic(tmp_path / "c", **cfg)
    feats = {c: [] for c in meta["classes"]}
    for c in meta["classes"]:
        for p in sorted((tmp_path / "c" / "imagenet" / "train" / c).glob("*.jpg")):
            feats[c].append(np.asarray(Image.open(p), float).mean((0, 1)))
    means = np.stack([np.mean(v, 0) for v in feats.values()])
    within = np.sqrt(np.mean([np.var(v, 0) for v in feats.values()], 0))
    # With colours and backgrounds shared by all classes, class means differ only by noise
    # (standard error ~ within / sqrt(40) ~ 0.16 within); colour-by-class would give >> 1.
    assert (np.abs(means - means.mean(0)) < 0.6 * within).all()


def test_refuses_to_overwrite(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    write_synthetic(out, **TINY)
    with pytest.raises(DatasetError, match="not empty"):
        write_synthetic(out, **TINY)
    meta = write_synthetic(out, **{**TINY, "seed": 5}, overwrite=True)
    assert json.loads((out / "synthetic.json").read_text()) == meta
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="synthetic.json"):
        write_synthetic(foreign, **TINY, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(DatasetError, match="num_classes"):
        write_synthetic(tmp_path / "e", num_classes=len(synthetic.SHAPES) + 1)


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_move_into_place", boom)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(tmp_path / "f", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_reader_errors(tiny: Path, tmp_path: Path) -> None:
    for reader in (CocoDataset, ADE20KDataset):
        with pytest.raises(DatasetError, match="nowhere"):
            reader(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="split"):
        CocoDataset(tiny / "coco", "test")
    broken = tmp_path / "ade"
    (broken / "images" / "training").mkdir(parents=True)
    (broken / "annotations" / "training").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(broken / "images" / "training" / "lonely.jpg")
    with pytest.raises(DatasetError, match="lonely"):
        ADE20KDataset(broken)
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        CocoDataset(tmp_path / "coco", "val")


def test_fingerprints(tiny: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    write_synthetic(copy, **TINY)
    coco, ade = CocoDataset(tiny / "coco", "train"), ADE20KDataset(tiny / "ade20k", "training")
    assert len(coco.fingerprint()) == 64 and coco.fingerprint() != ade.fingerprint()
    assert coco.fingerprint() == CocoDataset(copy / "coco", "train").fingerprint()
    assert ade.fingerprint() == ADE20KDataset(copy / "ade20k", "training").fingerprint()
    for image in ("coco/train2017/train_000001.jpg", "ade20k/images/training/train_000001.jpg"):
        with open(copy / image, "ab") as f:
            f.write(b"\0")
    assert coco.fingerprint() != CocoDataset(copy / "coco", "train").fingerprint()
    assert ade.fingerprint() != ADE20KDataset(copy / "ade20k", "training").fingerprint()


def test_difficulty_knobs(tmp_path: Path) -> None:
    easy = synthetic.Difficulty(distractors=0, texture=0, area=(0.3, 0.4))
    meta = write_synthetic(tmp_path / "easy", **TINY, difficulty=easy)
    assert meta["difficulty"] == {
        "distractors": 0,
        "texture_percent": 0,
        "area_fraction": [0.3, 0.4],
        "colours": 12,
        "backgrounds": 24,
    }
    ade = ADE20KDataset(tmp_path / "easy" / "ade20k", "training")
    for i in range(len(ade)):
        image, mask = ade[i]
        assert 0 not in mask  # no distractors: every pixel is the shape or background
        shape = mask <= 3
        assert 0.25 < shape.mean() < 0.45  # area 30-40% (pixel-centre raster, 32 px)
        near = ndimage.binary_dilation(shape, iterations=2)  # anti-aliased shape edge
        bg = np.asarray(image, float)[~near]
        assert bg.std(0).max() < 8  # flat background (JPEG noise only)
    with pytest.raises(DatasetError, match="texture"):
        synthetic.Difficulty(texture=150)
    with pytest.raises(DatasetError, match="colours"):
        synthetic.Difficulty(colours=0)
    with pytest.raises(DatasetError, match="backgrounds"):
        synthetic.Difficulty(backgrounds=25)


def test_one_colour_one_background_leaves_only_the_shape(tmp_path: Path) -> None:
    plain = synthetic.Difficulty(distractors=0, texture=0, colours=1, backgrounds=1)
    write_synthetic(tmp_path / "plain", **TINY, difficulty=plain)
    ade = ADE20KDataset(tmp_path / "plain" / "ade20k", "training")
    shape_rgb, bg_rgb, kinds = [], [], set()
    for i in range(len(ade)):
        image, mask = ade[i]
        pixels = np.asarray(image, float)
        inner = ndimage.binary_erosion(mask <= 3, iterations=2)
        outer = ~ndimage.binary_dilation(mask <= 3, iterations=2)
        shape_rgb.append(np.median(pixels[inner], 0))
        bg_rgb.append(np.median(pixels[outer], 0))
        kinds |= set(np.unique(mask[mask > 3]).tolist())
    assert np.ptp(shape_rgb, 0).max() < 12  # one shape colour (JPEG noise only) ...
    assert np.ptp(bg_rgb, 0).max() < 12  # ... on one background
    assert np.abs(np.mean(shape_rgb, 0) - synthetic.PALETTE[0]).max() < 12
    assert len(kinds) == 1
    four = synthetic.background_pool(0, 32, synthetic.Difficulty(backgrounds=4))
    assert [b.kind for b in four] == list(synthetic.BACKGROUND_KINDS)  # one of each kind
    with pytest.raises(DatasetError, match="area"):
        synthetic.Difficulty(area=(0.5, 0.2))


def test_spec_options_select_the_difficulty() -> None:
    from ibot_bench.data import load_split

    spec = "synthetic:shapes?classes=3&train=2&val=1&size=32&distractors=0&texture=0"
    data = load_split(spec, "train")
    meta = json.loads((Path(data.paths[0]).parents[3] / "synthetic.json").read_text())
    assert meta["difficulty"]["distractors"] == 0 and meta["difficulty"]["texture_percent"] == 0
    plain = load_split(spec + "&colours=1", "train")
    assert (
        Path(plain.paths[0])
        .parents[3]
        .name.endswith("distractors0_texture0_min_area7_max_area20_colours1")
    )
    default = load_split("synthetic:shapes?classes=3&train=2&val=1&size=32", "train")
    assert Path(default.paths[0]).parents[3].name == "shapes_classes3_size32_train2_val1_seed0"
