"""Resumable feature extraction: the rows extracted so far are kept on disk, so a stopped or
killed extraction continues where it stopped instead of starting over.

A frozen-feature extraction can take hours (ImageNet's 1.28M training images on a CPU). Every
few minutes (:data:`ibot_bench.resume_file.SAVE_EVERY_S`), and at once on Ctrl-C / SIGTERM,
each rank writes the rows it extracted since its last save as one chunk file in
``<cache entry>.partial/`` (named by rank, world size and dataset row range). The entry's name
is the hash of the cache key, so the chunks belong to exactly these weights, data and
settings. A rerun, under any number of ranks, reads the chunks (of any rank) that cover its
shard contiguously from the shard's first row, checks that they are readable and finite
(else they are discarded and extracted again), and extracts the rest. The folder is removed
once the cache entry is written.
"""

from __future__ import annotations

import re
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ibot_bench import resume_file
from ibot_bench.io import atomic_write

OK = "ok"  # the chunk array of per-row "image was readable" flags
_CHUNK = re.compile(r"rank\d+of\d+-(\d+)-(\d+)\.npz")  # dataset rows [start, stop)


class ExtractionProgress:
    """The saved rows of one rank's shard ``rows`` of the cache entry ``entry``."""

    def __init__(self, entry: Path, rows: range, rank: int, world_size: int) -> None:
        self.folder = entry.with_name(f"{entry.name}.partial")
        self.rows = rows
        self.prefix = f"rank{rank}of{world_size}"
        self.saved = 0  # rows of the shard (from its first) already on disk
        self.last_save = time.monotonic()

    def _chunks(self) -> list[tuple[int, int, int, int, Path]]:
        """``(first, stop, chunk start, chunk stop, path)``: the saved chunks (of any rank and
        world size) that continue each other from the shard's first row, and the rows of each
        that fall in the shard; a longer chunk is preferred where several start the same."""
        found = (_CHUNK.fullmatch(p.name) for p in self.folder.glob("rank*.npz"))
        saved = [(int(m[1]), int(m[2]), self.folder / m[0]) for m in found if m]
        plan, expected = [], self.rows.start
        while expected < self.rows.stop:
            covering = [c for c in saved if c[0] <= expected < c[1]]
            if not covering:
                break
            start, stop, path = max(covering, key=lambda c: c[1])
            plan.append((expected, min(stop, self.rows.stop), start, stop, path))
            expected = plan[-1][1]
        return plan

    def resume(
        self, names: tuple[str, ...], log: Callable[[str], None]
    ) -> dict[str, np.ndarray] | None:
        """The arrays (``names`` and :data:`OK`) of the shard's first rows saved by a stopped
        run, or None if there are none (or they are unusable: then they are removed)."""
        chunks = self._chunks()
        if not chunks:
            return None
        try:
            arrays = self._read(chunks, names)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log(f"features: discarding the saved rows in {self.folder} ({exc}); starting over")
            for *_, path in chunks:
                path.unlink(missing_ok=True)
            return None
        self.saved = len(arrays[OK])
        log(f"features: resuming after {self.saved} of {len(self.rows)} images ({self.folder})")
        return arrays

    def _read(self, chunks: list[tuple[int, int, int, int, Path]], names: tuple[str, ...]) -> dict:
        parts: dict[str, list[np.ndarray]] = {name: [] for name in (*names, OK)}
        for first, stop, start, end, path in chunks:
            with np.load(path, allow_pickle=False) as chunk:
                for name, part in parts.items():
                    value = chunk[name]
                    if len(value) != end - start or not np.isfinite(value).all():
                        raise ValueError(f"{path.name}: {name} is truncated or not finite")
                    part.append(value[first - start : stop - start])
        arrays = {name: np.concatenate(part) for name, part in parts.items()}
        arrays[OK] = arrays[OK].astype(bool)
        return arrays

    def due(self) -> bool:
        return time.monotonic() - self.last_save >= resume_file.SAVE_EVERY_S

    def save(self, out: dict[str, torch.Tensor], ok: torch.Tensor, done: int) -> None:
        """Write the shard's rows ``[saved, done)`` (indices into ``out`` / ``ok``) as a chunk."""
        if done > self.saved:
            start, stop = self.rows.start + self.saved, self.rows.start + done
            arrays = {name: t[self.saved : done].numpy() for name, t in out.items()}
            arrays[OK] = ok[self.saved : done].numpy()
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{self.prefix}-{start}-{stop}.npz"
            atomic_write(path, lambda tmp: _savez(tmp, arrays))
            self.saved = done
        self.last_save = time.monotonic()

    def discard(self) -> None:
        """Remove the saved rows of every rank (once the cache entry is written, or on
        ``--refresh``)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)
