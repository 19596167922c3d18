"""Block-wise and random patch masks for masked image modelling (docs/protocols.md#block-masking, docs/protocols.md#reference-subtleties).

Hand-written: the reference's generator (BEiT's block masking as modified by iBOT) is a
small loop with exact acceptance rules that no library offers. Draws use a caller-owned
``random.Random`` so a sample's mask depends only on its seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch


def sample_ratio(rng: random.Random, ratios: Sequence[float], variances: Sequence[float]) -> float:
    """One masking ratio: draw U(r - v, r + v) (or r if v == 0) for *every* list entry, then
    pick one entry at random, as the reference's ``get_pred_ratio`` does (docs/protocols.md#reference-subtleties)."""
    drawn = [rng.uniform(r - v, r + v) if v > 0 else r for r, v in zip(ratios, variances)]
    return drawn[0] if len(drawn) == 1 else rng.choice(drawn)


def draw_block(
    rng: random.Random,
    height: int,
    width: int,
    remaining: float,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> tuple[int, int, int, int] | None:
    """One candidate rectangle (top, left, h, w): area ~ U((min(H, W) // 3)^2, remaining),
    aspect exp(U(ln a0, ln a1)), sides rounded; None unless strictly smaller than the grid."""
    low = (min(height, width) // 3) ** 2
    area = rng.uniform(low, remaining)
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    h = int(round(math.sqrt(area * ratio)))
    w = int(round(math.sqrt(area / ratio)))
    if not (w < width and h < height):
        return None
    return rng.randint(0, height - h), rng.randint(0, width - w), h, w


def block_mask(
    rng: random.Random,
    height: int,
    width: int,
    target: float,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> torch.Tensor:
    """BEiT/iBOT block masking on an ``height x width`` grid with ``target`` = ratio * H * W.

    While fewer than ``target`` cells are masked, up to ``attempts`` rectangles are tried
    (:func:`draw_block`); a rectangle may add only between 1 and ``remaining`` new cells.
    The loop stops when a round of attempts adds nothing, so the count never exceeds
    ``target`` and may fall short of it (docs/protocols.md#block-masking, docs/protocols.md#reference-subtleties).
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    count = 0
    while count < target:
        remaining = target - count
        delta = 0
        for _ in range(attempts):
            block = draw_block(rng, height, width, remaining, aspect)
            if block is not None:
                top, left, h, w = block
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= remaining:
                    window.fill_(True)
                    delta += new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def random_mask(rng: random.Random, height: int, width: int, target: float) -> torch.Tensor:
    """Exactly ``int(target)`` cells chosen uniformly (``pred_shape=rand``; int() truncates, docs/protocols.md#reference-subtleties)."""
    n = height * width
    flat = [False] * (n - int(target)) + [True] * int(target)
    rng.shuffle(flat)
    return torch.tensor(flat, dtype=torch.bool).view(height, width)


class MaskGenerator:
    """Masks for one crop per call: ratio from :func:`sample_ratio`, zero before
    ``pred_start_epoch``, shape ``block`` or ``rand``."""

    def __init__(
        self,
        ratios: Sequence[float],
        variances: Sequence[float],
        shape: str = "block",
        aspect: Sequence[float] = (0.3, 1 / 0.3),
        start_epoch: int = 0,
    ) -> None:
        self.ratios, self.variances = list(ratios), list(variances)
        self.shape, self.aspect, self.start_epoch = shape, (aspect[0], aspect[1]), start_epoch

    def __call__(self, rng: random.Random, grid: tuple[int, int], epoch: int) -> torch.Tensor:
        height, width = grid
        if epoch < self.start_epoch:
            return torch.zeros(height, width, dtype=torch.bool)
        target = sample_ratio(rng, self.ratios, self.variances) * height * width
        if self.shape == "rand":
            return random_mask(rng, height, width, target)
        return block_mask(rng, height, width, target, self.aspect)
