"""Dataset specs, ImageFolder scanning, subsets and the errors users hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ibot_bench.data import load_split, parse_spec, require_classification
from ibot_bench.data.classification import EvalTransform, normalize_batch
from ibot_bench.errors import DatasetError, UserError


def test_imagefolder_reads_classes_sorted(tiny_imagefolder):
    data = load_split(f"imagefolder:{tiny_imagefolder}", "train")
    assert data.class_names == ["class_0", "class_1", "class_2"]
    assert len(data) == 12 and data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    img = data.read(0)
    assert img.dtype.__str__() == "torch.uint8" and tuple(img.shape) == (3, 32, 32)
    assert data.sample_names[0] == "class_0/train_0_0.jpg"


def test_fingerprint_changes_with_files(tiny_imagefolder):
    spec = f"imagefolder:{tiny_imagefolder}"
    before = load_split(spec, "train").fingerprint()
    assert before == load_split(spec, "train").fingerprint()
    assert before != load_split(spec, "val").fingerprint()
    (tiny_imagefolder / "train" / "class_0" / "train_0_0.jpg").write_bytes(b"x" * 10)
    assert load_split(spec, "train").fingerprint() != before


def test_missing_root_names_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_split(f"imagefolder:{tmp_path / 'nope'}", "train")


def test_empty_root_and_empty_class_folder(tmp_path, tiny_imagefolder):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_split(f"imagefolder:{tmp_path / 'empty'}", "train")
    (tiny_imagefolder / "train" / "class_9").mkdir()
    with pytest.raises(DatasetError, match="class_9 has no images"):
        load_split(f"imagefolder:{tiny_imagefolder}", "train")


def test_corrupt_image_error_names_file(tiny_imagefolder):
    bad = tiny_imagefolder / "train" / "class_1" / "train_1_2.jpg"
    bad.write_bytes(bad.read_bytes()[:50])
    data = load_split(f"imagefolder:{tiny_imagefolder}", "train")
    with pytest.raises(DatasetError, match="train_1_2.jpg"):
        data.read(6)


def test_digits_fixed_split():
    train, val = load_split("digits", "train"), load_split("digits", "val")
    assert len(train) + len(val) == 1797 and abs(len(val) - 360) <= 5
    assert train.fingerprint() == load_split("digits", "train").fingerprint()
    assert tuple(train.read(0).shape) == (3, 8, 8)


def test_subset_options_apply_to_train_only(tiny_imagefolder):
    spec = f"imagefolder:{tiny_imagefolder}?fraction=0.5&subset_seed=1"
    sub = load_split(spec, "train")
    assert len(sub) == 6 and np.bincount(sub.labels).tolist() == [2, 2, 2]
    assert sub.fingerprint() != load_split(f"imagefolder:{tiny_imagefolder}", "train").fingerprint()
    assert len(load_split(spec, "val")) == 12
    names = load_split(f"imagefolder:{tiny_imagefolder}", "train").sample_names
    split_file = tiny_imagefolder / "1percent.txt"
    split_file.write_text("\n".join(n.split("/")[-1] for n in names[:3]) + "\n")
    assert len(load_split(f"imagefolder:{tiny_imagefolder}?split_file={split_file}", "train")) == 3


def test_spec_errors(tmp_path):
    assert parse_spec("synthetic:shapes?size=32") == ("synthetic", "shapes", {"size": "32"})
    with pytest.raises(UserError, match="unknown dataset 'imagefoldr'.*imagefolder"):
        load_split("imagefoldr:/x", "train")
    with pytest.raises(UserError, match="unknown option"):
        load_split("synthetic:shapes?sizes=3", "train")
    with pytest.raises(UserError, match="did you mean imagefolder"):
        load_split(str(tmp_path), "train")
    with pytest.raises(UserError, match="COCO root /data/coco does not exist"):
        load_split("coco:/data/coco", "train")
    spec = "synthetic:shapes?classes=3&size=32&train=2&val=1&layout=coco"
    coco = load_split(spec, "train")
    assert len(coco) == 6 and [c["name"] for c in coco.categories] == [
        "circle",
        "square",
        "triangle",
    ]
    with pytest.raises(UserError, match="dense tasks"):
        require_classification(coco, spec)


def test_synthetic_spec_generates_once(tmp_path):
    data = load_split("synthetic:shapes?classes=3&size=32&train=2&val=1", "train")
    assert len(data) == 6 and data.default_img_size == 32
    meta = Path(data.root).parents[1] / "synthetic.json"
    stamp = meta.stat().st_mtime_ns
    again = load_split("synthetic:shapes?classes=3&size=32&train=2&val=1", "val")
    assert len(again) == 3 and meta.stat().st_mtime_ns == stamp  # read back, not regenerated


def test_eval_transform_and_normalize():
    import torch

    t = EvalTransform.for_size(224)
    assert (t.crop, t.resize) == (224, 256)
    img = torch.randint(0, 255, (3, 300, 400), dtype=torch.uint8)
    out = t(img)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 224, 224)
    x = normalize_batch(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.2489, 2.4286, 2.6400]), atol=1e-3)


def test_relative_roots_become_absolute(tmp_path, monkeypatch):
    """mmdet / mmseg join their data_root to the paths they get: a relative root would be
    joined twice (root/coco/root/coco/annotations/...)."""
    from ibot_bench.data.synthetic import ADE20K_DIR, write_synthetic

    write_synthetic(tmp_path / "root", num_classes=2, train_per_class=2, val_per_class=1, image_size=32)  # fmt: skip
    monkeypatch.chdir(tmp_path)
    coco = load_split("coco:root/coco", "train")
    assert coco.root == tmp_path / "root" / "coco" and coco.ann_file.is_absolute()
    ade = load_split(f"ade20k:root/{ADE20K_DIR}", "val")
    assert ade.root.is_absolute() and ade.image_dir.is_absolute() and ade.mask_dir.is_absolute()
    images = load_split("imagefolder:root/imagenet", "train")
    assert all(Path(p).is_absolute() for p in images.paths)
    monkeypatch.chdir(tmp_path / "root")  # a later change of directory reads the same files
    assert images.read(0).shape[0] == 3


def test_relative_split_file_is_found_in_the_dataset_root(tmp_path, monkeypatch, tiny_imagefolder):
    names = load_split(f"imagefolder:{tiny_imagefolder}", "train").sample_names
    (tiny_imagefolder / "1percent.txt").write_text("\n".join(Path(n).name for n in names[:3]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not in the current directory: in ROOT
    assert len(load_split(f"imagefolder:{tiny_imagefolder}?split_file=1percent.txt")) == 3
    (elsewhere / "mine.txt").write_text(Path(names[0]).name)  # not in ROOT: from the cwd
    assert len(load_split(f"imagefolder:{tiny_imagefolder}?split_file=mine.txt")) == 1
    with pytest.raises(UserError) as err:
        load_split(f"imagefolder:{tiny_imagefolder}?split_file=10percent.txt")
    assert f"looked for {tiny_imagefolder / '10percent.txt'} or {elsewhere / '10percent.txt'}" in str(err.value)  # fmt: skip


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    """16-bit PNGs and float TIFFs keep their contrast (Pillow's convert clips them to
    near-constant images); a float image outside [0, 1] is refused, naming the file."""
    from PIL import Image

    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(folder / "g16.png")
    Image.fromarray(ramp.astype(np.float32)).save(folder / "f.tiff")
    data = load_split(f"imagefolder:{tmp_path}", "train")
    expected = np.round(ramp * 255)
    for i in range(2):
        image = data.read(i).numpy()
        assert np.abs(image - expected).max() <= 1 and (image[0] == image[1]).all(), data.paths[i]
    Image.fromarray((ramp * 7).astype(np.float32)).save(folder / "f.tiff")
    refused = r"f\.tiff: a float image \(mode F\) with values in \[0, 7\]"
    with pytest.raises(DatasetError, match=refused):
        load_split(f"imagefolder:{tmp_path}", "train").read(0)


def test_images_in_sub_folders_of_a_class_are_included(tmp_path, tiny_imagefolder):
    """As torchvision's ImageFolder: a class folder's sub-folders are read, in a fixed
    order; a link back up the tree is entered once."""
    flat = load_split(f"imagefolder:{tiny_imagefolder}", "train")
    first = tiny_imagefolder / "train" / flat.class_names[0]
    deeper = first / "more" / "deeper"
    deeper.mkdir(parents=True)
    image = Path(flat.paths[0]).read_bytes()
    (first / "more" / "b.jpg").write_bytes(image)
    (deeper / "a.jpg").write_bytes(image)
    (first / "loop").symlink_to(first, target_is_directory=True)
    data = load_split(f"imagefolder:{tiny_imagefolder}", "train")
    assert len(data) == len(flat) + 2
    assert data.sample_names[4:6] == [f"{first.name}/more/b.jpg", f"{first.name}/more/deeper/a.jpg"]
    assert (data.labels[:6] == 0).all()
    assert load_split(f"imagefolder:{tiny_imagefolder}", "train").paths == data.paths


def test_a_split_file_edited_in_place_is_a_new_run(tiny_imagefolder):
    """The semi tasks' label subset from ``split_file``: its content is part of the resume key
    and the work folder's name, so an edited file never resumes or reuses the old run."""
    from ibot_bench.evaluate import plan_eval

    names = sorted(p.name for p in (tiny_imagefolder / "train").rglob("*.jpg"))
    listed = tiny_imagefolder / "mine.txt"
    listed.write_text("\n".join(names[:3]) + "\n")

    def key(task: str) -> tuple:
        spec = f"imagefolder:{tiny_imagefolder}"
        return plan_eval(
            task, "random:vit_tiny_patch8", spec, overrides=["split_file=mine.txt"]
        ).resume_key()

    before = key("semi"), key("semi-finetune")
    assert key("semi") == before[0]  # unchanged file: the same run
    listed.write_text("\n".join(names[3:6]) + "\n")
    assert key("semi")[2] != before[0][2] and key("semi-finetune")[2] != before[1][2]


def test_a_split_file_missing_classes_is_named(tiny_imagefolder, caplog):
    """A split file that labels no image of some classes is kept (it is the file's choice),
    with a warning naming those classes: a classifier can never predict them."""
    from ibot_bench.data.subsets import label_subset

    train = load_split(f"imagefolder:{tiny_imagefolder}", "train")
    first = [Path(n).name for n, y in zip(train.sample_names, train.labels) if y == 0]
    (tiny_imagefolder / "one.txt").write_text("\n".join(first) + "\n")
    args = dict(split_file="one.txt", class_names=train.class_names, root=tiny_imagefolder)
    with caplog.at_level("WARNING"):
        rows, _ = label_subset(train.labels, train.sample_names, **args)
    assert set(train.labels[rows]) == {0}
    assert "labels no image of 2 of 3 classes (class_1, class_2)" in caplog.text
