"""Cached feature extraction: one engine for every frozen-feature task."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ibot_bench.data import cache_root, load_split, require_classification
from ibot_bench.data.classification import (
    INTERPOLATIONS,
    ClassificationSplit,
    EvalTransform,
    normalize_batch,
)
from ibot_bench.distributed import (
    all_ranks,
    barrier,
    gather_objects,
    gather_rows,
    init_distributed,
    raise_any,
    shard_range,
    world,
)
from ibot_bench.encoders import Encoder, encoder_fingerprint, load_encoder
from ibot_bench.errors import ConfigError, DatasetError, UnreadableImageError, UserError
from ibot_bench.feature_progress import OK, ExtractionProgress
from ibot_bench.interrupt import StopRequests, TrainingInterrupted, ignore_interrupts
from ibot_bench.io import remove_stale_temps, temp_prefix
from ibot_bench.precision import choose_precision, probe_step
from ibot_bench.runtime import autocast, loader_workers, resolve_device


@dataclass
class FeatureSet:
    """Frozen features of one dataset split, in dataset order.

    ``cls`` is the final-norm CLS (N, D) (the pooled features for encoders without a CLS
    token, e.g. CNNs); ``patch_mean`` the mean final-norm patch token (N, D);
    ``cls_last_n`` the concatenated CLS of the last n blocks (N, n*D; n = min(4, depth) by
    default, 0 columns for encoders without per-block CLS); ``labels`` (N,) int64;
    ``class_names`` index -> name; ``sample_names`` the dataset's name of each row's image.
    Arrays are float32 numpy (possibly memory-mapped); tasks convert to torch as they need.
    ``meta`` is provenance (cache key, encoder, speed) and ``meta["layout"]`` what the
    arrays are (:func:`feature_layout`).
    """

    cls: np.ndarray
    patch_mean: np.ndarray
    cls_last_n: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    sample_names: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def layout(self) -> dict:
        """See :func:`feature_layout`."""
        return feature_layout(self)

    def subset(self, indices: np.ndarray) -> FeatureSet:
        """Rows ``indices`` (e.g. a 1% label subset or a validation hold-out)."""
        return FeatureSet(
            cls=np.asarray(self.cls[indices]),
            patch_mean=np.asarray(self.patch_mean[indices]),
            cls_last_n=np.asarray(self.cls_last_n[indices]),
            labels=np.asarray(self.labels[indices]),
            class_names=self.class_names,
            sample_names=[self.sample_names[i] for i in indices] if self.sample_names else [],
            meta={**self.meta, "subset": int(len(indices))},
        )


@dataclass
class FeatureConfig:
    """How features are computed; every field that changes the numbers enters the cache key."""

    img_size: int | None = None  # centre-crop size; None = the dataset's default (224 for IN)
    crop_pct: float = 0.875  # resize shorter side to img_size / crop_pct first (256 -> 224)
    interpolation: str = "bicubic"
    # CLS of the last n blocks for the linear probe; None = min(4, the encoder's depth), or
    # none for encoders without a CLS token per block (CNNs); the count used is recorded in
    # the features' meta["layout"]
    n_last_blocks: int | None = None
    batch_size: int = 64
    num_workers: int = -1  # -1: automatic (CPU count based)
    # fp32, the reference protocols' precision: bf16 rounding is noise on the small differences
    # between images that a probe reads (docs/protocols.md#feature-precision); auto = faster
    precision: str = "fp32"  # fp32 | auto | bf16 | fp16
    channels_last: bool = False
    skip_corrupt: bool = False  # skip unreadable images (reported) instead of failing
    device: str = "auto"  # auto | cpu | cuda | cuda:N


def check_feature_config(cfg: FeatureConfig) -> None:
    """A :class:`ConfigError` naming the first ``features.`` setting that cannot work."""
    modes = ", ".join(INTERPOLATIONS)
    problems = [
        ("img_size", cfg.img_size is not None and cfg.img_size < 1, ">= 1 (or null)"),
        ("crop_pct", not 0 < cfg.crop_pct <= 1, "in (0, 1]"),
        ("interpolation", cfg.interpolation not in INTERPOLATIONS, f"one of {modes}"),
        ("batch_size", cfg.batch_size < 1, ">= 1"),
        ("num_workers", cfg.num_workers < -1, ">= 0 (or -1: automatic)"),
        ("n_last_blocks", cfg.n_last_blocks is not None and cfg.n_last_blocks < 0, ">= 0"),
    ]
    for key, bad, rule in problems:
        if bad:
            raise ConfigError(f"features.{key} must be {rule}, got {getattr(cfg, key)}")


CACHE_VERSION = 1


def feature_layout(fs: FeatureSet) -> dict:
    """What ``fs``'s arrays are: ``cls`` (its source), ``cls_token``, ``block_features``,
    ``num_blocks`` (None if unknown) and ``n_last_blocks`` (the blocks in ``cls_last_n``).

    From ``meta["layout"]`` (written by :func:`extract_features`); for feature sets without
    it (built by hand, or cached before it was recorded) inferred from the array shapes,
    assuming a ViT with a CLS token.
    """
    layout = fs.meta.get("layout")
    if layout:
        return dict(layout)
    d = fs.cls.shape[1] if fs.cls.ndim == 2 else 0
    width = fs.cls_last_n.shape[1] if fs.cls_last_n.ndim == 2 else 0
    return {
        "cls": "final-norm CLS token",
        "cls_token": True,
        "block_features": True,
        "num_blocks": None,
        "n_last_blocks": width // d if d else 0,
    }


def cls_feature(fs: FeatureSet) -> dict:
    """The record of a task that uses ``fs.cls``: which feature that is for this encoder."""
    return {"variant": "cls", "source": feature_layout(fs)["cls"]}


FEATURE_ARRAYS = ("cls", "patch_mean", "cls_last_n")  # float32 (N, D) each
ARRAYS = (*FEATURE_ARRAYS, "labels")


def _resumed(
    arrays: dict[str, np.ndarray] | None, n: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The (features, ok) buffers of a shard of ``n`` rows, starting with the saved rows."""
    ok = torch.zeros(n, dtype=torch.bool)
    if arrays is None:
        return {}, ok
    done = len(arrays[OK])
    ok[:done] = torch.from_numpy(arrays[OK])
    out = {}
    for name in FEATURE_ARRAYS:
        out[name] = torch.zeros((n, arrays[name].shape[1]), dtype=torch.float32)
        out[name][:done] = torch.from_numpy(arrays[name])
    return out, ok


