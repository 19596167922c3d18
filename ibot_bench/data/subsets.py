"""Label subsets and hold-out splits of a training set.

- :func:`label_subset`: the semi-supervised 1% / 10% label subset, from a split file or
  drawn per class; the one entry point for dataset-spec options, ``semi`` and
  ``semi-finetune``. Built on:
- :func:`per_class_fraction`: the semi-supervised 1% / 10% label subsets drawn per class
  (docs/protocols.md#semi-supervised).
- :func:`read_split_file`: SimCLRv2's ``1percent.txt`` / ``10percent.txt`` image lists,
  found by :func:`find_split_file` (a relative path: in the dataset folder first).
- :func:`stratified_split`: the held-out validation split on which the linear probe and
  logistic regression choose their hyperparameters (DINOv2's protocol, docs/protocols.md#linear-probe, docs/protocols.md#logistic-regression).

All three are deterministic functions of their inputs (and ``seed``) and return sorted
int64 row indices.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path, PurePath

import numpy as np

from ibot_bench.errors import ConfigError, UserError

_log = logging.getLogger(__name__)

# a split file may select fraction / 1.25 .. fraction * 1.25 of the training set: SimCLRv2's
# 1percent.txt holds 12,811 of ImageNet's 1,281,167 images (1.0%), 10percent.txt 128,116
SPLIT_FILE_TOLERANCE = 1.25


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return f"{class_names[c]!r} (index {c})"
    return f"index {c}"


def _check_fraction(name: str, fraction: float, allow_one: bool) -> None:
    upper_ok = fraction <= 1.0 if allow_one else fraction < 1.0
    if not (fraction > 0.0 and upper_ok):
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise ConfigError(f"{name} must be in {bound}, got {fraction}")


def _rows_by_class(labels: np.ndarray) -> dict[int, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {int(c): g for c, g in zip(classes, groups)}


def per_class_fraction(
    labels: np.ndarray,
    fraction: float,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Indices of ``round(fraction * n_c)`` random images of every class ``c``.

    The semi-supervised label subset (docs/protocols.md#semi-supervised) for datasets
    without an official split file. Deterministic for a given ``labels`` and ``seed``.
    Every class present in ``labels`` keeps at least one image: a fraction that would leave
    a class with none raises :class:`UserError` naming the class (use a larger fraction or
    a split file). Rounding is half-up.
    """
    _check_fraction("fraction", fraction, allow_one=True)
    groups = _rows_by_class(labels)
    if not groups:
        raise UserError("cannot take a label subset of an empty dataset")
    counts = {c: int(np.floor(fraction * len(rows) + 0.5)) for c, rows in groups.items()}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        named = ", ".join(
            f"{_class_name(c, class_names)} with {len(groups[c])} images" for c in empty[:5]
        )
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise UserError(
            f"fraction {fraction} leaves {len(empty)} class(es) with no image: {named}{more}; "
            "use a larger fraction or a split file"
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(rows)[: counts[c]] for c, rows in groups.items()]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def find_split_file(split_file: str | Path, root: str | Path | None = None) -> Path:
    """``split_file`` as a path: an absolute one as given; a relative one in the dataset
    folder ``root`` when there (``imagefolder:ROOT?split_file=1percent.txt`` names
    ``ROOT/1percent.txt``), else from the current directory. Neither: :class:`UserError`
    naming the absolute paths tried."""
    path = Path(split_file).expanduser()
    if path.is_absolute():
        tried = [path]
    else:
        tried = [Path(os.path.abspath(Path(root) / path))] if root else []
        tried.append(Path(os.path.abspath(path)))
    found = next((p for p in tried if p.exists()), None)
    if found is None:
        looked = " or ".join(map(str, tried))
        raise UserError(
            f"split file {str(split_file)!r} not found: looked for {looked}. Give its path "
            "(absolute, or relative to the dataset folder or the current directory)."
        )
    return found


