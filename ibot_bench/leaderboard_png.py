"""``leaderboard.png``: the headline boards as heatmaps, one panel per comparability group.

Rows are encoders, columns headline metrics, the value in each cell. Colour is the
difference from the baseline encoder (:attr:`~ibot_bench.leaderboard.GroupBoard.baseline`)
in points, on a diverging map centred at 0 (blue ahead, red behind) shared by every column,
since all headline metrics are percentages. A group without the baseline is coloured per
column instead, and its title says so. The image is at most :data:`MAX_WIDTH_PX` wide.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ibot_bench.io import atomic_write
from ibot_bench.leaderboard import GroupBoard, plot_text

DPI = 100
MAX_WIDTH_PX = 1600
ROW_LABEL_CHARS = 28  # row names are cut here; the Markdown legend has them in full


def _short(name: object, limit: int = ROW_LABEL_CHARS) -> str:
    text = plot_text(name).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_heatmap(boards: Sequence[GroupBoard], path: Path) -> None:
    """Draw ``boards`` into ``path`` (PNG, at most :data:`MAX_WIDTH_PX` wide)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"text.usetex": False, "text.parse_math": False}):  # "$x$" literal
        columns = max(b.table.shape[1] for b in boards)
        width = min(MAX_WIDTH_PX / DPI, 3.2 + 1.05 * columns)
        heights = [1.4 + 0.42 * b.table.shape[0] for b in boards]
        fig, axes = plt.subplots(
            len(boards),
            1,
            figsize=(width, sum(heights)),
            height_ratios=heights,
            layout="constrained",
            squeeze=False,
        )
        for ax, b in zip(axes[:, 0], boards):
            _panel(ax, b)
        atomic_write(path, lambda p: fig.savefig(p, dpi=DPI, format="png"))
        plt.close(fig)


def cell_colours(board: GroupBoard) -> tuple[np.ndarray, np.ndarray | None, str, str]:
    """(colour in -1..1 per cell, difference from the baseline or None, colormap, note).

    With a baseline: the difference in points over the largest one of the panel, so 0 (the
    baseline's own row) is the colormap's centre. Without: each column scaled to -1..1.
    """
    values = board.table.to_numpy(dtype=float)
    if board.baseline is not None:
        diff = values - board.table.loc[board.baseline].to_numpy(dtype=float)
        reach = np.nanmax(np.abs(diff), initial=0.0) or 1.0
        note = f"colour: difference from {_short(board.baseline)} (points)"
        return diff / reach, diff, "RdBu", note
    with np.errstate(all="ignore"):  # an all-NaN column stays NaN
        low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        colour = 2 * (values - low) / np.where(high > low, high - low, 1) - 1
    return colour, None, "viridis", "no baseline encoder: colour scaled per column"


def _panel(ax, board: GroupBoard) -> None:
    import matplotlib

    values = board.table.to_numpy(dtype=float)
    best = board.best().to_numpy()
    colour, diff, cmap, note = cell_colours(board)
    shades = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")
    ax.imshow(np.ma.masked_invalid(colour), cmap=shades, vmin=-1, vmax=1, aspect="auto")
    rows = [_short(n) + (" (baseline)" if n == board.baseline else "") for n in board.table.index]
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xticks(
        range(board.table.shape[1]),
        [_short(c, 24) for c in board.table.columns],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_title(f"{_short(board.group, 60)}\n{note}", fontsize=9)
    for (i, j), v in np.ndenumerate(values):
        if v != v:
            continue
        text = f"{v:.1f}"
        if diff is not None and board.table.index[i] != board.baseline and diff[i, j] == diff[i, j]:
            text += f"\n{diff[i, j]:+.1f}"
        dark = abs(colour[i, j]) > 0.6 if diff is not None else colour[i, j] < -0.2
        ink = "white" if dark else "black"  # readable on the map's dark ends
        weight = "bold" if best[i, j] else "normal"
        ax.text(j, i, text, ha="center", va="center", color=ink, fontsize=7, fontweight=weight)
