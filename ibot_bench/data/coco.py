"""COCO 2017 instances reader: ``ROOT/annotations/instances_{split}2017.json`` + ``ROOT/{split}2017/``.

pycocotools parses the annotations (the same object COCOeval needs); this class only validates
the layout up front, so a wrong path fails with a message naming it instead of deep in a task.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from ibot_bench.data.classification import (
    data_root_hint,
    file_signature,
    file_signatures,
    to_rgb,
)
from ibot_bench.errors import DatasetError

SPLITS = ("train", "val")
_HINT = (
    "Download COCO 2017 (images + annotations) there, or write a synthetic one with "
    "`ibot-bench data synth OUT` and use coco:OUT/coco."
)


# what mmdet's CocoDataset and COCOeval read of every entry (a missing one is a KeyError there)
_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox", "area", "segmentation")


def preview_ids(items: list) -> str:
    """Up to 3 of ``items`` for a message, with how many more there are."""
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return ", ".join(str(x) for x in items[:3]) + more


def _bad_annotations(anns: list[dict], image_ids: set, category_ids: set) -> dict[str, list]:
    """Annotation ids by what is wrong with them (only annotations holding every key)."""
    bad: dict[str, list] = {}
    for a in anns:
        if any(key not in a for key in _ANN_KEYS):
            continue
        for what, wrong in (
            ("an image_id not in 'images'", a["image_id"] not in image_ids),
            ("a category_id not in 'categories'", a["category_id"] not in category_ids),
            ("a bbox that is not [x, y, w, h]", not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4)),
            ("an empty segmentation", not a["segmentation"]),
        ):  # fmt: skip
            if wrong:
                bad.setdefault(what, []).append(a["id"])
    return bad


def instance_problems(data: dict) -> list[str]:
    """What in a COCO instances dict mmdet or COCOeval would crash on, or drop without a word:
    entries lacking a key they read, repeated ids (pycocotools keeps one of them),
    annotations of images or categories the file does not list, bboxes that are not
    ``[x, y, w, h]``, empty segmentations. One line per kind, naming up to 3 entries."""
    absent = [key for key in ("images", "categories") if key not in data]
    if absent:
        return [f"it has no {' or '.join(map(repr, absent))} list"]
    images, anns = data["images"], data.get("annotations", [])
    problems = []
    for kind, items, keys in (("image", images, _IMAGE_KEYS), ("annotation", anns, _ANN_KEYS)):
        for key in keys:
            lacking = [i for i, item in enumerate(items) if key not in item]
            if lacking:
                problems.append(
                    f"{len(lacking)} {kind}(s) (index {preview_ids(lacking)}) have no {key!r}"
                )
        counts = Counter(item["id"] for item in items if "id" in item)
        repeated = [i for i, n in counts.items() if n > 1]
        if repeated:
            problems.append(f"{kind} id(s) {preview_ids(repeated)} are used more than once")
    image_ids = {img.get("id") for img in images}
    category_ids = {cat.get("id") for cat in data["categories"]}
    for what, ids in _bad_annotations(anns, image_ids, category_ids).items():
        problems.append(f"{len(ids)} annotation(s) (id {preview_ids(ids)}) have {what}")
    return problems


def _load_coco(ann_file: Path) -> Any:
    """pycocotools' index of ``ann_file``, after :func:`instance_problems` found nothing."""
    try:
        from pycocotools.coco import COCO
    except ImportError as exc:
        raise DatasetError(
            "reading COCO needs pycocotools; install it with `pip install pycocotools`."
        ) from exc
    try:
        data = json.loads(ann_file.read_bytes())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        problems = instance_problems(data)
        if problems:
            raise DatasetError(
                f"COCO annotation file {ann_file}: {'; '.join(problems)}. Fix the file: mmdet "
                "and COCO evaluation would fail on these entries or skip them silently."
            )
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex() prints progress lines
            coco.createIndex()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(
            f"COCO annotation file {ann_file} is not valid COCO instances JSON ({exc}); "
            "re-download or regenerate it."
        ) from exc
    return coco


