"""Image-classification splits (ImageFolder folders, in-memory arrays) read lean and fast.

Images are decoded by Pillow (libjpeg-turbo) straight into uint8 tensors (no draft-mode
shortcut, so pixels match the reference's PIL pipeline) and resized/cropped as uint8; normalisation happens later once per batch, so
worker processes ship 4x less data and no per-image float work is done.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ibot_bench.errors import DatasetError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to ``resize`` then centre-crop ``crop`` (docs/protocols.md#default-features).

    The paper's eval transform is Resize 256 (bicubic) -> CenterCrop 224, i.e.
    ``resize = crop / 0.875``. Works on uint8 (3, H, W) tensors.
    """

    crop: int = 224
    resize: int = 256
    interpolation: str = "bicubic"

    @classmethod
    def for_size(cls, crop: int, crop_pct: float = 0.875) -> EvalTransform:
        return cls(crop=crop, resize=int(round(crop / crop_pct)))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if min(img.shape[-2:]) != self.resize:
            mode = TF.InterpolationMode(self.interpolation)
            img = TF.resize(img, self.resize, interpolation=mode, antialias=True)
        return TF.center_crop(img, [self.crop, self.crop])


def normalize_batch(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float, one vectorised op per batch."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=batch.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (batch.to(dtype) - mean) / std


@dataclass
class ClassificationSplit:
    """One split of a labelled image dataset.

    Either ``paths`` (files on disk) or ``arrays`` (uint8 (N, H, W[, 3]) in memory) hold
    the images; ``labels`` are class indices into ``class_names``.
    """

    spec: str
    split: str
    class_names: list[str]
    labels: np.ndarray
    paths: list[str] | None = None
    arrays: np.ndarray | None = None
    root: str = ""
    default_img_size: int = 224
    meta: dict = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_names(self) -> list[str]:
        if self.paths is not None:
            return [os.path.relpath(p, self.root) if self.root else p for p in self.paths]
        return [f"{self.split}_{i:06d}" for i in range(len(self))]

    def fingerprint(self) -> str:
        """sha256 over the file list with sizes and labels (or the array bytes) and the split.

        Computed once per split object (one ``stat`` per file); load the split again to see
        files changed since.
        """
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.split}\n{len(self)}\n{'|'.join(self.class_names)}\n".encode())
        if self.paths is not None:
            for name, path, label in zip(self.sample_names, self.paths, self.labels):
                h.update(f"{name}\t{os.path.getsize(path)}\t{label}\n".encode())
        else:
            h.update(np.ascontiguousarray(self.arrays).tobytes())
            h.update(self.labels.astype(np.int64).tobytes())
        return h.hexdigest()

    def read(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 (3, H, W); DatasetError naming the file if it can't be read."""
        if self.arrays is not None:
            arr = torch.from_numpy(np.ascontiguousarray(self.arrays[i]))
            return arr.unsqueeze(0).expand(3, -1, -1) if arr.dim() == 2 else arr.permute(2, 0, 1)
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                arr = np.array(img.convert("RGB"))  # writable copy for torch
            return torch.from_numpy(arr).permute(2, 0, 1)
        except Exception as exc:  # PIL raises OSError/SyntaxError/ValueError for bad data
            raise DatasetError(
                f"cannot read image {path}: {exc}. Remove or replace the file, or set "
                "features.skip_corrupt=true to skip unreadable images."
            ) from exc

    def subset(self, indices: np.ndarray, tag: str) -> ClassificationSplit:
        """Rows ``indices`` (a label subset); ``tag`` names it in the spec and fingerprint."""
        idx = np.asarray(indices, dtype=np.int64)
        return ClassificationSplit(
            spec=f"{self.spec}[{tag}]",
            split=f"{self.split}[{tag}]",
            class_names=self.class_names,
            labels=self.labels[idx],
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            arrays=self.arrays[idx] if self.arrays is not None else None,
            root=self.root,
            default_img_size=self.default_img_size,
            meta={**self.meta, "subset": tag},
        )


def scan_image_folder(root: Path, spec: str, split: str, default_img_size: int = 224):
    """ImageFolder layout ``root/<class>/<image>``: classes sorted by name, as torchvision."""
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist. Expected the ImageNet layout "
            f"ROOT/{{train,val}}/<class>/<image>.jpg (spec {spec!r})."
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(
            f"dataset folder {root} has no class sub-folders; expected {root}/<class>/<image>.jpg"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            e.path
            for e in os.scandir(root / name)
            if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
        )
        if not files:
            raise DatasetError(
                f"class folder {root / name} has no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder."
            )
        paths += files
        labels += [label] * len(files)
    return ClassificationSplit(
        spec=spec,
        split=split,
        class_names=classes,
        labels=np.asarray(labels, dtype=np.int64),
        paths=paths,
        root=str(root),
        default_img_size=default_img_size,
    )
