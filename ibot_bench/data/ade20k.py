"""ADE20K (ADEChallengeData2016 layout) reader: ``images/<split>/*.jpg`` + ``annotations/<split>/*.png``.

Masks are single-channel uint8: 0 = other/unlabelled (ignored after mmseg's
``reduce_zero_label``), 1..K = classes. Class names come from ``ROOT/classes.txt`` (one name
per line, line k names mask value k), which the synthetic generator writes; real ADE20K has
no such file, so its 150 classes get numbered names ``class_001``..``class_150``.
ROOT is the ``ADEChallengeData2016`` folder, or the folder it was unpacked into.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from ibot_bench.data.classification import data_root_hint, file_signatures, to_rgb
from ibot_bench.errors import DatasetError

SPLITS = ("training", "validation")
RELEASE_DIR = "ADEChallengeData2016"  # ROOT may also be the folder holding it
ADE20K_NUM_CLASSES = 150
_HINT = (
    "Point it at ADEChallengeData2016 (holding images/ and annotations/), or write a "
    "synthetic one with `ibot-bench data synth OUT` and use ade20k:OUT/ade20k."
)


def _stems(folder: Path, suffix: str) -> dict[str, Path]:
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() == suffix}


def _list_preview(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def read_mask(path: str | Path, shape: tuple[int, int], fix: str = "replace it") -> np.ndarray:
    """The (H, W) uint8 label mask at ``path``, which must match the image's ``shape``
    (H, W); a DatasetError naming the file, ending with ``fix``, when it cannot be decoded
    or does not fit."""
    try:
        with Image.open(path) as m:
            mode, mask = m.mode, np.array(m)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"ADE20K mask {path} cannot be read ({exc}); {fix}.") from exc
    if mode not in ("L", "P") or mask.shape != tuple(shape):
        raise DatasetError(
            f"ADE20K mask {path} must be a single-channel uint8 PNG of the image's size "
            f"{shape[1]}x{shape[0]}; it is mode {mode} with shape {mask.shape}: {fix}."
        )
    return mask


class ADE20KDataset:
    """Image / label-mask pairs of one ADE20K split, sorted by file name."""

    def __init__(self, root: str | Path, split: str = "training", verify: str = "stat") -> None:
        if split not in SPLITS:
            raise DatasetError(f"ADE20K split {split!r} is unknown; use one of {SPLITS}.")
        self.root, self.split = Path(root), split
        self.verify = verify  # what fingerprint() reads of each file: "stat" or "content"
        if not (self.root / "images").is_dir() and (self.root / RELEASE_DIR / "images").is_dir():
            self.root = self.root / RELEASE_DIR  # the folder the release was unpacked into
        self.image_dir = self.root / "images" / split
        self.mask_dir = self.root / "annotations" / split
        if not self.root.is_dir():
            raise DatasetError(f"ADE20K root {self.root} does not exist. {_HINT}")
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                hint = data_root_hint(self.root, "ade20k", "ade20k") or f" {_HINT}"
                raise DatasetError(f"ADE20K folder {folder} is missing.{hint}")
        images, masks = _stems(self.image_dir, ".jpg"), _stems(self.mask_dir, ".png")
        no_mask, no_image = sorted(images.keys() - masks), sorted(masks.keys() - images)
        if no_mask or no_image:
            parts = []
            if no_mask:
                parts.append(f"images without a mask in {self.mask_dir}: {_list_preview(no_mask)}")
            if no_image:
                parts.append(
                    f"masks without an image in {self.image_dir}: {_list_preview(no_image)}"
                )
            raise DatasetError(
                f"ADE20K {split}: unpaired files ({'; '.join(parts)}); restore or remove them."
            )
        if not images:
            raise DatasetError(f"ADE20K folder {self.image_dir} holds no .jpg images. {_HINT}")
        stems = sorted(images)
        self.pairs: list[tuple[Path, Path]] = [(images[s], masks[s]) for s in stems]
        self.class_names: list[str] = self._read_class_names()
        self._fingerprint: str | None = None

    def _read_class_names(self) -> list[str]:
        path = self.root / "classes.txt"
        if not path.is_file():
            return [f"class_{k:03d}" for k in range(1, ADE20K_NUM_CLASSES + 1)]
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise DatasetError(f"{path} is empty; list one class name per line or delete it.")
        return names

    @property
    def num_classes(self) -> int:
        """Classes 1..K (value 0, unlabelled, is not counted)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and its (H, W) uint8 label mask."""
        image_path, mask_path = self.pairs[index]
        try:
            with Image.open(image_path) as im:
                image = to_rgb(im)
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"ADE20K image {image_path} cannot be read ({exc}); replace it."
            ) from exc
        return image, read_mask(mask_path, (image.height, image.width))

    def fingerprint(self) -> str:
        """sha256 over the split, class names and each image's and mask's relative name with
        :func:`~ibot_bench.data.classification.file_signature`: its size and mtime in
        nanoseconds (one ``stat`` each), or with ``verify="content"`` (spec
        ``?verify=content``) the sha256 of its bytes, mtime ignored."""
        if self._fingerprint is None:
            mode = "content" if self.verify == "content" else "stat"
            h = hashlib.sha256(f"ade20k:{self.split}\nfingerprint-v2 files={mode}\n".encode())
            h.update(("\n".join(self.class_names) + "\n").encode())
            files = [p for pair in self.pairs for p in pair]
            sigs = file_signatures(files, mode)
            h.update(
                "".join(
                    f"{p.relative_to(self.root).as_posix()}\t{sig}\n" for p, sig in zip(files, sigs)
                ).encode()
            )
            self._fingerprint = h.hexdigest()
        return self._fingerprint
