"""The synthetic shapes generator and the COCO / ADE20K readers that load what it writes."""

from __future__ import annotations

import contextlib
import io
import json
import re
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
ADE = synthetic.ADE20K_DIR  # ade20k/ADEChallengeData2016
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
    first_val = "coco/val2017/000000000013.jpg"  # COCO ids run on from train's 12 images
    assert _files(tiny)[first_val] != _files(tmp_path / "seed4")[first_val]


def test_counts_and_layout(tiny: Path) -> None:
    meta = json.loads((tiny / "synthetic.json").read_text())
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["wnids"] == ["n90020000", "n90100000", "n90120000"]  # fixed per shape, sorted
    assert meta["counts"] == {"train": 12, "val": 12}
    assert sorted(p.name for p in tiny.iterdir()) == sorted(synthetic.ENTRIES)
    for split, n in (("train", 4), ("val", 4)):
        dirs = sorted(p.name for p in (tiny / "imagenet" / split).iterdir())
        assert dirs == meta["wnids"]
        assert all(len(list((tiny / "imagenet" / split / d).glob("*.JPEG"))) == n for d in dirs)
    for coco_dir, ade_dir in (("train2017", "training"), ("val2017", "validation")):
        assert len(list((tiny / "coco" / coco_dir).glob("*.jpg"))) == 12
        assert len(list((tiny / ADE / "images" / ade_dir).glob("*.jpg"))) == 12
        assert len(list((tiny / ADE / "annotations" / ade_dir).glob("*.png"))) == 12
    lines = (tiny / ADE / "classes.txt").read_text().split()
    assert lines == meta["ade20k_classes"] == meta["classes"] + list(synthetic.BACKGROUND_KINDS)
    mapping = (tiny / "imagenet" / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping == [f"{w} {c}" for w, c in zip(meta["wnids"], meta["classes"])]
    with Image.open(tiny / "coco" / "train2017" / "000000000001.jpg") as im:
        assert (im.mode, im.size) == ("RGB", (32, 32))
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")]  # no temp folders
    written = {p.relative_to(tiny).as_posix() for p in tiny.rglob("*") if p.is_file()}
    assert written == synthetic._expected_files(meta)  # what --overwrite may replace


def test_real_file_names(tiny: Path) -> None:
    """ImageNet's, COCO's and ADE20K's own naming schemes, one image behind all three."""
    names = sorted(p.relative_to(tiny / "imagenet").as_posix() for p in tiny.glob("imagenet/*/*/*"))
    assert names[:2] == ["train/n90020000/n90020000_1.JPEG", "train/n90020000/n90020000_2.JPEG"]
    assert names[12] == "val/n90020000/ILSVRC2012_val_00000001.JPEG"
    for name in names:
        split, wnid, file = name.split("/")
        pattern = rf"{wnid}_\d+\.JPEG" if split == "train" else r"ILSVRC2012_val_\d{8}\.JPEG"
        assert re.fullmatch(r"n\d{8}", wnid) and re.fullmatch(pattern, file), name
    coco = {split: CocoDataset(tiny / "coco", split) for split in ("train", "val")}
    ids = [set(c.coco.getImgIds()) for c in coco.values()]
    assert not ids[0] & ids[1]  # unique over both splits, as in COCO
    for split, ds in coco.items():
        for img in ds.coco.dataset["images"]:
            assert img["file_name"] == f"{img['id']:012d}.jpg"
            assert (tiny / "coco" / f"{split}2017" / img["file_name"]).is_file()
    ade = sorted(p.name for p in (tiny / ADE / "images" / "validation").iterdir())
    assert ade[0] == "ADE_val_00000001.jpg" and len(ade) == 12
    # val image i = 6 (class 6 % 3 = 0, circle) is the same file in all three layouts
    same = [
        tiny / "imagenet/val/n90020000/ILSVRC2012_val_00000007.JPEG",
        tiny / "coco/val2017/000000000019.jpg",
        tiny / ADE / "images/validation/ADE_val_00000007.jpg",
    ]
    assert len({p.read_bytes() for p in same}) == 1


def test_images_are_those_of_generator_version_1(tiny: Path) -> None:
    """The file names changed in version 2, the pixels did not: image i of a split is still
    drawn from the random stream (seed, split, i)."""
    classes = synthetic.class_names(3)
    pool = synthetic.background_pool(TINY["seed"], 32)
    for split, stream in (("train", 1), ("val", 2)):
        for it in synthetic.plan(classes, 4, 4)[split][:4]:
            rng = np.random.default_rng([TINY["seed"], stream, it.index])
            sample = synthetic.render_sample(rng, it.label, classes, 32, pool)
            assert (np.asarray(Image.open(tiny / it.ade_mask)) == sample.mask).all()
            buf = io.BytesIO()
            sample.image.save(buf, format="JPEG", quality=synthetic.JPEG_QUALITY)
            assert (tiny / it.imagenet).read_bytes() == buf.getvalue()


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
            ADE20KDataset(tiny / ADE, ade_split),
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
    for c, wnid in zip(meta["classes"], meta["wnids"]):
        for p in sorted((tmp_path / "c" / "imagenet" / "train" / wnid).glob("*.JPEG")):
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
    # the same bytes written at another time: equal by content, different by stat (mtime)
    coco = CocoDataset(tiny / "coco", "train", verify="content")
    ade = ADE20KDataset(tiny / ADE, "training", verify="content")
    assert len(coco.fingerprint()) == 64 and coco.fingerprint() != ade.fingerprint()
    assert coco.fingerprint() == CocoDataset(copy / "coco", "train", verify="content").fingerprint()
    assert (
        ade.fingerprint() == ADE20KDataset(copy / ADE, "training", verify="content").fingerprint()
    )
    assert CocoDataset(tiny / "coco", "train").fingerprint() != (
        CocoDataset(copy / "coco", "train").fingerprint()
    )
    # the folder holding ADEChallengeData2016 reads as the release folder itself
    assert ade.fingerprint() == (
        ADE20KDataset(copy / "ade20k", "training", verify="content").fingerprint()
    )
    for image in (
        "coco/train2017/000000000002.jpg",
        f"{ADE}/images/training/ADE_train_00000002.jpg",
    ):
        with open(copy / image, "ab") as f:
            f.write(b"\0")
    assert coco.fingerprint() != CocoDataset(copy / "coco", "train", verify="content").fingerprint()
    assert ade.fingerprint() != (
        ADE20KDataset(copy / ADE, "training", verify="content").fingerprint()
    )


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
    ade = ADE20KDataset(tmp_path / "easy" / ADE, "training")
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
    ade = ADE20KDataset(tmp_path / "plain" / ADE, "training")
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


# --- `ibot-bench data synth`: a data root for `run --suite full --data-root` -----------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> tuple[Path, str]:
    """`ibot-bench data synth ROOT` with the default counts (10 classes, 200 train / 25 val
    each) at 32 px (the size does not change any file name or split file)."""
    from ibot_bench.cli import main

    root = tmp_path_factory.mktemp("root") / "data"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["data", "synth", str(root), "--size", "32"]) == 0
    return root, out.getvalue()