def _match_empty_shard(out: dict[str, torch.Tensor], n: int) -> None:
    """Collective: a rank whose shard is empty (more ranks than images) never saw a feature,
    so it takes the other ranks' widths and gathers the same arrays as they do."""
    shapes = gather_objects({name: t.shape[1] for name, t in out.items()})
    widths = next((w for w in shapes if w), {})
    for name, width in widths.items():  # type: ignore[union-attr]
        out.setdefault(name, torch.zeros((n, width), dtype=torch.float32))


class _Images(torch.utils.data.Dataset):
    """Rows of a split -> (row, uint8 image, ok); unreadable images give ok=False if skipping."""

    def __init__(self, data, rows: range, transform, skip_corrupt: bool) -> None:
        self.data, self.rows, self.transform, self.skip = data, rows, transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            return row, self.transform(self.data.read(row)), True
        except DatasetError:
            if not self.skip:
                raise
            size = self.transform.crop
            return row, torch.zeros(3, size, size, dtype=torch.uint8), False


def _log_skipped(skipped: list[str], log: Callable[[str], None]) -> None:
    if skipped:
        log(
            f"features: skipped {len(skipped)} unreadable image(s) (features.skip_corrupt), "
            f"e.g. {skipped[:3]}; the record lists them all"
        )


def _read_error(data: ClassificationSplit, row: int) -> str:
    """Why image ``row`` of ``data`` cannot be read (its error message)."""
    try:
        data.read(row)
    except UnreadableImageError as exc:
        return f"{exc.path}: {exc.reason}"
    return f"{data.sample_names[row]} (readable now: was it replaced meanwhile?)"


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _all_finite(array: np.ndarray, rows: int = 65536) -> bool:
    """No NaN or inf in ``array`` (a memory map: read ``rows`` rows at a time)."""
    return all(np.isfinite(array[i : i + rows]).all() for i in range(0, len(array), rows))