def read_split_file(
    path: str | Path, sample_names: Sequence[str], skipped: Sequence[str] = ()
) -> np.ndarray:
    """Rows of ``sample_names`` listed in a SimCLR-format split file.

    The file has one image file name per line (``n01440764_10026.JPEG``), as in SimCLRv2's
    ``1percent.txt`` / ``10percent.txt`` (docs/protocols.md#semi-supervised), matched
    against the file-name part of ``sample_names`` (which may be relative paths); a line
    holding a ``/`` is a path relative to the train folder (``n01440764/n01440764_10026.JPEG``),
    matched against the whole sample name (for datasets whose file names repeat across
    classes). Blank lines and ``#`` comments are skipped; repeated lines count once. Names
    of ``skipped`` images (unreadable, left out by ``features.skip_corrupt``) are left out
    with a logged warning. Unknown
    names, or names that match several samples, raise :class:`UserError` listing a few, as
    does a file that is not UTF-8 text (e.g. an image or an archive given by mistake).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read split file {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
        if "\0" in text:
            raise ValueError(f"a NUL byte at offset {raw.index(0)}")
    except ValueError as exc:  # UnicodeDecodeError too
        where = f"byte {exc.start} is not UTF-8" if isinstance(exc, UnicodeDecodeError) else exc
        raise UserError(
            f"split file {str(path)!r} is not a text file ({where}): a split file lists one "
            "image file name per line, as SimCLRv2's 1percent.txt / 10percent.txt "
            "(n01440764_10026.JPEG); check the split_file= path (it may name an image or "
            "an archive)."
        ) from None
    lines = (s.strip() for s in text.splitlines())
    wanted = list(dict.fromkeys(s for s in lines if s and not s.startswith("#")))
    if not wanted:
        raise UserError(f"split file {str(path)!r} lists no image")

    index: dict[str, int] = {}
    repeated: set[str] = set()
    full = {PurePath(str(name)).as_posix(): row for row, name in enumerate(sample_names)}
    for row, name in enumerate(sample_names):
        base = PurePath(str(name)).name
        if base in index:
            repeated.add(base)
        index[base] = row

    def lookup(name: str) -> int | None:
        return full.get(name.removeprefix("./")) if "/" in name else index.get(name)

    gone = {PurePath(str(n)).as_posix() for n in skipped}
    gone |= {PurePath(n).name for n in gone}
    dropped = [w for w in wanted if lookup(w) is None and w.removeprefix("./") in gone]
    if dropped:
        _log.warning(
            "split file %s: %d of its images were skipped as unreadable "
            "(features.skip_corrupt) and are left out of the subset: %s",
            path, len(dropped), ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""),
        )  # fmt: skip
        wanted = [w for w in wanted if w not in dropped]
        if not wanted:
            raise UserError(
                f"split file {str(path)!r}: every image it lists is unreadable (skipped by "
                "features.skip_corrupt): replace them, or use another split file"
            )
    unknown = [w for w in wanted if lookup(w) is None]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise UserError(
            f"split file {str(path)!r}: {len(unknown)} of {len(wanted)} names are not in the "
            f"dataset ({len(sample_names)} samples), e.g. {shown}. Each line is one image's "
            f"file name ({PurePath(str(sample_names[0])).name}) or its path relative to the "
            f"train folder ({PurePath(str(sample_names[0])).as_posix()}), nothing else on "
            "the line"
        )
    ambiguous = [w for w in wanted if "/" not in w and w in repeated]
    if ambiguous:
        raise UserError(
            f"split file {str(path)!r}: names match several samples: {', '.join(ambiguous[:5])}; "
            "write such lines as paths relative to the train folder (class/name.jpg)"
        )
    return np.sort(np.array([lookup(w) for w in wanted], dtype=np.int64))


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified ``(train_rows, val_rows)`` hold-out split.

    Each class ``c`` gives ``round(val_fraction * n_c)`` images to validation, but always
    keeps at least one for training (so a class with a single image stays in train only).
    Used to choose the linear probe's head and logistic regression's C on training data,
    never on the test set (DINOv2's protocol, docs/protocols.md#linear-probe, docs/protocols.md#logistic-regression). Raises
    :class:`UserError` when no image at all is left for validation.
    """
    _check_fraction("val_fraction", val_fraction, allow_one=False)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for rows in _rows_by_class(labels).values():
        n_val = min(int(np.floor(val_fraction * len(rows) + 0.5)), len(rows) - 1)
        perm = rng.permutation(rows)
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    val_rows = np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)
    if len(val_rows) == 0:
        n = len(np.asarray(labels))
        largest = max((len(r) for r in _rows_by_class(labels).values()), default=0)
        fix = (
            "use a larger val_fraction"
            if largest >= 2
            else "every class has a single image, and a class keeps that one for training: "
            "choosing the hyperparameters needs >= 2 labelled images in some class (more "
            "labels, or only kNN in the semi task: methods=[knn])"
        )
        raise UserError(
            f"val_fraction {val_fraction} leaves no validation image ({n} training images); {fix}"
        )
    return np.sort(np.concatenate(train)).astype(np.int64), val_rows


def label_subset(
    labels: np.ndarray,
    sample_names: Sequence[str],
    *,
    fraction: float | None = None,
    split_file: str | Path | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    root: str | Path | None = None,
    skipped: Sequence[str] = (),
) -> tuple[np.ndarray, str]:
    """Rows of the labelled subset of a training set, and a tag naming it.

    With ``split_file`` the rows are that file's images (:func:`read_split_file`; a
    relative path is looked for in the dataset folder ``root`` first, :func:`find_split_file`); a
    ``fraction`` given as well must match the share the file selects within
    :data:`SPLIT_FILE_TOLERANCE` (the fraction names the protocol, e.g. ``semi-1pct``).
    Without one, ``fraction`` of every class is drawn with ``seed``
    (:func:`per_class_fraction`). ``skipped``: names of unreadable images left out of
    ``sample_names`` (a split file naming them is not an error). The tag
    (``split_file=NAME:DIGEST`` or ``fraction=F:seed=S``) identifies the subset in
    fingerprints and records.
    """
    if fraction is not None:
        _check_fraction("fraction", fraction, allow_one=True)
    if split_file:
        path = find_split_file(split_file, root)
        rows = read_split_file(path, sample_names, skipped)
        realised = len(rows) / max(1, len(sample_names))
        if fraction is not None and not (
            fraction / SPLIT_FILE_TOLERANCE <= realised <= fraction * SPLIT_FILE_TOLERANCE
        ):
            raise ConfigError(
                f"split file {str(split_file)!r} selects {100 * realised:.3g}% of the training "
                f"set but fraction is {fraction:g}; set fraction to match (it names the protocol)"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        classes = np.unique(labels)
        missing = np.setdiff1d(classes, np.asarray(labels)[rows])
        if len(missing):  # the file's choice, kept; but a classifier can never predict these
            names = [class_names[c] if class_names else str(c) for c in missing]
            _log.warning(
                "split file %s labels no image of %d of %d classes (%s): those classes can "
                "never be predicted", path, len(missing), len(classes),
                ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""),
            )  # fmt: skip
        return rows, f"split_file={path.name}:{digest}"
    if fraction is None:
        raise ConfigError("a label subset needs a fraction (e.g. fraction=0.01) or a split_file")
    rows = per_class_fraction(labels, fraction, seed, class_names)
    return rows, f"fraction={fraction:g}:seed={seed}"
