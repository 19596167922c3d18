"""Image-classification splits (ImageFolder folders, in-memory arrays) read lean and fast.

Images are decoded by Pillow (libjpeg-turbo) straight into uint8 tensors (no draft-mode
shortcut, so pixels match the reference's PIL pipeline) and resized/cropped as uint8; normalisation happens later once per batch, so
worker processes ship 4x less data and no per-image float work is done.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ibot_bench.errors import DatasetError, UnreadableImageError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# the resize modes torchvision supports on tensors (EvalTransform resizes uint8 tensors)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "nearest-exact")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VERIFY_MODES = ("stat", "content")  # dataset spec option ``verify=``: what a fingerprint reads
_log = logging.getLogger(__name__)

# sha256 of file contents for ``verify=content``, keyed by (path, size, mtime_ns): each file
# is read once per process, and a file changed since (new size or mtime) is read again
_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()
_CHUNK = 1 << 20


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, high-bit-depth grayscale scaled by its type's range.

    Pillow's ``convert("RGB")`` clips 16-bit, 32-bit and float pixels to 0..255, turning
    such an image into a nearly constant one. Here 16-bit (``I;16*``, and ``I``, which
    Pillow decodes 16-bit files to) is divided by 257, and float (``F``) is read as [0, 1]
    and scaled by 255. Values outside that range raise ValueError: no scale is right for
    every such file, so it is refused rather than guessed.
    """
    if img.mode == "I" or img.mode.startswith("I;16"):
        top, scale, kind = 65535, 257.0, "a 16-bit image"
    elif img.mode == "F":
        top, scale, kind = 1, 1 / 255, "a float image"
    else:
        return img.convert("RGB")
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if not (lo >= 0 and hi <= top):  # NaN fails too
        raise ValueError(
            f"{kind} (mode {img.mode}) with values in [{lo:g}, {hi:g}]; only [0, {top}] is read "
            f"(scaled to 0..255): save it as an 8-bit image"
        )
    return Image.fromarray(np.round(arr / scale).astype(np.uint8), "L").convert("RGB")


def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    key = (path, size, mtime_ns)
    with _DIGESTS_LOCK:
        digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with _DIGESTS_LOCK:
            _DIGESTS[key] = digest
    return digest


def file_signature(path: str | os.PathLike, verify: str = "stat") -> str:
    """What a dataset fingerprint records of one file.

    ``verify="stat"`` (default): ``size:mtime_ns`` from one ``stat`` (a file replaced by
    another of the same size still changes its mtime). ``verify="content"``:
    ``size:sha256`` of the bytes, mtime ignored (the same bytes rewritten, copied or touched
    give the same signature); digests are cached per process by (path, size, mtime_ns).
    A file that cannot be stat'ed or read (a symlink loop, a dangling link, no permission)
    gives ``unreadable:ERRNO`` instead of failing: reading the image reports it.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
        if verify != "content":
            return f"{st.st_size}:{st.st_mtime_ns}"
        return f"{st.st_size}:{_file_digest(path, st.st_size, st.st_mtime_ns)}"
    except OSError as exc:
        return f"unreadable:{errno.errorcode.get(exc.errno or 0, exc.errno)}"


def file_signatures(paths: Sequence[str | os.PathLike], verify: str = "stat") -> list[str]:
    """:func:`file_signature` of every path; contents are hashed on a few threads (I/O)."""
    if verify != "content" or len(paths) < 2:
        return [file_signature(p, verify) for p in paths]
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]  # one task per chunk
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        done = pool.map(lambda chunk: [file_signature(p, "content") for p in chunk], chunks)
        return [sig for chunk in done for sig in chunk]


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


def read_for_training(
    data: ClassificationSplit, index: int, task: str, note: str = ""
) -> torch.Tensor:
    """Image ``index`` of ``data`` for a training ``task`` (pretraining, fine-tuning), which
    has no option to skip an unreadable image: its error says so (and ``note``), instead of
    the frozen tasks' ``features.skip_corrupt`` advice."""
    try:
        return data.read(index)
    except UnreadableImageError as exc:
        raise DatasetError(
            f"cannot read image {exc.path}: {exc.reason}. Remove or replace the file "
            f"({task} does not skip images).{note}"
        ) from None


