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

Layout of ``OUT``: the real datasets' own layouts and file names, so ``OUT`` serves as
``--data-root`` of ``ibot-bench run --suite full`` unchanged. One set of JPEGs, hard-linked
into the three layouts when possible (defaults: 10 classes, 100 train / 25 val per class)::

    synthetic.json                          metadata returned by write_synthetic (the marker
                                            that lets --overwrite replace only these entries)
    imagenet/                               imagefolder:OUT/imagenet (ImageNet-1K layout)
        train/<wnid>/<wnid>_<k>.JPEG        k = 1..train_per_class, e.g. n90020000_17.JPEG
        val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG
        LOC_synset_mapping.txt              "<wnid> <class name>" per line, in wnid order
        1percent.txt, 10percent.txt         SimCLRv2-format label subsets (train file names)
    coco/                                   coco:OUT/coco (COCO 2017 layout)
        train2017/<12-digit id>.jpg         ids unique over both splits, as in COCO
        val2017/<12-digit id>.jpg
        annotations/instances_{train,val}2017.json   one polygon annotation per image
    ade20k/ADEChallengeData2016/            ade20k:OUT/ade20k/ADEChallengeData2016
        images/{training,validation}/ADE_{train,val}_<8 digits>.jpg
        annotations/{training,validation}/ADE_{train,val}_<8 digits>.png
        classes.txt                         names of mask values 1..K, one a line

Class ``c`` has the ImageNet-style id :func:`wnid` (``n9`` + 7 digits, no real synset),
ordered like the class names, so ImageFolder index, COCO ``category_id - 1`` and ADE20K mask
value - 1 agree. Image ``i`` of a split shows class ``i % C`` and is drawn from the random
stream ``(seed, split, i)``; file names do not enter it, so the pixels (and JPEG bytes) are
those of generator version 1, which used flat names (``train_000000.jpg``).

The split files list, per class, the first images of a seeded permutation (the 1% file is
part of the 10% one), :func:`split_file_size` images in all: the count nearest 1% / 10% of
the training set that ``label_subset(..., fraction=...)`` accepts (a share within a factor
1.25) with at least one image per class. That needs >= 80 train images per class for 1% and
>= 8 for 10%; with fewer, the file lists one image per class and ``synthetic.json`` records
``"accepted": false`` for it. 100 per class (the default here) gives exactly 1% and 10%, one
image per class in ``1percent.txt``; ``ibot-bench data synth`` defaults to 200, two per
class, so that the ``semi`` task can hold one out to choose its hyperparameters.

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
import math
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ibot_bench.data.subsets import SPLIT_FILE_TOLERANCE
from ibot_bench.errors import DatasetError
from ibot_bench.io import remove_stale_temps, temp_prefix

GENERATOR_VERSION = 2  # 2: the real sets' folder and file names, split files
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
_SPLIT_FILE_STREAM = 3
WNID_BASE, WNID_STEP = 90_000_000, 10_000  # class ids n90010000, n90020000, ...
ADE20K_DIR = "ade20k/ADEChallengeData2016"  # the release's own folder name
SPLIT_FILES = {"1percent.txt": 0.01, "10percent.txt": 0.1}  # SimCLRv2's label subsets
ENTRIES = ("imagenet", "coco", "ade20k", "synthetic.json")  # what OUT gets, top level
FIXED_FILES = (
    "synthetic.json",
    "imagenet/LOC_synset_mapping.txt",
    *(f"imagenet/{name}" for name in SPLIT_FILES),
    "coco/annotations/instances_train2017.json",
    "coco/annotations/instances_val2017.json",
    f"{ADE20K_DIR}/classes.txt",
)


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
# Names: classes, WordNet-style ids and each layout's file names.


def class_names(num_classes: int) -> list[str]:
    """The first ``num_classes`` shapes, sorted by name (so ImageFolder indices agree)."""
    if not 1 <= num_classes <= len(SHAPES):
        raise DatasetError(
            f"synthetic shapes: num_classes={num_classes} is out of range; "
            f"choose 1..{len(SHAPES)} (available shapes: {', '.join(SHAPES)})."
        )
    return sorted(SHAPES[:num_classes])


