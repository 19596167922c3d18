"""Per-iteration and per-epoch schedules, reproducing the reference's arrays (docs/protocols.md#loss, docs/protocols.md#optimisation, docs/protocols.md#reference-subtleties).

``cosine_schedule`` is linear warm-up from ``start_warmup`` to ``base`` over the warm-up
iterations, then a half cosine from ``base`` towards ``final``: as in the reference, the
base value appears at both ends of the seam and the last value stays slightly above
``final`` (cos(pi (n - 1) / n) rather than cos(pi)).
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """Values for every iteration of a run (length epochs * iters_per_epoch)."""
    total = epochs * iters_per_epoch
    warmup_iters = min(warmup_epochs * iters_per_epoch, total)
    warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
    steps = np.arange(total - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(
    warmup_temp: float, temp: float, warmup_epochs: int, epochs: int, start_epoch: int = 0
) -> np.ndarray:
    """Per-epoch teacher temperature: ``warmup_temp`` until ``start_epoch`` (the MIM start for
    the patch temperature), then ``linspace(warmup_temp, temp, warmup_epochs)`` (so ``temp``
    is reached at epoch start + warmup - 1, docs/protocols.md#reference-subtleties), then constant; cut to ``epochs`` entries."""
    parts = [
        np.full(start_epoch, warmup_temp),
        np.linspace(warmup_temp, temp, warmup_epochs),
        np.full(max(epochs - start_epoch - warmup_epochs, 0), temp),
    ]
    return np.concatenate(parts)[:epochs]
