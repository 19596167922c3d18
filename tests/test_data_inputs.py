"""Hostile and broken ImageFolder layouts and spec options: each is read correctly or is an
error naming the file or option and the fix (never a deep traceback, never wrong labels)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import make_imagefolder

from ibot_bench.data import load_split
from ibot_bench.data.subsets import label_subset
from ibot_bench.errors import DatasetError, UserError


def test_hidden_files_and_folders_in_class_folders_are_skipped(tiny_imagefolder):
    cls = tiny_imagefolder / "train" / "class_0"
    (cls / "._train_0_0.jpg").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble")
    (cls / ".DS_Store").write_bytes(b"\x00\x00")
    checkpoints = cls / ".ipynb_checkpoints"  # Jupyter's copies: would count images twice
    checkpoints.mkdir()
    (checkpoints / "train_0_0.jpg").write_bytes((cls / "train_0_0.jpg").read_bytes())
    train = load_split(f"imagefolder:{tiny_imagefolder}", "train")
    assert len(train) == 12
    assert not [n for n in train.sample_names if "/." in n]
    for i in range(len(train)):
        train.read(i)


def test_files_not_named_like_images_are_logged(tiny_imagefolder, caplog):
    cls = tiny_imagefolder / "train" / "class_1"
    (cls / "photo.gif").write_bytes((cls / "train_1_0.jpg").read_bytes())
    (cls / "notes.txt").write_text("not an image")
    (tiny_imagefolder / "train" / "loose.jpg").write_bytes((cls / "train_1_0.jpg").read_bytes())
    with caplog.at_level(logging.WARNING, logger="ibot_bench"):
        train = load_split(f"imagefolder:{tiny_imagefolder}", "train")
    assert len(train) == 12
    assert "2 file(s) in class folders are not read" in caplog.text
    assert "1 .gif" in caplog.text and "1 .txt" in caplog.text
    assert "loose.jpg" in caplog.text and "not in a class folder" in caplog.text


@pytest.mark.parametrize("target", ["sibling", "split", "root"])
def test_sub_folder_link_out_of_its_class_is_an_error(tiny_imagefolder, target):
    """A link inside class_0 to class_1 (or up the tree) would label class_1's images as
    class_0 too: an error naming the link, not silently wrong labels."""
    train = tiny_imagefolder / "train"
    to = {"sibling": train / "class_1", "split": train, "root": tiny_imagefolder}[target]
    (train / "class_0" / "more").symlink_to(to, target_is_directory=True)
    with pytest.raises(DatasetError, match="class_0/more is a symbolic link to .*Remove the link"):
        load_split(f"imagefolder:{tiny_imagefolder}", "train")


def test_sub_folder_links_inside_the_class_or_elsewhere_are_read(tiny_imagefolder, tmp_path):
    elsewhere = tmp_path / "extra"
    elsewhere.mkdir()
    cls = tiny_imagefolder / "train" / "class_0"
    (elsewhere / "x.jpg").write_bytes((cls / "train_0_0.jpg").read_bytes())
    (cls / "more").symlink_to(elsewhere, target_is_directory=True)
    (cls / "self").symlink_to(cls, target_is_directory=True)  # entered once
    train = load_split(f"imagefolder:{tiny_imagefolder}", "train")
    assert len(train) == 13
    assert train.labels[train.sample_names.index("class_0/more/x.jpg")] == 0


@pytest.mark.parametrize(
    "option, message",
    [
        ("size=0", "size='0' must be >= 1"),
        ("size=-5", "size='-5' must be >= 1"),
        ("fraction=0.5&subset_seed=-1", "subset_seed='-1' must be >= 0"),
        ("subset_seed=3", "subset_seed='3' needs fraction="),
    ],
)
def test_spec_option_values_are_checked(tiny_imagefolder, option, message):
    with pytest.raises(UserError, match=message):
        load_split(f"imagefolder:{tiny_imagefolder}?{option}", "train")


def test_digits_size_is_checked():
    with pytest.raises(UserError, match="size='0' must be >= 1"):
        load_split("digits?size=0", "train")


def test_a_split_folder_given_as_root_names_the_dataset_folder(tiny_imagefolder):
    with pytest.raises(UserError, match=f"names the train folder.*imagefolder:{tiny_imagefolder}$"):
        load_split(f"imagefolder:{tiny_imagefolder}/train", "train")


def test_a_folder_named_with_a_question_mark_is_explained(tiny_imagefolder, tmp_path):
    odd = tmp_path / "what?x=1"
    tiny_imagefolder.rename(odd)
    with pytest.raises(UserError, match="unknown option.*'x'.*is a folder, but a '\\?' in a spec"):
        load_split(f"imagefolder:{odd}", "train")


def test_split_file_lines_may_be_paths_relative_to_the_train_folder(tmp_path):
    """File names repeating across classes (0001.jpg in every class folder) can be chosen by
    their relative path; bare repeated names stay an error that says so."""
    root = make_imagefolder(tmp_path / "ds", classes=2, per_class=2)
    for c in range(2):  # the same file names in both classes
        for i, jpg in enumerate(sorted((root / "train" / f"class_{c}").iterdir())):
            jpg.rename(jpg.with_name(f"{i:04d}.jpg"))
    (root / "by_path.txt").write_text("# chosen\r\n  ./class_0/0000.jpg\r\nclass_1/0001.jpg\r\n")
    train = load_split(f"imagefolder:{root}?split_file=by_path.txt", "train")
    assert train.sample_names == ["class_0/0000.jpg", "class_1/0001.jpg"]
    assert train.labels.tolist() == [0, 1]
    (root / "by_name.txt").write_text("0000.jpg\n")
    with pytest.raises(UserError, match="match several samples: 0000.jpg; write such lines as"):
        load_split(f"imagefolder:{root}?split_file=by_name.txt", "train")


def test_split_file_lines_in_another_format_are_explained(tiny_imagefolder):
    (tiny_imagefolder / "labels.txt").write_text("train_0_0.jpg 0\n   # an indented comment\n")
    with pytest.raises(UserError, match="1 of 1 names .*e.g. train_0_0.jpg 0. Each line is one"):
        load_split(f"imagefolder:{tiny_imagefolder}?split_file=labels.txt", "train")


def test_split_file_naming_skipped_images_leaves_them_out(tmp_path, caplog):
    """semi with features.skip_corrupt: an unreadable image the split file lists is left out
    with a warning, not called 'not in the dataset'."""
    (tmp_path / "split.txt").write_text("a/0.jpg\nb.jpg\nc.jpg\n")
    names, labels = ["a/0.jpg", "x/c.jpg"], np.array([0, 1])
    with caplog.at_level(logging.WARNING, logger="ibot_bench"):
        rows, _ = label_subset(labels, names, split_file=tmp_path / "split.txt",
                               skipped=["y/b.jpg"])  # fmt: skip
    assert rows.tolist() == [0, 1]
    assert "1 of its images were skipped as unreadable" in caplog.text and "b.jpg" in caplog.text
    with pytest.raises(UserError, match="not in the dataset .* e.g. b.jpg"):
        label_subset(labels, names, split_file=tmp_path / "split.txt")
    (tmp_path / "gone.txt").write_text("b.jpg\n")
    with pytest.raises(UserError, match="every image it lists is unreadable"):
        label_subset(labels, names, split_file=tmp_path / "gone.txt", skipped=["y/b.jpg"])