def wnid(name: str) -> str:
    """The ImageNet-style class id (``n`` + 8 digits) of shape ``name``: ``arrow`` is
    ``n90010000``, ``circle`` ``n90020000``, ... in name order.

    Fixed per shape (whatever ``num_classes``) and ordered like the names, so the ImageFolder
    index of a class (folders sorted by id) is its index in :func:`class_names`. WordNet 3.0
    noun offsets stay below 16,000,000, so no id is a real ImageNet synset.
    """
    if name not in SHAPES:
        raise DatasetError(f"synthetic shapes: unknown shape {name!r}; use one of {SHAPES}.")
    return f"n{WNID_BASE + WNID_STEP * (sorted(SHAPES).index(name) + 1)}"


@dataclass(frozen=True)
class Item:
    """One image of a split: its random stream, class, COCO id and file in each layout."""

    index: int  # position in the split; the image is drawn from stream (seed, split, index)
    label: int  # index into the class list
    image_id: int  # COCO image id, unique over both splits as in COCO
    imagenet: str  # paths relative to OUT
    coco: str
    ade_image: str
    ade_mask: str


def plan_split(split: str, classes: list[str], per_class: int, first_id: int = 1) -> list[Item]:
    """The images of ``split``: image ``i`` shows class ``i % C``, named as in the real sets
    (``<wnid>_<k>.JPEG`` with ``k`` = 1.. per class for train, ``ILSVRC2012_val_<i+1>.JPEG``
    for val, ``<12-digit id>.jpg`` in COCO, ``ADE_{train,val}_<i+1>`` in ADE20K)."""
    coco_dir, ade_dir = SPLITS[split]
    ids = [wnid(c) for c in classes]
    items = []
    for i in range(per_class * len(classes)):
        label, k = i % len(classes), i // len(classes)
        w = ids[label]
        name = f"{w}_{k + 1}" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}"
        ade = f"ADE_{split}_{i + 1:08d}"
        image_id = first_id + i
        items.append(
            Item(
                index=i,
                label=label,
                image_id=image_id,
                imagenet=f"imagenet/{split}/{w}/{name}.JPEG",
                coco=f"coco/{coco_dir}/{image_id:012d}.jpg",
                ade_image=f"{ADE20K_DIR}/images/{ade_dir}/{ade}.jpg",
                ade_mask=f"{ADE20K_DIR}/annotations/{ade_dir}/{ade}.png",
            )
        )
    return items


def plan(classes: list[str], train_per_class: int, val_per_class: int) -> dict[str, list[Item]]:
    """Both splits' images; COCO ids run on from train into val."""
    train = plan_split("train", classes, train_per_class)
    return {"train": train, "val": plan_split("val", classes, val_per_class, len(train) + 1)}


def split_file_size(fraction: float, num_classes: int, per_class: int) -> int:
    """How many training images the split file for ``fraction`` lists.

    The count nearest ``fraction`` of the training set among those that give every class an
    image and that :func:`ibot_bench.data.subsets.label_subset` accepts for ``fraction``
    (a share within a factor :data:`SPLIT_FILE_TOLERANCE` of it). When no count qualifies
    (fewer than ``1 / (1.25 * fraction)`` images per class: 80 for 1%, 8 for 10%; or, with a
    single class, some sizes such as 126-159 for 1%) it is the count nearest ``fraction``
    with at least one image per class, which ``label_subset`` then rejects for ``fraction``
    (``write_synthetic`` records ``split_files[...]["accepted"] = false``).
    """
    n = num_classes * per_class
    target = fraction * n

    def accepted(k: int) -> bool:
        return fraction / SPLIT_FILE_TOLERANCE <= k / n <= fraction * SPLIT_FILE_TOLERANCE

    lo = max(num_classes, math.floor(target / SPLIT_FILE_TOLERANCE) - 1)
    hi = min(n, math.ceil(target * SPLIT_FILE_TOLERANCE) + 1)
    ok = [k for k in range(lo, hi + 1) if accepted(k)]
    candidates = ok or [min(n, max(num_classes, math.floor(target + 0.5)))]
    return min(candidates, key=lambda k: (abs(k - target), k))


