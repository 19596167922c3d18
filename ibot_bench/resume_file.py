"""A task's resumable state on disk: long trainings save it every few minutes (and on a stop),
so a stopped or killed run continues where it stopped instead of starting over.

Used by the linear probe (the 100-epoch ImageNet probe takes hours on a CPU, the paper's
augmented one hours on a GPU too) and by the logistic-regression C sweep (one lbfgs fit per C
on 1.28M features). :class:`ResumeFile` names the run by a ``signature`` (what is trained):
a file with another signature, or a damaged one, is moved aside and never trusted. Short
runs finish before the first save and write nothing; the file is removed when the work ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ibot_bench.io import atomic_write

SAVE_EVERY_S = 300.0  # a kill -9 loses at most this much work


class ResumeFile:
    """The saved state of one run of task ``what`` at ``path``, named by ``signature``."""

    def __init__(self, path: Path, signature: dict[str, Any], what: str) -> None:
        self.path, self.signature, self.what = path, signature, what
        self.last_save = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last_save >= SAVE_EVERY_S

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, arrays, numbers, strings, lists, dicts) atomically."""
        payload = {"signature": self.signature, "state": state}
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))
        self.last_save = time.monotonic()

    def load(self, log: Callable[[str], None]) -> dict[str, Any] | None:
        """The saved state, or None when there is none; a file that is unreadable or from a
        run with other settings is moved aside (named in the log), never trusted."""
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
            if payload.get("signature") != self.signature:
                raise ValueError("it belongs to a run with other settings")
            return payload["state"]
        except Exception as exc:  # any damage means: start over, keeping the file
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"{self.path.name}.unusable-{stamp}")
            self.path.replace(aside)
            log(
                f"{self.what}: not resuming from {self.path} ({exc}); kept as {aside}, starting over"
            )
            return None

    def finish(self) -> None:
        """The work is over: its record keeps the results, the state is not needed."""
        self.path.unlink(missing_ok=True)
