"""Resumable linear-probe training: the heads' state is kept on disk during long runs, so a
stopped or killed run continues where it stopped.

On ImageNet the 100-epoch probe takes hours on a CPU, and the paper's augmented protocol
(``augment=true``, the backbone runs on every batch) takes hours on a GPU too. Every
:data:`SAVE_EVERY_S` seconds, and at once on Ctrl-C / SIGTERM, :class:`HeadsCheckpoint`
writes the heads, their momentum buffers, the position in the epoch (with the shuffling RNG
state of the epoch's start), the augmentation RNG, and the caller's tracked results (the
reference protocol's best so far) to the task's work folder. A rerun restores all of it and
ends with the same numbers as a run never stopped. Short runs finish before the first save
and write nothing; the file is removed when the training finishes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ibot_bench.io import atomic_write

SAVE_EVERY_S = 300.0  # a kill -9 loses at most this much training time


@dataclass
class Position:
    """Where training stands: ``epoch``, the first batch row ``start`` of that epoch still to
    train, the global ``step``, and the shuffling RNG's state at that epoch's start."""

    epoch: int = 0
    start: int = 0
    step: int = 0
    rng_state: dict | None = None


class HeadsCheckpoint:
    """The training state of one linear-heads run at ``path``; ``signature`` names the run
    (heads, classes, rows, schedule): a file with another signature is not resumed."""

    def __init__(self, path: Path, signature: dict[str, Any]) -> None:
        self.path, self.signature = path, signature
        self.last_save = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last_save >= SAVE_EVERY_S

    def save(self, state: dict[str, Any], position: Position) -> None:
        """Write ``state`` (tensors, numbers, lists) with ``position`` atomically."""
        payload = {"signature": self.signature, "position": vars(position), **state}
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))
        self.last_save = time.monotonic()

    def load(self, log: Callable[[str], None]) -> tuple[dict[str, Any], Position] | None:
        """The saved state and position, or None when there is none; a file that is
        unreadable or from another run is moved aside (named in the log), never trusted."""
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
            if payload.get("signature") != self.signature:
                raise ValueError("it belongs to a run with other settings")
            position = Position(**payload.pop("position"))
        except Exception as exc:  # any damage means: start over, keeping the file
            aside = self.path.with_name(
                f"{self.path.name}.unusable-{time.strftime('%Y%m%d-%H%M%S')}"
            )
            self.path.replace(aside)
            log(f"linear: not resuming from {self.path} ({exc}); kept as {aside}, starting over")
            return None
        payload.pop("signature")
        log(
            f"linear: resuming from {self.path} at epoch {position.epoch + 1}, "
            f"row {position.start} of the epoch"
        )
        return payload, position

    def finish(self) -> None:
        """Training is over: the record keeps the results, the state is not needed."""
        self.path.unlink(missing_ok=True)
