"""Dataset specs -> dataset splits (docs/design.md#data-path).

    imagefolder:ROOT            ImageNet layout ROOT/{train,val}/<class>/<image>
    synthetic:shapes[?k=v&...]  the built-in shapes set (classes, size, train, val, seed),
                                generated once into the cache, then read as an ImageFolder
    digits                      scikit-learn's 8x8 handwritten digits, fixed 80/20 split
    coco:ROOT                   COCO 2017 layout (dense tasks)
    ade20k:ROOT                 ADEChallengeData2016 layout (dense tasks)

Classification specs take label-subset options for the semi-supervised protocols, applied
to the train split: ``?fraction=0.01&subset_seed=0`` (per class) or ``?split_file=PATH``
(SimCLR ``1percent.txt`` format).

Every spec takes ``?verify=content``: the dataset fingerprint (feature-cache and resume key)
hashes every file's bytes instead of recording its size and mtime (the default,
``verify=stat``; ``content`` for the generated ``synthetic:`` sets, whose copies on two nodes
differ in mtime only); see :func:`ibot_bench.data.classification.file_signature`.

An ImageFolder val split takes the train split's class list (matched by folder name): its
labels index train's classes, a class train lacks is an error, a class val lacks a warning.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from ibot_bench.data.ade20k import ADE20KDataset
from ibot_bench.data.classification import (
    VERIFY_MODES,
    ClassificationSplit,
    EvalTransform,
    list_classes,
    scan_image_folder,
)
from ibot_bench.data.coco import CocoDataset
from ibot_bench.data.subsets import label_subset, stratified_split
from ibot_bench.errors import DatasetError, UserError
from ibot_bench.registry import Registry

__all__ = [
    "DATASETS",
    "ClassificationSplit",
    "EvalTransform",
    "cache_root",
    "load_split",
    "parse_spec",
    "require_classification",
]

DenseSplit = CocoDataset | ADE20KDataset
SplitLoader = Callable[[str, dict, str, str], ClassificationSplit | DenseSplit]
DATASETS: Registry[SplitLoader] = Registry("dataset")
SPLITS = ("train", "val")


def cache_root() -> Path:
    """Where features and generated data live: $IBOT_BENCH_CACHE or ~/.cache/ibot-bench."""
    return Path(os.environ.get("IBOT_BENCH_CACHE", Path.home() / ".cache" / "ibot-bench"))


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``scheme:body?k=v&...`` -> (scheme, body, options)."""
    head, _, query = spec.partition("?")
    scheme, _, body = head.partition(":")
    return scheme, body, dict(parse_qsl(query, keep_blank_values=True))


def _number(options: dict, key: str, kind: type = int, default: object = None, minimum=None):
    """Spec option ``key`` as an int or float; a non-number, or one below ``minimum``, is an
    error naming the option."""
    if key not in options:
        return default
    try:
        value = kind(options[key])
    except ValueError:
        raise UserError(
            f"dataset option {key}={options[key]!r} must be {'an integer' if kind is int else 'a number'}"
        ) from None
    if minimum is not None and not value >= minimum:
        raise UserError(f"dataset option {key}={options[key]!r} must be >= {minimum}")
    return value


COMMON_OPTIONS = {"fraction", "subset_seed", "split_file", "verify"}


def _known_options(options: dict, allowed: set[str], spec: str) -> None:
    unknown = set(options) - allowed - COMMON_OPTIONS
    if unknown:
        # a folder whose name holds "?" cannot be named: the "?" starts the options
        head = spec.partition(":")[2]
        hint = (
            f". {head!r} is a folder, but a '?' in a spec starts its options: rename the "
            "folder, or link to it under a name without '?'"
            if "?" in head and os.path.exists(os.path.expanduser(head))
            else ""
        )
        raise UserError(
            f"unknown option(s) {sorted(unknown)} in dataset spec {spec!r}; "
            f"allowed: {sorted(allowed | COMMON_OPTIONS)}{hint}"
        )


def _verify_mode(options: dict, spec: str, default: str = "stat") -> str:
    verify = options.get("verify", default)
    if verify not in VERIFY_MODES:
        raise UserError(
            f"dataset option verify={verify!r} in {spec!r} must be 'content' (the fingerprint "
            "hashes every file's bytes) or 'stat' (the default: each file's size and mtime)"
        )
    return verify


def _root(body: str) -> Path:
    """A spec's folder as an absolute path (``~`` expanded): tools that join their own
    ``data_root`` to it (mmdet, mmseg) and later changes of directory see the same folder."""
    return Path(os.path.abspath(Path(body).expanduser()))


