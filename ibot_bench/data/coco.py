"""COCO 2017 instances reader: ``ROOT/annotations/instances_{split}2017.json`` + ``ROOT/{split}2017/``.

pycocotools parses the annotations (the same object COCOeval needs); this class only validates
the layout up front, so a wrong path fails with a message naming it instead of deep in a task.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from ibot_bench.data.classification import file_signature, file_signatures, to_rgb
from ibot_bench.errors import DatasetError

SPLITS = ("train", "val")
_HINT = (
    "Download COCO 2017 (images + annotations) there, or write a synthetic one with "
    "ibot_bench.data.synthetic.write_synthetic(OUT) and use OUT/coco."
)


def _load_coco(ann_file: Path) -> Any:
    try:
        from pycocotools.coco import COCO
    except ImportError as exc:
        raise DatasetError(
            "reading COCO needs pycocotools; install it with `pip install pycocotools`."
        ) from exc
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            return COCO(str(ann_file))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as exc:
        raise DatasetError(
            f"COCO annotation file {ann_file} is not valid COCO instances JSON ({exc}); "
            "re-download or regenerate it."
        ) from exc


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
            raise DatasetError(f"COCO annotation file {self.ann_file} is missing. {_HINT}")
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
        self._fingerprint: str | None = None

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
