"""A seeded "shapes" dataset written in the real on-disk formats, for offline end-to-end runs.

Each image shows one main shape whose *shape* is the class (circle, square, ...), drawn at a
random position, scale, rotation and mirror, over a textured background, with 0-3 small
distractors (dots, short lines, small blobs) behind it. Shape colours come from one palette
and backgrounds from one pool of pre-rendered textures, both shared by every class and image,
so neither colour statistics nor the background identify the class or the image (a shortcut
that otherwise lets crops of one image match without learning shape). Shapes are scaled to a
random *area* drawn independently of the class, so foreground size is no cue either.

Every shape is a polygon (circles are 48-gons; the ring is one "keyhole" polygon whose
zero-width bridge joins outer and inner boundary), so the exact instance outline is known.
Pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` as in COCO; masks label a pixel by its centre.
Images are drawn at 4x and box-downsampled, so edges are anti-aliased.

Layout of ``OUT`` (one set of JPEGs, hard-linked into the three layouts when possible)::

    synthetic.json                                   metadata returned by write_synthetic
    imagenet/{train,val}/<class>/<name>.jpg          ImageFolder / ImageNet layout
    coco/{train2017,val2017}/<name>.jpg              COCO 2017 layout
    coco/annotations/instances_{train,val}2017.json  one polygon annotation per image
    ade20k/images/{training,validation}/<name>.jpg   ADEChallengeData2016 layout
    ade20k/annotations/{training,validation}/<name>.png
    ade20k/classes.txt                               names of mask values 1..K, one a line

ADE20K label convention (single-channel uint8 PNG, as in ADEChallengeData2016):
``0`` = other/unlabelled (the distractors; mmseg's ``reduce_zero_label=True`` maps it to the
ignore index 255), ``1..C`` = the C shape classes in ``classes`` order (equal to the COCO
``category_id`` and to the ImageFolder index + 1, since classes are sorted by name), and
``C+1..C+4`` = the background texture kinds as "stuff" classes (stripes, checker, gradient,
noise), so every pixel but the distractors has a meaningful label.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ibot_bench.errors import DatasetError

GENERATOR_VERSION = 1
SHAPES = (
    "circle", "square", "triangle", "star", "cross", "ring",
    "hexagon", "arrow", "heart", "crescent", "semicircle", "ell",
)  # fmt: skip
BACKGROUND_KINDS = ("stripes", "checker", "gradient", "noise")
BACKGROUNDS_PER_KIND = 6
POOL_SIZE = len(BACKGROUND_KINDS) * BACKGROUNDS_PER_KIND
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (250, 250, 250), (20, 20, 20), (128, 128, 128), (170, 110, 40),
)  # fmt: skip
MIN_CONTRAST = 110.0  # RGB distance between a shape's colour and its background's colours
AREA_FRACTION = (0.07, 0.2)  # main shape area / image area
SUPERSAMPLE = 4
JPEG_QUALITY = 90
SPLITS = {"train": ("train2017", "training"), "val": ("val2017", "validation")}
_SPLIT_STREAM = {"train": 1, "val": 2}


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator; the defaults are the standard (hard) shapes set.

    ``distractors``: at most this many small distractors per image (0..N, uniform).
    ``texture``: background texture contrast in percent (0 = flat backgrounds of the
    pool's mean colour; the ADE20K "stuff" labels are then not visible in the image).
    ``area``: range of the main shape's area as a fraction of the image.
    ``colours``: shapes and distractors use only the first N palette colours.
    ``backgrounds``: only the first N backgrounds of the pool are used (the pool alternates
    texture kinds, so N = 4 keeps one of each).
    """

    distractors: int = 3
    texture: int = 100
    area: tuple[float, float] = AREA_FRACTION
    colours: int = len(PALETTE)
    backgrounds: int = POOL_SIZE

    def __post_init__(self) -> None:
        lo, hi = self.area
        if not 0 <= self.distractors <= 10:
            raise DatasetError(f"synthetic shapes: distractors={self.distractors}; use 0..10.")
        if not 0 <= self.texture <= 100:
            raise DatasetError(f"synthetic shapes: texture={self.texture}; use 0..100 (%).")
        if not 0.01 <= lo <= hi <= 0.6:
            raise DatasetError(
                f"synthetic shapes: area {lo:.2f}..{hi:.2f} of the image; use 0.01 <= min <= "
                "max <= 0.6 (min_area / max_area in percent in a dataset spec)."
            )
        if not 1 <= self.colours <= len(PALETTE):
            raise DatasetError(f"synthetic shapes: colours={self.colours}; use 1..{len(PALETTE)}.")
        if not 1 <= self.backgrounds <= POOL_SIZE:
            raise DatasetError(
                f"synthetic shapes: backgrounds={self.backgrounds}; use 1..{POOL_SIZE}."
            )