def split_file_names(fraction: float, classes: list[str], per_class: int, seed: int) -> list[str]:
    """The training file names (sorted) listed by the split file for ``fraction``.

    :func:`split_file_size` images in all, spread over the classes (counts differ by at most
    one; the extra ones go to the first classes). Each class takes the first images of one
    seeded permutation of its own, so the 1% file is part of the 10% one.
    """
    total = split_file_size(fraction, len(classes), per_class)
    base, extra = divmod(total, len(classes))
    names = []
    for label, name in enumerate(classes):
        order = np.random.default_rng([seed, _SPLIT_FILE_STREAM, SHAPES.index(name)])
        take = base + (1 if label < extra else 0)
        names += [f"{wnid(name)}_{k + 1}.JPEG" for k in order.permutation(per_class)[:take]]
    return sorted(names)


def _split_file_info(name: str, fraction: float, images: int, classes: int, n: int) -> dict:
    """What ``synthetic.json`` records about one split file."""
    return {
        "path": f"imagenet/{name}",
        "fraction": fraction,
        "images": images,
        "share": round(images / n, 6),
        "per_class": [images // classes, -(-images // classes)],  # fewest, most
        "accepted": fraction / SPLIT_FILE_TOLERANCE
        <= images / n
        <= fraction * SPLIT_FILE_TOLERANCE,
    }


def _expected_files(meta: dict) -> set[str]:
    """Every file (relative to OUT) that the generator that wrote ``meta`` wrote."""
    classes = list(meta["classes"])
    if meta.get("version") == 1:  # flat names, one folder per class name, OUT/ade20k
        files = {"synthetic.json", "ade20k/classes.txt"}
        for split, (coco_dir, ade_dir) in SPLITS.items():
            files.add(f"coco/annotations/instances_{coco_dir}.json")
            for i in range(int(meta["counts"][split])):
                stem = f"{split}_{i:06d}"
                files |= {
                    f"imagenet/{split}/{classes[i % len(classes)]}/{stem}.jpg",
                    f"coco/{coco_dir}/{stem}.jpg",
                    f"ade20k/images/{ade_dir}/{stem}.jpg",
                    f"ade20k/annotations/{ade_dir}/{stem}.png",
                }
        return files
    if meta.get("version") != GENERATOR_VERSION:
        raise ValueError(f"unknown generator version {meta.get('version')!r}")
    files = set(FIXED_FILES)
    for items in plan(classes, int(meta["train_per_class"]), int(meta["val_per_class"])).values():
        for it in items:
            files |= {it.imagenet, it.coco, it.ade_image, it.ade_mask}
    return files


# ---------------------------------------------------------------------------------------------
# Writing the layouts.


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _coco_json(split: str, classes: list[str], records: list[dict], size: int) -> dict:
    images, annotations = [], []
    for rec in records:
        poly = rec["polygon"]
        lo, hi = poly.min(0), poly.max(0)
        images.append({"id": rec["id"], "file_name": rec["file"], "width": size, "height": size})
        annotations.append(
            {
                "id": rec["id"],
                "image_id": rec["id"],
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
    items: list[Item],
    classes: list[str],
    size: int,
    seed: int,
    pool: list[Background],
    difficulty: Difficulty,
) -> None:
    folders = {(root / p).parent for it in items for p in (it.imagenet, it.coco, it.ade_image)}
    folders |= {(root / it.ade_mask).parent for it in items}
    for d in sorted(folders):
        d.mkdir(parents=True, exist_ok=True)
    records = []
    for it in items:
        sample = render_sample(
            np.random.default_rng([seed, _SPLIT_STREAM[split], it.index]),
            it.label,
            classes,
            size,
            pool,
            difficulty,
        )
        first = root / it.imagenet
        sample.image.save(first, format="JPEG", quality=JPEG_QUALITY)
        _link_or_copy(first, root / it.coco)
        _link_or_copy(first, root / it.ade_image)
        Image.fromarray(sample.mask).save(root / it.ade_mask)
        file = it.coco.rsplit("/", 1)[1]
        records.append(
            {"id": it.image_id, "file": file, "polygon": sample.polygon, "label": it.label}
        )
    coco = _coco_json(split, classes, records, size)
    ann_file = root / "coco" / "annotations" / f"instances_{SPLITS[split][0]}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco, separators=(",", ":")))


def _preview(paths: list[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _foreign_files(out: Path, entries: list[str], meta: dict) -> list[str]:
    """Files and links under ``out/<entry>`` that the run which wrote ``meta`` did not write."""
    expected = _expected_files(meta)
    foreign = []
    for entry in entries:
        top = out / entry
        if top.is_symlink() or not top.is_dir():
            foreign += [] if entry in expected and not top.is_symlink() else [entry]
            continue
        for folder, dirs, files in os.walk(top):
            rel = Path(folder).relative_to(out).as_posix()
            foreign += [f"{rel}/{d}" for d in dirs if (Path(folder) / d).is_symlink()]
            foreign += [f"{rel}/{f}" for f in files if f"{rel}/{f}" not in expected]
    return sorted(foreign)


def _check_target(out: Path, overwrite: bool) -> list[str]:
    """The entries of ``out`` that the new dataset replaces (none for a new or empty folder).

    Refuses (before anything is written or deleted) a non-empty ``out`` unless ``overwrite``;
    with it, one without ``synthetic.json``, and one in whose generated folders (listed in
    that ``synthetic.json``) lie files the generator did not write. Other entries of ``out``
    are kept.
    """
    if out.exists() and not out.is_dir():
        raise DatasetError(f"synthetic shapes: {out} is a file; choose a folder path for OUT.")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not overwrite:
        raise DatasetError(
            f"synthetic shapes: {out} is not empty; choose an empty or new folder, or overwrite "
            "(--overwrite, overwrite=True) a synthetic dataset written there before."
        )
    marker = out / "synthetic.json"
    if not marker.is_file():
        raise DatasetError(
            f"synthetic shapes: refusing to overwrite {out}: it is not empty and holds no "
            "synthetic.json, so it was not written by this generator; delete it yourself "
            "or choose another folder."
        )
    try:
        meta = json.loads(marker.read_text())
        listed = meta.get("entries", ENTRIES)  # version 1 wrote ENTRIES without listing them
        owned = [e for e in ENTRIES if e in listed and os.path.lexists(out / e)]
        taken = [e for e in ENTRIES if e not in listed and os.path.lexists(out / e)]
        foreign = taken + _foreign_files(out, owned, meta)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DatasetError(
            f"synthetic shapes: refusing to overwrite {out}: its synthetic.json cannot be read "
            f"({exc}), so what the generator wrote there is unknown; delete the dataset "
            "yourself or choose another folder."
        ) from exc
    if foreign:
        raise DatasetError(
            f"synthetic shapes: refusing to overwrite {out}: it holds files the generator "
            f"did not write, which would be deleted with the dataset ({_preview(foreign)}); "
            "move them elsewhere or choose another folder. Nothing was changed."
        )
    return owned


def _move_into_place(tmp: Path, out: Path, replace: Sequence[str] = ()) -> None:
    """Move the finished ``tmp`` onto ``out``, deleting only the old entries ``replace``.

    When ``out`` holds nothing else, the whole folder is swapped at the end, so an interrupted
    run leaves the old or the new dataset; otherwise the old entries are moved aside, the new
    ones in (``synthetic.json`` last), and other files in ``out`` stay untouched.
    """
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    trash = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    if set(os.listdir(out)) <= set(replace):
        os.rename(out, trash)
        os.rename(tmp, out)
    else:
        trash.mkdir()
        for entry in replace:
            os.rename(out / entry, trash / entry)
        for entry in sorted(os.listdir(tmp), key=lambda e: e == "synthetic.json"):
            os.rename(tmp / entry, out / entry)
        tmp.rmdir()
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
    """Write the shapes dataset to ``out`` in the ImageNet, COCO and ADE20K layouts.

    ``out`` is then a data root as ``ibot-bench run --suite full --data-root OUT`` expects
    (see the module docstring). The output is byte-identical for the same arguments (and
    Pillow / libjpeg). It is built in a hidden folder next to ``out`` and moved in at the
    end, so an interrupted run leaves no partial dataset. ``overwrite`` replaces only what
    an earlier run wrote (the entries listed in its ``synthetic.json``); it refuses if those
    hold files the generator did not write. Returns the metadata also written to
    ``out/synthetic.json``.
    """
    out = Path(out)
    classes = class_names(num_classes)
    if train_per_class < 1 or val_per_class < 1:
        raise DatasetError("synthetic shapes: train_per_class and val_per_class must be >= 1.")
    if not 16 <= image_size <= 1024:
        raise DatasetError(f"synthetic shapes: image_size={image_size}; choose 16..1024 pixels.")
    replace = _check_target(out, overwrite)

    wnids = [wnid(c) for c in classes]
    splits = plan(classes, train_per_class, val_per_class)
    split_files = {
        name: split_file_names(fraction, classes, train_per_class, seed)
        for name, fraction in SPLIT_FILES.items()
    }
    n_train = len(splits["train"])
    meta = {
        "generator": "ibot_bench.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_classes": num_classes,
        "classes": classes,
        "wnids": wnids,
        "difficulty": {
            "distractors": difficulty.distractors,
            "texture_percent": difficulty.texture,
            "area_fraction": list(difficulty.area),
            "colours": difficulty.colours,
            "backgrounds": difficulty.backgrounds,
        },
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "counts": {split: len(items) for split, items in splits.items()},
        "split_files": {
            name: _split_file_info(name, fraction, len(split_files[name]), num_classes, n_train)
            for name, fraction in SPLIT_FILES.items()
        },
        "ade20k_classes": classes + list(BACKGROUND_KINDS),
        "ade20k_label_convention": "0 = other/unlabelled (distractors); 1..C = classes; "
        f"C+1.. = background texture kinds (stuff); names in {ADE20K_DIR}/classes.txt",
        "background_kinds": list(BACKGROUND_KINDS),
        "background_pool_size": POOL_SIZE,
        "palette": [list(c) for c in PALETTE],
        "entries": list(ENTRIES),
        "layout": {
            "imagenet": "imagenet/{train,val}/<wnid>/*.JPEG (train <wnid>_<k>.JPEG, "
            "val ILSVRC2012_val_<8 digits>.JPEG) + imagenet/LOC_synset_mapping.txt "
            "(<wnid> <name>) + imagenet/{1,10}percent.txt",
            "coco": "coco/{train2017,val2017}/<12-digit id>.jpg + "
            "coco/annotations/instances_{train,val}2017.json",
            "ade20k": f"{ADE20K_DIR}/images/{{training,validation}}/ADE_{{train,val}}_"
            f"<8 digits>.jpg + {ADE20K_DIR}/annotations/{{training,validation}}/*.png + "
            f"{ADE20K_DIR}/classes.txt",
        },
        "specs": {
            "imagenet": "imagefolder:OUT/imagenet",
            "coco": "coco:OUT/coco",
            "ade20k": f"ade20k:OUT/{ADE20K_DIR}",
        },
    }
    remove_stale_temps(out.parent)  # what a killed generation left behind
    tmp = out.parent / f"{temp_prefix(out)}{secrets.token_hex(4)}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise DatasetError(f"synthetic shapes: cannot write in {out.parent} ({exc}).") from exc
    try:
        pool = background_pool(seed, image_size, difficulty)
        for split, items in splits.items():
            _write_split(tmp, split, items, classes, image_size, seed, pool, difficulty)
        mapping = "".join(f"{w} {c}\n" for w, c in zip(wnids, classes))
        (tmp / "imagenet" / "LOC_synset_mapping.txt").write_text(mapping)
        for name, lines in split_files.items():
            (tmp / "imagenet" / name).write_text("".join(f"{line}\n" for line in lines))
        (tmp / ADE20K_DIR / "classes.txt").write_text("\n".join(meta["ade20k_classes"]) + "\n")
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