class CocoDataset:
    """Images and their instance annotations of one COCO split, in image-id order."""

    def __init__(self, root: str | Path, split: str = "train", verify: str = "stat") -> None:
        if split not in SPLITS:
            raise DatasetError(f"COCO split {split!r} is unknown; use one of {SPLITS}.")
        self.root, self.split = Path(root), split
        self.verify = verify  # what fingerprint() reads of each file: "stat" or "content"
        self.ann_file = self.root / "annotations" / f"instances_{split}2017.json"
        self.image_dir = self.root / f"{split}2017"
        if not self.root.is_dir():
            raise DatasetError(f"COCO root {self.root} does not exist. {_HINT}")
        if not self.ann_file.is_file():
            hint = data_root_hint(self.root, "coco", "coco") or f" {_HINT}"
            raise DatasetError(f"COCO annotation file {self.ann_file} is missing.{hint}")
        if not self.image_dir.is_dir():
            raise DatasetError(f"COCO image folder {self.image_dir} is missing. {_HINT}")
        self.coco = _load_coco(self.ann_file)
        self.ids: list[int] = sorted(self.coco.getImgIds())
        present = {p.name for p in self.image_dir.iterdir()}
        missing = [
            name for name in (self.coco.imgs[i]["file_name"] for i in self.ids)
            if name not in present
        ]  # fmt: skip
        if missing:
            raise DatasetError(
                f"COCO: {len(missing)} image(s) listed in {self.ann_file} are missing from "
                f"{self.image_dir} (e.g. {', '.join(missing[:3])}); re-download or regenerate."
            )
        if split == "val":
            self._check_sizes()
        self._fingerprint: str | None = None

    def _check_sizes(self) -> None:
        """Val images must have the ``width``/``height`` the file gives them: COCO evaluation
        decodes the ground-truth masks at that size and the predictions at the image's, and
        pycocotools scores masks of two sizes as IoU -1 (no match): mask AP silently lower.
        Reads only the headers."""
        wrong = []
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            try:
                with Image.open(self.image_dir / info["file_name"]) as im:
                    size = im.size
            except (OSError, ValueError):
                continue  # unreadable: named by the pipeline's image loader
            if size != (info["width"], info["height"]):
                wrong.append(
                    f"{info['file_name']} is {size[0]}x{size[1]}, listed as "
                    f"{info['width']}x{info['height']}"
                )
        if wrong:
            raise DatasetError(
                f"COCO val: {len(wrong)} image(s) differ from the width/height in "
                f"{self.ann_file} ({preview_ids(wrong)}); their masks would match nothing in mask "
                "AP. Fix the "
                "sizes in the file or replace the images."
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Image.Image, list[dict]]:
        """The RGB image and its annotation dicts (bbox ``[x, y, w, h]``, segmentation...)."""
        img_id = self.ids[index]
        path = self.image_dir / self.coco.imgs[img_id]["file_name"]
        try:
            with Image.open(path) as im:
                image = to_rgb(im)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"COCO image {path} cannot be read ({exc}); replace it.") from exc
        return image, self.coco.loadAnns(self.coco.getAnnIds(imgIds=[img_id]))

    @property
    def categories(self) -> list[dict]:
        """Category dicts (``id``, ``name``...) sorted by id."""
        return [self.coco.cats[k] for k in sorted(self.coco.cats)]

    def fingerprint(self) -> str:
        """sha256 over the split, the annotation file and each image's name, as
        :func:`~ibot_bench.data.classification.file_signature` records them.

        Default: each file's size and mtime in nanoseconds (one ``stat`` each); the
        annotation JSON's bytes are hashed as well (it is parsed in full anyway). With
        ``verify="content"`` (spec ``?verify=content``) the sha256 of every file instead,
        mtime ignored.
        """
        if self._fingerprint is None:
            mode = "content" if self.verify == "content" else "stat"
            h = hashlib.sha256(f"coco:{self.split}\nfingerprint-v2 files={mode}\n".encode())
            ann = f"annotations/{self.ann_file.name}"
            h.update(f"{ann}\t{file_signature(self.ann_file, 'content')}\n".encode())
            if mode == "stat":
                h.update(f"{ann}\t{file_signature(self.ann_file)}\n".encode())
            names = sorted(self.coco.imgs[i]["file_name"] for i in self.ids)
            sigs = file_signatures([self.image_dir / n for n in names], mode)
            h.update(
                "".join(f"{self.split}2017/{n}\t{sig}\n" for n, sig in zip(names, sigs)).encode()
            )
            self._fingerprint = h.hexdigest()
        return self._fingerprint