def _load_cached(path: Path, key_parts: dict) -> FeatureSet | None:
    """The cache entry at ``path``, or None when it is missing, foreign or damaged.

    Everything is checked before use: the key recorded in ``meta.json``, plain (unpickled)
    float/int arrays of one length, finite features (extraction never caches NaN or inf, so
    one in the file is damage, not the encoder's), names for every row. A damaged or planted
    entry is a miss (it is then rewritten), never an error deep inside a task.
    """
    try:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {
            name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in ARRAYS
        }
        n = len(arrays["labels"])
        ok = (
            meta.get("key") == json.loads(json.dumps(key_parts, default=str))
            and n > 0  # never written: an old entry of a split whose every image was skipped
            and len(meta["sample_names"]) == n
            and all(a.dtype.kind in "fiu" and len(a) == n for a in arrays.values())
            and all(arrays[name].ndim == 2 for name in FEATURE_ARRAYS)
            and all(_all_finite(arrays[name]) for name in FEATURE_ARRAYS)
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not ok:
        return None
    return FeatureSet(
        cls=arrays["cls"],
        patch_mean=arrays["patch_mean"],
        cls_last_n=arrays["cls_last_n"],
        labels=np.asarray(arrays["labels"]),
        class_names=list(meta["class_names"]),
        sample_names=list(meta["sample_names"]),
        meta={**meta, "cache_path": str(path), "cache_hit": True},
    )


def _make_temp_dir(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)  # what killed extractions left behind
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp"))
    except OSError as exc:
        raise UserError(
            f"feature cache folder {path.parent} is not writable ({exc.strerror}). Set "
            "IBOT_BENCH_CACHE or --cache-dir to a writable folder."
        ) from exc


def _remove(path: Path) -> None:
    """Remove ``path``: a folder with its contents, or a file or link (a damaged entry)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write the cache folder atomically: build it under a temp name, then rename."""
    tmp = _make_temp_dir(path)
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if os.path.lexists(path):  # a damaged entry, or --refresh: move it aside, then swap
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):  # another writer moved it already
                os.replace(path, old)
            _remove(old)
        try:
            os.replace(tmp, path)
        except OSError:  # another process wrote the same entry meanwhile: keep theirs
            if not (path / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise UserError(
                f"no space left on the device of the feature cache {path.parent}; free space "
                "or set IBOT_BENCH_CACHE / --cache-dir to a folder on another disk"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def inference_precision(
    device: torch.device,
    cfg: FeatureConfig,
    encoder_fp: str,
    crop: int,
    built: Callable[[], Encoder],
    log: Callable[[str], None] = print,
    every_rank: bool = True,
) -> str:
    """``cfg.precision``; for ``auto`` the faster one for this encoder's forward at ``crop``
    px, timed once per machine, encoder and input (:mod:`ibot_bench.precision`; called by
    every rank unless ``every_rank`` is False).

    ``built()`` returns the encoder on ``device`` in eval mode; it is called only when the
    decision is not cached. The augmented-view probes use the same key, so they run in the
    precision the cached features were extracted in.
    """
    key = {
        "work": "features",
        "encoder": encoder_fp,
        "img_size": crop,
        "batch": cfg.batch_size,
        "n_last_blocks": cfg.n_last_blocks,
        "channels_last": cfg.channels_last,
    }

    @functools.cache
    def images(n: int) -> torch.Tensor:
        x = torch.randn(n, 3, crop, crop, device=device)
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

    def run(n: int) -> None:
        encoder = built()
        with torch.inference_mode():
            encoder.forward_features(images(n), encoder.resolve_last_blocks(cfg.n_last_blocks))

    step = probe_step(device, cfg.batch_size, run)
    return choose_precision(device, cfg.precision, key, step, log=log, every_rank=every_rank)


def extract_features(
    encoder_spec: str,
    data_spec: str,
    split: str = "train",
    cfg: FeatureConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
    encoder: Encoder | Callable[[], Encoder] | None = None,
    fingerprint: str | None = None,
    allow_partial: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data: ClassificationSplit | None = None,
) -> FeatureSet:
    """Features of ``split`` of ``data_spec`` under ``encoder_spec``, from the cache if present.

    The cache key covers the encoder fingerprint (weights-file hash), the dataset
    fingerprint (file list + sizes + labels), the transform, the feature spec and the
    precision, so a hit is never stale; a hit skips building the model altogether (unless
    ``precision=auto`` has yet to be timed for this encoder on this machine).
    Under torchrun each rank extracts a contiguous shard and the rows are gathered in
    dataset order on every rank; rank 0 writes the cache. ``data`` is the already loaded
    split of ``data_spec`` when the caller has it (saves scanning the folder again).
    ``encoder`` is the built encoder, or a function building it (called only on a cache
    miss); without one it is loaded from ``encoder_spec``. ``fingerprint`` is the encoder's
    when the caller already knows it (saves hashing the weights file again).
    ``allow_partial``: the checkpoint may miss keys (``--allow-partial``); such features
    are cached under a key of their own, so a run without the flag never reuses them.
    """
    cfg = cfg or FeatureConfig()
    check_feature_config(cfg)
    data = require_classification(
        data if data is not None else load_split(data_spec, split), data_spec
    )
    transform = EvalTransform.for_size(cfg.img_size or data.default_img_size, cfg.crop_pct)
    transform = EvalTransform(transform.crop, transform.resize, cfg.interpolation)
    device = resolve_device(cfg.device)
    if isinstance(encoder, Encoder):
        enc_fp = encoder.info.fingerprint
    else:
        enc_fp = fingerprint or encoder_fingerprint(encoder_spec)

    @functools.cache
    def built() -> Encoder:  # only on a cache miss (of the features, or of the precision)
        if encoder is None:
            model = load_encoder(encoder_spec, allow_partial=allow_partial)
        else:
            model = encoder if isinstance(encoder, Encoder) else encoder()
        model = model.to(device).eval()
        return model.to(memory_format=torch.channels_last) if cfg.channels_last else model

    init_distributed()
    precision = inference_precision(device, cfg, enc_fp, transform.crop, built, log)
    key_parts = {
        "version": CACHE_VERSION,
        "encoder": enc_fp,
        "dataset": data.fingerprint(),
        "transform": asdict(transform),
        "n_last_blocks": cfg.n_last_blocks,
        "precision": precision,
        "skip_corrupt": cfg.skip_corrupt,
    }
    if allow_partial:  # features of a partial load are not the file's: a run without the
        key_parts["allow_partial"] = True  # flag must load the checkpoint (and refuse it)
    path = Path(cache_dir or cache_root() / "features") / cache_key(key_parts)
    rank, world_size = world()
    # a hit only if every rank has one (e.g. nodes without a shared cache folder): the
    # extraction below is collective, so all ranks must take the same branch
    cached = None if refresh else _load_cached(path, key_parts)
    if all_ranks(cached is not None):
        log(f"features: cache hit {path}")
        _log_skipped(cached.meta.get("skipped") or [], log)
        return cached
    if cached is None and not refresh and path.exists() and rank == 0:
        log(
            f"features: the cache entry {path} is damaged (unreadable, truncated or not finite) "
            "or foreign; recomputing it"
        )

    if rank == 0:  # fail before the expensive part, not after it
        shutil.rmtree(_make_temp_dir(path))
    encoder = built()
    n_last_blocks = encoder.resolve_last_blocks(cfg.n_last_blocks)
    layout = encoder.layout(cfg.n_last_blocks)
    if rank == 0:
        log(
            f"features: {encoder_spec} on {data_spec} [{split}], {len(data)} images, "
            f"{transform.crop}px, device {device}, precision {precision}, "
            f"cls = {layout['cls']}, cls_last_n = CLS of the last {n_last_blocks} block(s)"
        )
    rows = shard_range(len(data), rank, world_size)
    n = len(rows)
    saved = ExtractionProgress(path, rows, rank, world_size)
    if refresh:
        saved.discard()
    out, ok = _resumed(saved.resume(FEATURE_ARRAYS, log), n)
    resumed_rows = saved.saved  # rows a stopped run extracted: not part of this run's speed
    workers = loader_workers(cfg.num_workers, device, world_size)
    loader = torch.utils.data.DataLoader(
        _Images(data, range(rows.start + saved.saved, rows.stop), transform, cfg.skip_corrupt),
        batch_size=cfg.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_interrupts,
    )
    start = time.perf_counter()
    try:
        with (
            tqdm(
                total=n,
                initial=saved.saved,
                desc=f"features {split}",
                unit="img",
                disable=not progress or rank,
            ) as bar,
            torch.inference_mode(),
            autocast(device, precision),
            StopRequests("features") as stop,
        ):
            for row_idx, images, good in loader:
                x = normalize_batch(images.to(device, non_blocking=True))
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats = encoder.forward_features(x, n_last_blocks=n_last_blocks)
                local = row_idx - rows.start
                for name in FEATURE_ARRAYS:
                    value = feats[name].float().cpu()
                    if name not in out:
                        out[name] = torch.zeros((n, value.shape[1]), dtype=torch.float32)
                    out[name][local] = value
                ok[local] = good
                bar.update(len(row_idx))
                done = int(local[-1]) + 1  # batches come in row order
                if stop.signal_name is not None:  # this rank's own signal: no collective call
                    saved.save(out, ok, done)
                    raise TrainingInterrupted(
                        f"features stopped by {stop.signal_name}; {done} of {n} images of "
                        f"{data_spec} [{split}] saved in {saved.folder}: rerun the same command "
                        "to continue"
                    )
                if saved.due():
                    saved.save(out, ok, done)
    except Exception as exc:  # every rank must hear of it, or the others wait in the gather
        raise_any(exc)
    raise_any(None)
    _match_empty_shard(out, n)
    elapsed = time.perf_counter() - start
    extracted = sum(gather_objects(n - resumed_rows))  # this run's images, all ranks
    ok = gather_rows(ok, len(data))
    arrays = {  # nothing to gather for an empty feature (cls_last_n with 0 blocks)
        name: (gather_rows(t, len(data)) if t.shape[1] else t.new_zeros(len(data), 0)).numpy()
        for name, t in out.items()
    }
    keep = ok.numpy()
    skipped = [data.sample_names[i] for i in np.flatnonzero(~keep)]
    if skipped and not keep.any():  # nothing to evaluate: say why, not fail in a task
        raise DatasetError(
            f"every one of the {len(keep)} images of {data_spec} [{split}] is unreadable "
            f"(features.skip_corrupt=true skipped them all), e.g. {_read_error(data, 0)}. "
            "Check that the folder holds the images (not e.g. download placeholders)."
        )
    _log_skipped(skipped, log)
    arrays = {name: a[keep] for name, a in arrays.items()}
    kept_names = [s for s, k in zip(data.sample_names, keep) if k]
    bad = sorted({int(i) for a in arrays.values() for i in np.flatnonzero(~np.isfinite(a).all(1))})
    if bad:  # never cached, never evaluated: every protocol would report garbage
        raise UserError(
            f"encoder {encoder_spec!r} gives NaN or inf features for {len(bad)} of {len(keep)} "
            f"images of {data_spec} [{split}] (e.g. {kept_names[bad[0]]}); its weights "
            "are not finite (a diverged checkpoint?) or the precision overflows: use a finite "
            "checkpoint, or features.precision=fp32"
        )
    arrays["labels"] = data.labels[keep]
    meta = {
        "encoder_spec": encoder_spec,
        "encoder": asdict(encoder.info),
        "dataset_spec": data_spec,
        "split": split,
        "class_names": data.class_names,
        "sample_names": kept_names,
        "skipped": skipped,
        "key": key_parts,
        "layout": layout,
        "images_per_s": extracted / max(elapsed, 1e-9),  # all ranks' (a shard may be empty)
        "world_size": world_size,
        "device": str(device),
    }
    if rank == 0:
        _write_cache(path, arrays, meta)
        saved.discard()
        log(f"features: {meta['images_per_s']:.1f} img/s, cached at {path}")
    barrier()
    return FeatureSet(
        cls=arrays["cls"],
        patch_mean=arrays["patch_mean"],
        cls_last_n=arrays["cls_last_n"],
        labels=arrays["labels"],
        class_names=data.class_names,
        sample_names=meta["sample_names"],
        meta={**meta, "cache_path": str(path), "cache_hit": False},
    )