def _scan_split(root: Path, spec: str, split: str, size: int) -> ClassificationSplit:
    """``root/split`` as an ImageFolder; a val split takes ``root/train``'s class list (its
    folder names only) as its label space, so labels match train's by class name."""
    class_names = None
    if split != "train" and (root / "train").is_dir():
        class_names = list_classes(root / "train")
    return scan_image_folder(root / split, spec, split, size, class_names=class_names)


@DATASETS.register(
    "imagefolder", help="imagefolder:ROOT  ImageNet layout ROOT/{train,val}/<class>/*"
)
def _imagefolder(body: str, options: dict, split: str, spec: str) -> ClassificationSplit:
    _known_options(options, {"size"}, spec)
    if not body:
        raise UserError("imagefolder needs a folder: imagefolder:ROOT")
    size = _number(options, "size", int, 224, minimum=1)
    root = _root(body)
    if root.name in SPLITS and not (root / split).is_dir() and (root.parent / split).is_dir():
        raise UserError(
            f"{spec!r} names the {root.name} folder; give the folder holding train/ and val/: "
            f"imagefolder:{root.parent}"
        )
    return _scan_split(root, spec, split, size)


@DATASETS.register(
    "synthetic",
    help="synthetic:shapes[?classes=10&size=64&train=100&val=25&seed=0&layout=imagenet]  "
    "built-in; layout=coco|ade20k gives the dense-task layouts of the same images; "
    "difficulty: distractors=3&texture=100&min_area=7&max_area=20&colours=12&backgrounds=24",
)
def _synthetic(body: str, options: dict, split: str, spec: str) -> ClassificationSplit | DenseSplit:
    from ibot_bench.data.synthetic import (
        ADE20K_DIR,
        GENERATOR_VERSION,
        Difficulty,
        write_synthetic,
    )

    if body not in ("", "shapes"):
        raise UserError(f"unknown synthetic dataset {body!r} in {spec!r}; use synthetic:shapes")
    keys = {"classes": 10, "size": 64, "train": 100, "val": 25, "seed": 0}
    # difficulty knobs: the first four are always named in a non-default set's folder, the
    # later ones only when set, so folders written before they existed keep their names
    always_named = {"distractors": 3, "texture": 100, "min_area": 7, "max_area": 20}
    knobs = always_named | {"colours": 12, "backgrounds": 24}
    keys |= knobs
    _known_options(options, set(keys) | {"layout"}, spec)
    layout = options.get("layout", "imagenet")
    if layout not in ("imagenet", "coco", "ade20k"):
        raise UserError(f"synthetic layout must be imagenet, coco or ade20k ({spec!r})")
    try:
        params = {k: _number(options, k, int, v) for k, v in keys.items()}
    except ValueError as exc:
        raise UserError(f"synthetic options must be integers ({spec!r}): {exc}") from None
    tag = "_".join(f"{k}{v}" for k, v in params.items() if k not in knobs)
    if any(params[k] != v for k, v in knobs.items()):  # default sets keep their old folder
        named = [k for k in knobs if k in always_named or params[k] != knobs[k]]
        tag += "_" + "_".join(f"{k}{params[k]}" for k in named)
    difficulty = Difficulty(
        distractors=params["distractors"],
        texture=params["texture"],
        area=(params["min_area"] / 100, params["max_area"] / 100),
        colours=params["colours"],
        backgrounds=params["backgrounds"],
    )
    out = cache_root() / "synthetic" / f"shapes_{tag}"
    meta = _synthetic_meta(out)
    if meta is None or meta.get("version") != GENERATOR_VERSION:  # new, or an older layout
        out.parent.mkdir(parents=True, exist_ok=True)
        # one writer at a time (processes of a torchrun job all ask for it): the others wait,
        # then read what it wrote
        with open(out.parent / f".shapes_{tag}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            meta = _synthetic_meta(out)
            if meta is None or meta.get("version") != GENERATOR_VERSION:
                meta = write_synthetic(
                    out,
                    num_classes=params["classes"],
                    train_per_class=params["train"],
                    val_per_class=params["val"],
                    image_size=params["size"],
                    seed=params["seed"],
                    difficulty=difficulty,
                    overwrite=out.exists(),
                )
    if layout == "coco":
        return CocoDataset(out / "coco", split)
    if layout == "ade20k":
        return ADE20KDataset(out / ADE20K_DIR, {"train": "training", "val": "validation"}[split])
    data = _scan_split(out / "imagenet", spec, split, params["size"])
    names = dict(zip(meta.get("wnids", ()), meta.get("classes", ())))
    data.class_names = [names.get(w, w) for w in data.class_names]  # shape names, not wnids
    return data


def _synthetic_meta(out: Path) -> dict | None:
    """``out/synthetic.json`` of a generated set, or None when missing or unreadable."""
    try:
        meta = json.loads((out / "synthetic.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


@DATASETS.register("digits", help="digits  scikit-learn's 8x8 handwritten digits (80/20 split)")
def _digits(body: str, options: dict, split: str, spec: str) -> ClassificationSplit:
    from sklearn.datasets import load_digits

    _known_options(options, {"size"}, spec)
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # values are 0..16
    labels = digits.target.astype(np.int64)
    train_rows, val_rows = stratified_split(labels, 0.2, seed=0)
    rows = train_rows if split == "train" else val_rows
    return ClassificationSplit(
        spec=spec,
        split=split,
        class_names=[str(d) for d in range(10)],
        labels=labels[rows],
        arrays=images[rows],
        default_img_size=_number(options, "size", int, 32, minimum=1),
    )


@DATASETS.register("coco", help="coco:ROOT  COCO 2017 layout (dense tasks)")
def _coco(body: str, options: dict, split: str, spec: str) -> CocoDataset:
    _known_options(options, set(), spec)
    if not body:
        raise UserError("coco needs a folder: coco:ROOT (with annotations/ and train2017/)")
    return CocoDataset(_root(body), split)


@DATASETS.register("ade20k", help="ade20k:ROOT  ADEChallengeData2016 layout (dense tasks)")
def _ade20k(body: str, options: dict, split: str, spec: str) -> ADE20KDataset:
    _known_options(options, set(), spec)
    if not body:
        raise UserError("ade20k needs a folder: ade20k:ROOT (with images/ and annotations/)")
    return ADE20KDataset(_root(body), {"train": "training", "val": "validation"}[split])


def _apply_subset(data: ClassificationSplit, options: dict) -> ClassificationSplit:
    if not {"split_file", "fraction"} & set(options):
        if "subset_seed" in options:
            raise UserError(
                f"dataset option subset_seed={options['subset_seed']!r} needs fraction= (e.g. "
                f"?fraction=0.01&subset_seed={options['subset_seed']}); without it no label "
                "subset is drawn"
            )
        return data
    rows, tag = label_subset(
        data.labels,
        data.sample_names,
        fraction=_number(options, "fraction", float),
        split_file=options.get("split_file"),
        seed=_number(options, "subset_seed", int, 0, minimum=0),
        class_names=data.class_names,
        root=data.dataset_root,
    )
    return data.subset(rows, tag)


def load_split(spec: str, split: str = "train") -> ClassificationSplit | DenseSplit:
    """The ``split`` ("train" or "val") of the dataset named by ``spec``: a
    :class:`ClassificationSplit`, or for ``coco:`` / ``ade20k:`` the dense dataset reader.

    Label-subset options in the spec apply to the train split only (the semi-supervised
    protocols evaluate on the full val split). ``?verify=content`` makes the split's
    fingerprint hash file contents (default ``stat``: size and mtime of each file; for the
    generated ``synthetic:`` sets ``content``).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    scheme, body, options = parse_spec(spec)
    if scheme not in DATASETS and Path(spec).is_dir():
        raise UserError(f"dataset spec {spec!r} has no scheme; did you mean imagefolder:{spec}?")
    try:
        loader = DATASETS.get(scheme)
    except KeyError as exc:
        raise UserError(f"{exc} (in dataset spec {spec!r})") from None
    # a generated set is hashed by content: each node of a job without a shared cache folder
    # writes its own copy, with its own mtimes, and the copies must share cache and resume keys
    verify = _verify_mode(options, spec, "content" if scheme == "synthetic" else "stat")
    data = loader(body, options, split, spec)
    data.verify = verify  # what fingerprint() reads (computed lazily, never before this)
    if len(data) == 0:
        raise DatasetError(f"dataset {spec!r} split {split!r} is empty")
    if split == "train" and isinstance(data, ClassificationSplit):
        return _apply_subset(data, options)
    return data


def require_classification(
    data: ClassificationSplit | DenseSplit, spec: str
) -> ClassificationSplit:
    """``data`` if it is a classification split, else an error naming the right tasks."""
    if not isinstance(data, ClassificationSplit):
        raise UserError(
            f"{spec}: this task needs a "
            "classification dataset (imagefolder:, synthetic: or digits); coco: and ade20k: "
            "datasets are for the dense tasks (detection, segmentation)."
        )
    return data