# ---------------------------------------------------------------------------------------------
# Shape templates: lists of rings (outer boundary first, then holes), unit area, centred.


def _ngon(n: int, radius: float = 1.0, phase: float = 0.0, centre=(0.0, 0.0)) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], 1)


def _arc(centre, radius: float, start: float, stop: float, n: int) -> np.ndarray:
    t = np.linspace(start, stop, n)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], 1)


def _crescent() -> np.ndarray:
    """Unit disc minus a disc of radius 0.85 shifted right by 0.5."""
    d, r = 0.5, 0.85
    x = (1 + d * d - r * r) / (2 * d)
    phi = np.arctan2(np.sqrt(1 - x * x), x)
    psi = np.arctan2(np.sqrt(1 - x * x), x - d)
    outer = _arc((0, 0), 1.0, phi, 2 * np.pi - phi, 30)
    inner = _arc((d, 0), r, 2 * np.pi - psi, psi, 20)[1:-1]
    return np.concatenate([outer, inner])


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1)


def _raw_template(name: str) -> list[np.ndarray]:
    star = _ngon(10) * np.tile([[1.0], [0.45]], (5, 1))
    plus = [(1, 1), (3, 1), (3, -1), (1, -1), (1, -3), (-1, -3), (-1, -1), (-3, -1), (-3, 1),
            (-1, 1), (-1, 3), (1, 3)]  # fmt: skip
    arrow = [(-1, -0.2), (0.2, -0.2), (0.2, -0.55), (1, 0), (0.2, 0.55), (0.2, 0.2), (-1, 0.2)]
    ell = [(0, 0), (1.2, 0), (1.2, 0.45), (0.45, 0.45), (0.45, 1.2), (0, 1.2)]
    table = {
        "circle": lambda: [_ngon(48)],
        "square": lambda: [_ngon(4, phase=np.pi / 4)],
        "triangle": lambda: [_ngon(3, phase=-np.pi / 2)],
        "star": lambda: [star],
        "cross": lambda: [np.array(plus, float)],
        "ring": lambda: [_ngon(48), _ngon(48, 0.55)[::-1]],
        "hexagon": lambda: [_ngon(6)],
        "arrow": lambda: [np.array(arrow)],
        "heart": lambda: [_heart()],
        "crescent": lambda: [_crescent()],
        "semicircle": lambda: [_arc((0, 0), 1.0, 0, np.pi, 25)],
        "ell": lambda: [np.array(ell)],
    }
    return table[name]()