@dataclass
class ClassificationSplit:
    """One split of a labelled image dataset.

    Either ``paths`` (files on disk) or ``arrays`` (uint8 (N, H, W[, 3]) in memory) hold
    the images; ``labels`` are class indices into ``class_names``. ``verify`` ("stat" or
    "content", the spec option ``verify=``) is what :meth:`fingerprint` reads of each file.
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
    verify: str = "stat"
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_names(self) -> list[str]:
        if self.paths is not None:
            if not self.root:
                return list(self.paths)
            prefix = os.path.join(self.root, "")  # paths from the scan start with it: slice
            cut = len(prefix)
            return [
                p[cut:] if p.startswith(prefix) else os.path.relpath(p, self.root)
                for p in self.paths
            ]
        return [f"{self.split}_{i:06d}" for i in range(len(self))]

    @property
    def dataset_root(self) -> str:
        """The dataset folder holding this split's folder (``ROOT`` of ``ROOT/train``), where
        relative split files are looked for; "" for in-memory splits."""
        return os.path.dirname(self.root) if self.root else ""

    def fingerprint(self) -> str:
        """sha256 over the split, class names and, per file, its relative name, label and
        :func:`file_signature` (or, for in-memory splits, the array bytes and labels).

        The feature-cache key and the suite's resume key. By default each file contributes
        its size and mtime in nanoseconds (one ``stat`` per file: seconds for ImageNet), so a
        file replaced by another of the same size changes it; with ``verify="content"``
        (spec option ``?verify=content``) the sha256 of every file's bytes instead, mtime
        ignored (identical bytes give the same fingerprint, e.g. on a copied dataset).
        Computed once per split object; load the split again to see files changed since.
        """
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        header = f"{self.split}\n{len(self)}\n{'|'.join(self.class_names)}\n"
        if self.paths is not None:
            mode = "content" if self.verify == "content" else "stat"
            h = hashlib.sha256(f"fingerprint-v2 files={mode}\n{header}".encode())
            sigs = file_signatures(self.paths, mode)
            lines = (
                f"{name}\t{sig}\t{label}\n"
                for name, sig, label in zip(self.sample_names, sigs, self.labels.tolist())
            )
            buf: list[str] = []
            for line in lines:
                buf.append(line)
                if len(buf) == 65536:
                    h.update("".join(buf).encode())
                    buf.clear()
            h.update("".join(buf).encode())
        else:
            h = hashlib.sha256(header.encode())
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
                arr = np.array(to_rgb(img))  # writable copy for torch
            return torch.from_numpy(arr).permute(2, 0, 1)
        except Exception as exc:  # PIL raises OSError/SyntaxError/ValueError for bad data
            raise UnreadableImageError(
                f"cannot read image {path}: {exc}. Remove or replace the file, or set "
                "features.skip_corrupt=true to skip unreadable images.",
                path,
                str(exc),
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
            verify=self.verify,
        )


def _is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()``; a symlink that can't be followed (a loop, a dangling link) is an
    error naming it (it would silently drop a class)."""
    try:
        if entry.is_dir():
            return True
        broken = entry.is_symlink() and not os.path.exists(entry.path)
        reason = "its target does not exist"
    except OSError as exc:
        broken, reason = True, exc.strerror or str(exc)
    if broken:
        raise DatasetError(
            f"dataset folder entry {entry.path} is a symbolic link that cannot be followed "
            f"({reason}); point it at the class folder or remove it."
        )
    return False


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (both real paths)."""
    return os.path.commonpath([path, folder]) == folder


def _check_link(link: str, real: str, class_real: str, split_real: str) -> None:
    """A :class:`DatasetError` when the sub-folder link ``link`` (real path ``real``) of a
    class folder leads to the split folder, above it, or into another class's folder: its
    images would be labelled with this class (silently wrong labels)."""
    if _inside(real, class_real) or not (_inside(split_real, real) or _inside(real, split_real)):
        return  # inside its own class folder, or data kept elsewhere (a link farm)
    where = "the split folder or above" if _inside(split_real, real) else "another class's folder"
    raise DatasetError(
        f"{link} is a symbolic link to {real}, {where}: its images would be labelled with "
        f"the class of {os.path.dirname(link)} as well as their own. Remove the link."
    )


def _image_entries(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(image paths in torchvision's order, the unreadable ones among them, the other files
    ignored) of one class folder, its sub-folders included as torchvision's ImageFolder
    includes them (a link back up the tree is entered once).

    Hidden entries (names starting with ``.``: macOS ``._x.jpg`` AppleDouble files,
    ``.ipynb_checkpoints/``) are skipped, as hidden class folders are. A sub-folder link to
    the split folder, above it or into another class's folder is a :class:`DatasetError`.
    An image-named symlink that can't be followed (a loop, a dangling link) is kept, as a
    corrupt image is: reading it raises :class:`DatasetError` naming it
    (``features.skip_corrupt=true`` skips it), and the fingerprint records it as unreadable.
    """
    files, broken, ignored = [], [], []
    class_real = os.path.realpath(folder)
    split_real = os.path.realpath(folder.parent)
    pending, seen = [str(folder)], set()
    while pending:
        directory = pending.pop()
        real = os.path.realpath(directory)
        if real in seen:
            continue
        if directory != str(folder):
            _check_link(directory, real, class_real, split_real)
        seen.add(real)
        for e in os.scandir(directory):
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    pending.append(e.path)
                    continue
            except OSError:  # e.g. ELOOP: handled below when it is named like an image
                pass
            if not e.name.lower().endswith(IMG_EXTENSIONS):
                ignored.append(e.path)
                continue
            try:
                if e.is_file():
                    files.append(e.path)
                elif e.is_symlink() and not os.path.exists(e.path):  # dangling link
                    files.append(e.path)
                    broken.append(e.path)
            except OSError:  # e.g. ELOOP: Too many levels of symbolic links
                files.append(e.path)
                broken.append(e.path)
    # torchvision's order: folders by path (a folder's own images before its sub-folders'),
    # images by name within each
    return sorted(files, key=os.path.split), sorted(broken, key=os.path.split), ignored