def test_cli_writes_the_real_layouts(data_root) -> None:
    root, printed = data_root
    meta = json.loads((root / "synthetic.json").read_text())
    assert (meta["num_classes"], meta["counts"]) == (10, {"train": 2000, "val": 250})
    assert (root / "imagenet" / "train").is_dir() and (root / "imagenet" / "val").is_dir()
    assert (root / "coco" / "annotations" / "instances_val2017.json").is_file()
    assert (root / "ade20k" / "ADEChallengeData2016" / "images" / "validation").is_dir()
    for spec in (f"imagefolder:{root}/imagenet", f"coco:{root}/coco", f"ade20k:{root}/{ADE}"):
        assert spec in printed
    assert "1percent.txt: 20 images (1% of train)" in printed
    assert "10percent.txt: 200 images (10% of train)" in printed


@pytest.mark.parametrize("split", ["train", "val"])
def test_root_loads_with_every_reader(data_root, split) -> None:
    from ibot_bench.data import load_split

    root, _ = data_root
    n = {"train": 2000, "val": 250}[split]
    imagenet = load_split(f"imagefolder:{root}/imagenet", split)
    assert len(imagenet) == n and imagenet.class_names[:2] == ["n90010000", "n90020000"]
    assert np.bincount(imagenet.labels).tolist() == [n // 10] * 10
    coco = load_split(f"coco:{root}/coco", split)
    assert len(coco) == n and [c["name"] for c in coco.categories][:2] == ["arrow", "circle"]
    ade = load_split(f"ade20k:{root}/{ADE}", split)
    assert len(ade) == n and ade.class_names[:2] == ["arrow", "circle"]
    # one class order everywhere: ImageFolder label + 1 = COCO category id = ADE mask value;
    # image 7 of a split shows class 7 (of 10) in every layout
    names = dict(line.split() for line in (root / "imagenet" / "LOC_synset_mapping.txt").open())
    assert [names[w] for w in imagenet.class_names] == [c["name"] for c in coco.categories]
    assert [c["name"] for c in coco.categories] == ade.class_names[:10]
    first = "n90100000_1.JPEG" if split == "train" else "ILSVRC2012_val_00000008.JPEG"
    row = [Path(p).name for p in imagenet.paths].index(first)
    _, (ann,) = coco[7]
    _, mask = ade[7]
    assert imagenet.labels[row] + 1 == ann["category_id"] == 8 and (mask == 8).any()
    assert (
        imagenet.read(row).numpy().tobytes() == np.asarray(coco[7][0]).transpose(2, 0, 1).tobytes()
    )


@pytest.mark.parametrize(
    ("name", "fraction", "per_class"), [("1percent.txt", 0.01, 2), ("10percent.txt", 0.1, 20)]
)
def test_split_files_pass_label_subset(data_root, name, fraction, per_class) -> None:
    from ibot_bench.data import load_split
    from ibot_bench.data.subsets import label_subset, read_split_file

    root, _ = data_root
    train = load_split(f"imagefolder:{root}/imagenet", "train")
    path = root / "imagenet" / name
    lines = path.read_text().splitlines()
    assert all(re.fullmatch(r"n\d{8}_\d+\.JPEG", line) for line in lines)  # file names only
    rows = read_split_file(path, train.sample_names)
    assert len(rows) == len(lines) == 10 * per_class
    for line, row in zip(sorted(lines), rows):  # each is an existing train image of its class
        assert Path(train.paths[row]).name == line
        assert train.class_names[train.labels[row]] == line.split("_")[0]
    assert np.bincount(train.labels[rows]).tolist() == [per_class] * 10
    subset, tag = label_subset(train.labels, train.sample_names, fraction=fraction, split_file=path)
    assert (subset == rows).all() and tag.startswith(f"split_file={name}:")
    spec = f"imagefolder:{root}/imagenet?fraction={fraction}&split_file={path}"
    assert len(load_split(spec, "train")) == 10 * per_class  # as suite `full` passes them
    one = set((root / "imagenet" / "1percent.txt").read_text().split())
    assert one <= set((root / "imagenet" / "10percent.txt").read_text().split())


@pytest.mark.parametrize("classes", [1, 3, 10, 12])
@pytest.mark.parametrize("per_class", [1, 7, 8, 20, 79, 80, 100, 140, 250])
def test_split_file_sizes(tmp_path: Path, classes: int, per_class: int) -> None:
    """The recorded `accepted` is exactly what label_subset says; every class gets an image;
    >= 80 (1%) / >= 8 (10%) images per class suffice from 3 classes on."""
    from ibot_bench.data.subsets import label_subset
    from ibot_bench.errors import ConfigError

    names = synthetic.class_names(classes)
    items = synthetic.plan_split("train", names, per_class)
    labels = np.array([it.label for it in items])
    files = [it.imagenet.rsplit("/", 1)[1] for it in items]
    for fraction in synthetic.SPLIT_FILES.values():
        chosen = synthetic.split_file_names(fraction, names, per_class, seed=0)
        assert set(chosen) <= set(files) and len(set(chosen)) == len(chosen)
        counts = np.bincount(labels[[files.index(c) for c in chosen]], minlength=classes)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1
        split_file = tmp_path / "split.txt"
        split_file.write_text("\n".join(chosen) + "\n")
        try:
            label_subset(labels, files, fraction=fraction, split_file=split_file)
            accepted = True
        except ConfigError:
            accepted = False
        k = synthetic.split_file_size(fraction, classes, per_class)
        share = k / len(files)
        assert accepted == (fraction / 1.25 <= share <= fraction * 1.25)
        if classes >= 3 and per_class * fraction >= 0.8:
            assert accepted, (fraction, classes, per_class)
        if per_class * fraction < 0.8:
            assert not accepted and k == classes  # one per class: the closest it can get


def test_cli_notes_one_image_per_class(tmp_path: Path, capsys) -> None:
    from ibot_bench.cli import main

    small = ["--classes", "1", "--train", "100", "--val", "1", "--size", "16"]
    assert main(["data", "synth", str(tmp_path / "root"), *small]) == 0
    out, err = capsys.readouterr()
    assert "1percent.txt: 1 images (1% of train)" in out and "warning" not in err
    assert "note: 1percent.txt lists one image for some classes" in err


def test_overwrite_keeps_other_files(tmp_path: Path, capsys) -> None:
    from ibot_bench.cli import main

    root = tmp_path / "root"
    small = ["--classes", "2", "--train", "2", "--val", "1", "--size", "16"]
    assert main(["data", "synth", str(root), *small]) == 0
    assert "warning: with 2 training images per class 1percent.txt" in capsys.readouterr().err
    (root / "notes.txt").write_text("mine")
    (root / "real").mkdir()
    (root / "real" / "1percent.txt").write_text("n01440764_10026.JPEG\n")
    assert main(["data", "synth", str(root), *small]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["data", "synth", str(root), *small, "--seed", "1", "--overwrite"]) == 0
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 1
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / "real" / "1percent.txt").read_text() == "n01440764_10026.JPEG\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers

    # a file of the user's inside a generated folder: refuse, delete nothing
    (root / "imagenet" / "train" / "n90020000" / "my_photo.JPEG").write_bytes(b"precious")
    (root / "coco" / "annotations" / "captions_val2017.json").write_text("{}")
    before = _files(root)
    assert main(["data", "synth", str(root), *small, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "my_photo.JPEG" in err and "captions_val2017" in err
    assert _files(root) == before
    # the same for a dataset written by generator version 1 (flat names, OUT/ade20k)
    legacy = tmp_path / "legacy"
    meta = {"version": 1, "classes": ["circle"], "counts": {"train": 1, "val": 1}}
    for rel in synthetic_v1_files(meta):
        (legacy / rel).parent.mkdir(parents=True, exist_ok=True)
        (legacy / rel).write_text("x")
    (legacy / "synthetic.json").write_text(json.dumps(meta))
    (legacy / "ade20k" / "images" / "training" / "extra.jpg").write_text("mine")
    with pytest.raises(DatasetError, match="extra.jpg"):
        write_synthetic(legacy, **TINY, overwrite=True)
    (legacy / "ade20k" / "images" / "training" / "extra.jpg").unlink()
    (legacy / "README").write_text("mine")
    write_synthetic(legacy, **TINY, overwrite=True)
    assert (legacy / "README").read_text() == "mine"
    assert not (legacy / "ade20k" / "images").exists()  # the old layout is gone
    assert (legacy / ADE / "images").is_dir()


def synthetic_v1_files(meta: dict) -> list[str]:
    files = ["ade20k/classes.txt"]
    for split, (coco_dir, ade_dir) in synthetic.SPLITS.items():
        stem = f"{split}_000000"
        files += [
            f"imagenet/{split}/circle/{stem}.jpg",
            f"coco/{coco_dir}/{stem}.jpg",
            f"coco/annotations/instances_{coco_dir}.json",
            f"ade20k/images/{ade_dir}/{stem}.jpg",
            f"ade20k/annotations/{ade_dir}/{stem}.png",
        ]
    return files


def test_stale_cache_is_regenerated_and_keeps_shape_names() -> None:
    """A cache folder from generator version 1 is rewritten in the current layout."""
    from ibot_bench.data import cache_root, load_split

    spec = "synthetic:shapes?classes=1&size=16&train=1&val=1"
    out = cache_root() / "synthetic" / "shapes_classes1_size16_train1_val1_seed0"
    meta = {"version": 1, "classes": ["circle"], "counts": {"train": 1, "val": 1}}
    for rel in synthetic_v1_files(meta):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")
    (out / "synthetic.json").write_text(json.dumps(meta))
    data = load_split(spec, "train")
    assert data.class_names == ["circle"]  # the shape names, not the wnid folders
    assert Path(data.paths[0]).name == "n90020000_1.JPEG"
    assert json.loads((out / "synthetic.json").read_text())["version"] == 2
    assert len(load_split(spec + "&layout=ade20k", "val")) == 1
    assert len(load_split(spec + "&layout=coco", "val")) == 1