def keyhole(rings: Sequence[np.ndarray]) -> np.ndarray:
    """Join an outer ring and its holes into one polygon via zero-width bridges (COCO-style)."""
    parts = [rings[0]]
    for hole in rings[1:]:
        parts += [rings[0][:1], hole, hole[:1]]
    return np.concatenate(parts)


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace area (holes of a keyhole polygon count negatively)."""
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


@functools.cache
def _template(name: str) -> tuple[np.ndarray, ...]:
    """Rings of shape ``name`` scaled to unit area, centred on its bounding box (read-only)."""
    rings = _raw_template(name)
    area = polygon_area(keyhole(rings))
    lo, hi = rings[0].min(0), rings[0].max(0)
    rings = [(r - (lo + hi) / 2) / np.sqrt(area) for r in rings]
    for r in rings:
        r.flags.writeable = False
    return tuple(rings)


# ---------------------------------------------------------------------------------------------
# Rasterising.


def rasterize(poly: np.ndarray, size: int) -> np.ndarray:
    """Boolean mask of the pixels whose centre lies inside ``poly`` (even-odd rule).

    Scanline form of the crossing test: per pixel row, each edge crossing at ``x`` toggles
    every pixel whose centre is left of ``x``; a pixel is inside when toggled an odd number
    of times. O(rows x (edges + width)) instead of O(pixels x edges).
    """
    mask = np.zeros((size, size), bool)
    top = int(np.clip(np.floor(poly[:, 1].min()), 0, size))
    bottom = int(np.clip(np.ceil(poly[:, 1].max()), 0, size))
    if bottom <= top:
        return mask
    py = np.arange(top, bottom)[:, None] + 0.5
    (x0, y0), (x1, y1) = poly.T, np.concatenate([poly[1:], poly[:1]]).T
    row, edge = np.nonzero((y0 > py) != (y1 > py))
    t = (py[row, 0] - y0[edge]) / (y1[edge] - y0[edge])
    x = x0[edge] + t * (x1[edge] - x0[edge])
    left_of = np.clip(np.ceil(x - 0.5), 0, size).astype(int)  # pixels with centre < x
    toggles = np.bincount(row * (size + 1) + left_of, minlength=(bottom - top) * (size + 1))
    counts = np.cumsum(toggles.reshape(-1, size + 1)[:, ::-1], 1)[:, ::-1]
    mask[top:bottom] = counts[:, 1:] % 2 == 1
    return mask


def _to_canvas(points: np.ndarray) -> list[tuple[float, float]]:
    """Pixel coordinates -> PIL coordinates on the supersampled canvas (PIL: centre at k)."""
    return [tuple(p) for p in points * SUPERSAMPLE - 0.5]


# ---------------------------------------------------------------------------------------------
# Backgrounds: a pool shared by every class and image.


@dataclass(frozen=True)
class Background:
    """One entry of the shared background pool and the shape colours visible on it."""

    kind: str
    image: Image.Image  # supersampled RGB canvas
    shape_colours: tuple[int, ...]  # palette indices that contrast with this background


def _mute(colour: Sequence[int]) -> np.ndarray:
    return 0.65 * np.asarray(colour, float) + 0.35 * 128.0


def _segment_distance(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    t = np.clip(np.dot(c - a, b - a) / max(np.dot(b - a, b - a), 1e-9), 0, 1)
    return float(np.linalg.norm(c - (a + t * (b - a))))


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Blend weights in [0, 1] of shape (N, N) for a texture on the supersampled canvas."""
    n = size * SUPERSAMPLE
    ys, xs = (np.mgrid[0:n, 0:n] + 0.5) / SUPERSAMPLE / size  # image units, 0..1
    theta = rng.uniform(0, np.pi)
    u = xs * np.cos(theta) + ys * np.sin(theta)
    v = -xs * np.sin(theta) + ys * np.cos(theta)
    if kind == "stripes":
        return (np.floor(u / rng.uniform(0.08, 0.25) * 2) % 2).astype(float)
    if kind == "checker":
        cell = rng.uniform(0.08, 0.2)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(float)
    if kind == "gradient":
        return (u - u.min()) / (u.max() - u.min())
    k = int(rng.integers(4, 10))
    coarse = Image.fromarray(rng.random((k, k)).astype(np.float32))
    return np.asarray(coarse.resize((n, n), Image.Resampling.BICUBIC)).clip(0, 1)