def _warn_ignored(root: Path, ignored: list[str]) -> None:
    """Log the files of class folders that are not read (not named like an image), by
    extension, so a folder of e.g. ``.gif`` or ``.heic`` images is not lost silently."""
    if not ignored:
        return
    kinds: dict[str, int] = {}
    for path in ignored:
        ext = os.path.splitext(path)[1].lower() or "(no extension)"
        kinds[ext] = kinds.get(ext, 0) + 1
    counts = ", ".join(f"{n} {ext}" for ext, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    _log.warning(
        "%s: %d file(s) in class folders are not read, their names not ending in an image "
        "extension (%s): %s, e.g. %s. Convert images to one of these formats to use them.",
        root, len(ignored), ", ".join(IMG_EXTENSIONS), counts, _preview(sorted(ignored), 3),
    )  # fmt: skip


def data_root_hint(folder: Path, scheme: str, sub: str) -> str:
    """`` Use SCHEME:FOLDER/SUB ...`` when ``folder`` holds ``sub`` (a data root of several
    datasets, as ``ibot-bench data synth`` writes), else ``""``."""
    if (folder / sub).is_dir():
        return f" {folder} holds {sub}/: use {scheme}:{folder / sub}."
    return ""


def list_classes(root: Path) -> list[str]:
    """Class folder names of an ImageFolder split ``root/<class>/``, sorted as torchvision
    does (hidden folders skipped); only directory entries are read, no image."""
    return sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and _is_dir(e))


def _preview(names: Sequence[str], n: int = 10) -> str:
    shown = ", ".join(repr(c) for c in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def scan_image_folder(
    root: Path,
    spec: str,
    split: str,
    default_img_size: int = 224,
    class_names: Sequence[str] | None = None,
    class_source: str = "the train split",
) -> ClassificationSplit:
    """ImageFolder layout ``root/<class>/<image>``: classes sorted by name, as torchvision.

    ``class_names`` (the train split's classes, for a val split) fixes the label space:
    labels index that list, matched by class-folder NAME, and the split's ``class_names``
    is that list. A folder naming a class not in it is a :class:`DatasetError` (its images
    could not be scored); a class of it with no folder here is a logged warning (the other
    classes keep their indices). Without it the folder's own classes are the label space.
    """
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist. Expected the ImageNet layout "
            f"ROOT/{{train,val}}/<class>/<image>.jpg (spec {spec!r})."
            + data_root_hint(root.parent, "imagefolder", "imagenet")
        )
    found = list_classes(root)
    loose = sorted(
        e.path
        for e in os.scandir(root)
        if not e.name.startswith(".") and e.name.lower().endswith(IMG_EXTENSIONS)
    )
    if loose:
        _log.warning(
            "%s: %d image(s) lie directly in the split folder, not in a class folder, and are "
            "not read: %s. Move them into %s/<class>/.", root, len(loose), _preview(loose, 3), root
        )  # fmt: skip
    if not found:
        raise DatasetError(
            f"dataset folder {root} has no class sub-folders; expected {root}/<class>/<image>.jpg"
        )
    if class_names is None:
        classes = found
    else:
        classes = list(class_names)
        known = set(classes)
        extra = [c for c in found if c not in known]
        if extra:
            raise DatasetError(
                f"{split} folder {root} has {len(extra)} class folder(s) that {class_source} "
                f"lacks: {_preview(extra)}. Labels are {class_source}'s {len(classes)} classes "
                f"(matched by folder name), so these images cannot be scored: add the class "
                f"to the train folder, or remove/rename the folder(s) in {root}."
            )
        missing = sorted(known - set(found))
        if missing:
            _log.warning(
                "%s folder %s lacks %d of the %d classes of %s: %s; evaluating on the "
                "others (labels keep %s's class indices).",
                split, root, len(missing), len(classes), class_source, _preview(missing),
                class_source,
            )  # fmt: skip
    index = {name: i for i, name in enumerate(classes)}
    paths, labels, unreadable, ignored = [], [], [], []
    for name in found:
        files, broken, other = _image_entries(root / name)
        ignored += other
        if not files:
            raise DatasetError(
                f"class folder {root / name} has no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder."
            )
        paths += files
        labels += [index[name]] * len(files)
        unreadable += broken
    _warn_ignored(root, ignored)
    if unreadable:
        _log.warning(
            "%s: %d image(s) are symbolic links that cannot be followed (a loop or a missing "
            "target): %s. Reading them fails; fix or remove them, or set "
            "features.skip_corrupt=true to skip them.",
            root, len(unreadable), _preview(unreadable, 3),
        )  # fmt: skip
    return ClassificationSplit(
        spec=spec,
        split=split,
        class_names=classes,
        labels=np.asarray(labels, dtype=np.int64),
        paths=paths,
        root=str(root),
        default_img_size=default_img_size,
    )