def background_pool(
    seed: int, size: int, difficulty: Difficulty = Difficulty()
) -> list[Background]:
    """The fixed pool of backgrounds for one dataset (independent of the class), each with the
    palette colours (of the first ``difficulty.colours``) that stand out on it. A texture
    contrast below 100% blends each texture towards its pair's mean colour."""
    rng = np.random.default_rng([seed, 0])
    palette = PALETTE[: difficulty.colours]
    pool = []
    for kind in BACKGROUND_KINDS:
        for _ in range(BACKGROUNDS_PER_KIND):
            i, j = rng.choice(len(PALETTE), 2, replace=False)
            a, b = _mute(PALETTE[i]), _mute(PALETTE[j])
            w = _texture(kind, rng, size)[..., None]
            if difficulty.texture != 100:
                w = 0.5 + (w - 0.5) * (difficulty.texture / 100)
            rgb = np.round(a + (b - a) * w).astype(np.uint8)
            dist = [_segment_distance(np.asarray(c, float), a, b) for c in palette]
            ok = [k for k, d in enumerate(dist) if d >= MIN_CONTRAST]
            if not ok:  # keep the most distinct colour rather than an invisible shape
                ok = [int(np.argmax(dist))]
            pool.append(Background(kind, Image.fromarray(rgb), tuple(ok)))
    if difficulty.backgrounds < len(pool):  # reorder kind by kind (j-th of each), keep N
        per_kind = range(len(BACKGROUND_KINDS))
        order = [
            k * BACKGROUNDS_PER_KIND + j for j in range(BACKGROUNDS_PER_KIND) for k in per_kind
        ]
        pool = [pool[i] for i in order[: difficulty.backgrounds]]
    return pool


# ---------------------------------------------------------------------------------------------
# One sample.


@dataclass(frozen=True)
class Sample:
    """One rendered image with its ADE20K-style mask and the main shape's COCO polygon."""

    image: Image.Image  # RGB, size x size
    mask: np.ndarray  # uint8 ADE20K-style labels (see module docstring)
    polygon: np.ndarray  # (n, 2) outline of the main shape in pixel coordinates
    label: int  # index into the class list


def _place(
    rings: Sequence[np.ndarray],
    rng: np.random.Generator,
    size: int,
    area: tuple[float, float] = AREA_FRACTION,
) -> list[np.ndarray]:
    """Random mirror, rotation, area and position; the shape stays 1 px inside the image."""
    mirror = np.array([-1.0 if rng.random() < 0.5 else 1.0, 1.0])
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    scale = np.sqrt(rng.uniform(*area)) * size
    shift_u = rng.random(2)
    rings = [(r * mirror) @ rot for r in rings]
    while True:
        lo, hi = rings[0].min(0) * scale, rings[0].max(0) * scale
        room = (size - 2) - (hi - lo)
        if (room >= 0).all():
            break
        scale *= 0.9
    offset = 1 + shift_u * room - lo
    return [np.round(r * scale + offset, 2) for r in rings]


def _distractor(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dot, short line or small blob: small and unlike any class shape."""
    centre = rng.uniform(0, size, 2)
    kind = rng.integers(3)
    if kind == 0:
        return _ngon(12, rng.uniform(0.02, 0.04) * size + 0.5, centre=centre)
    if kind == 1:
        half = rng.uniform(0.08, 0.16) * size
        width = max(1.0, rng.uniform(0.015, 0.03) * size) / 2
        t = rng.uniform(0, np.pi)
        d, n = np.array([np.cos(t), np.sin(t)]), np.array([-np.sin(t), np.cos(t)])
        return centre + np.array([-half * d - width * n, half * d - width * n,
                                  half * d + width * n, -half * d + width * n])  # fmt: skip
    angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
    radii = rng.uniform(0.6, 1.0, 7) * rng.uniform(0.03, 0.05) * size + 0.5
    return centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def render_sample(
    rng: np.random.Generator,
    label: int,
    classes: list[str],
    size: int,
    pool: list[Background],
    difficulty: Difficulty = Difficulty(),
) -> Sample:
    """Draw one image of class ``classes[label]`` with its mask and outline."""
    bg = pool[int(rng.integers(len(pool)))]
    colour = PALETTE[int(rng.choice(bg.shape_colours))]
    rings = _place(_template(classes[label]), rng, size, difficulty.area)
    count = int(rng.integers(0, difficulty.distractors + 1))
    distractors = [_distractor(rng, size) for _ in range(count)]
    distractor_colours = [PALETTE[int(rng.choice(bg.shape_colours))] for _ in distractors]

    canvas = bg.image.copy()
    draw = ImageDraw.Draw(canvas)
    for poly, c in zip(distractors, distractor_colours):
        draw.polygon(_to_canvas(poly), fill=c)
    lo, hi = np.floor(rings[0].min(0)).astype(int), np.ceil(rings[0].max(0)).astype(int)
    alpha = Image.new("L", tuple((hi - lo) * SUPERSAMPLE), 0)  # the shape's box only: faster
    alpha_draw = ImageDraw.Draw(alpha)
    for k, ring in enumerate(rings):  # outer boundary, then holes
        alpha_draw.polygon(_to_canvas(ring - lo), fill=255 if k == 0 else 0)
    canvas.paste(
        colour, box=tuple(int(v) for v in np.concatenate([lo, hi]) * SUPERSAMPLE), mask=alpha
    )
    image = canvas.reduce(SUPERSAMPLE)

    polygon = keyhole(rings)
    stuff = len(classes) + 1 + BACKGROUND_KINDS.index(bg.kind)
    mask = np.full((size, size), stuff, np.uint8)
    for poly in distractors:
        mask[rasterize(poly, size)] = 0
    mask[rasterize(polygon, size)] = label + 1
    return Sample(image, mask, polygon, label)


# ---------------------------------------------------------------------------------------------
# Writing the layouts.


def class_names(num_classes: int) -> list[str]:
    """The first ``num_classes`` shapes, sorted by name (so ImageFolder indices agree)."""
    if not 1 <= num_classes <= len(SHAPES):
        raise DatasetError(
            f"synthetic shapes: num_classes={num_classes} is out of range; "
            f"choose 1..{len(SHAPES)} (available shapes: {', '.join(SHAPES)})."
        )
    return sorted(SHAPES[:num_classes])


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _coco_json(split: str, classes: list[str], records: list[dict], size: int) -> dict:
    images, annotations = [], []
    for i, rec in enumerate(records, start=1):
        poly = rec["polygon"]
        lo, hi = poly.min(0), poly.max(0)
        images.append({"id": i, "file_name": rec["file"], "width": size, "height": size})
        annotations.append(
            {
                "id": i,
                "image_id": i,
                "category_id": rec["label"] + 1,
                "bbox": [round(float(v), 2) for v in (*lo, *(hi - lo))],
                "area": round(polygon_area(poly), 2),
                "segmentation": [[round(float(v), 2) for v in poly.ravel()]],
                "iscrowd": 0,
            }
        )
    return {
        "info": {
            "description": f"ibot-bench synthetic shapes ({split})",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)
        ],
    }


def _write_split(
    root: Path,
    split: str,
    count: int,
    classes: list[str],
    size: int,
    seed: int,
    pool: list[Background],
    difficulty: Difficulty,
) -> None:
    coco_dir, ade_dir = SPLITS[split]
    img_dirs = {
        "coco": root / "coco" / coco_dir,
        "ade": root / "ade20k" / "images" / ade_dir,
        "ann": root / "ade20k" / "annotations" / ade_dir,
    }
    for d in img_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name in classes:
        (root / "imagenet" / split / name).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        label = i % len(classes)
        sample = render_sample(
            np.random.default_rng([seed, _SPLIT_STREAM[split], i]),
            label,
            classes,
            size,
            pool,
            difficulty,
        )
        stem = f"{split}_{i:06d}"
        first = root / "imagenet" / split / classes[label] / f"{stem}.jpg"
        sample.image.save(first, quality=JPEG_QUALITY)
        _link_or_copy(first, img_dirs["coco"] / f"{stem}.jpg")
        _link_or_copy(first, img_dirs["ade"] / f"{stem}.jpg")
        Image.fromarray(sample.mask).save(img_dirs["ann"] / f"{stem}.png")
        records.append({"file": f"{stem}.jpg", "polygon": sample.polygon, "label": label})
    coco = _coco_json(split, classes, records, size)
    ann_file = root / "coco" / "annotations" / f"instances_{coco_dir}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco, separators=(",", ":")))


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"synthetic shapes: {out} is a file; choose a folder path for OUT.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(
                f"synthetic shapes: {out} is not empty; choose an empty or new folder, "
                "or pass overwrite=True to replace a synthetic dataset written there before."
            )
        if not (out / "synthetic.json").is_file():
            raise DatasetError(
                f"synthetic shapes: refusing to overwrite {out}: it is not empty and holds no "
                "synthetic.json, so it was not written by this generator; delete it yourself "
                "or choose another folder."
            )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out``, replacing an old dataset only at the end."""
    if not out.exists():
        os.rename(tmp, out)
    elif not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
    else:
        trash = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)


def write_synthetic(
    out: str | Path,
    *,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 25,
    image_size: int = 64,
    seed: int = 0,
    difficulty: Difficulty = Difficulty(),
    overwrite: bool = False,
) -> dict:
    """Write the shapes dataset to ``out`` in ImageFolder, COCO and ADE20K layouts.

    The output is byte-identical for the same arguments (and Pillow / libjpeg). It is built in a hidden folder
    next to ``out`` and renamed at the end, so an interrupted run leaves no partial dataset.
    Returns the metadata also written to ``out/synthetic.json``.
    """
    out = Path(out)
    classes = class_names(num_classes)
    if train_per_class < 1 or val_per_class < 1:
        raise DatasetError("synthetic shapes: train_per_class and val_per_class must be >= 1.")
    if not 16 <= image_size <= 1024:
        raise DatasetError(f"synthetic shapes: image_size={image_size}; choose 16..1024 pixels.")
    _check_target(out, overwrite)

    meta = {
        "generator": "ibot_bench.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_classes": num_classes,
        "classes": classes,
        "difficulty": {
            "distractors": difficulty.distractors,
            "texture_percent": difficulty.texture,
            "area_fraction": list(difficulty.area),
            "colours": difficulty.colours,
            "backgrounds": difficulty.backgrounds,
        },
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "counts": {"train": train_per_class * num_classes, "val": val_per_class * num_classes},
        "ade20k_classes": classes + list(BACKGROUND_KINDS),
        "ade20k_label_convention": "0 = other/unlabelled (distractors); 1..C = classes; "
        "C+1.. = background texture kinds (stuff); names in ade20k/classes.txt",
        "background_kinds": list(BACKGROUND_KINDS),
        "background_pool_size": POOL_SIZE,
        "palette": [list(c) for c in PALETTE],
        "layout": {
            "imagenet": "imagenet/{train,val}/<class>/<name>.jpg",
            "coco": "coco/{train2017,val2017}/<name>.jpg + "
            "coco/annotations/instances_{train,val}2017.json",
            "ade20k": "ade20k/images/{training,validation}/<name>.jpg + "
            "ade20k/annotations/{training,validation}/<name>.png + ade20k/classes.txt",
        },
    }
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise DatasetError(f"synthetic shapes: cannot write in {out.parent} ({exc}).") from exc
    try:
        pool = background_pool(seed, image_size, difficulty)
        for split, count in meta["counts"].items():
            _write_split(tmp, split, count, classes, image_size, seed, pool, difficulty)
        (tmp / "ade20k" / "classes.txt").write_text("\n".join(meta["ade20k_classes"]) + "\n")
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
