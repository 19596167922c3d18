"""``leaderboard.png``: the headline boards as heatmaps, one panel per comparability group.

Rows are encoders, columns headline metrics, the value in each cell. Colour is the
difference from the baseline encoder (:attr:`~ibot_bench.leaderboard.GroupBoard.baseline`)
in points, on a diverging map centred at 0 (blue ahead, red behind) shared by every column,
since all headline metrics are percentages. A group without the baseline is coloured per
column instead, and its title says so. The image is at most :data:`MAX_WIDTH_PX` wide, and a
panel draws at most :data:`MAX_ROWS` encoders (the baseline and the best by mean rank over the
columns; its title says how many of how many), so a board of thousands stays an image one can
open; the Markdown and CSV boards keep every row.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ibot_bench.io import atomic_write
from ibot_bench.leaderboard import GroupBoard, plot_text

DPI = 100
MAX_WIDTH_PX = 1600
ROW_LABEL_CHARS = 28  # row names are cut here; the Markdown legend has them in full
MAX_ROWS = 40  # encoders drawn per panel (a 40-row panel is about 1,800 px tall)
_NO_GLYPH = re.compile(r"Glyph \d+ .* missing from font")
log = logging.getLogger(__name__)


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
        shown = [shown_rows(b) for b in boards]
        heights = [1.4 + 0.42 * len(rows) for rows in shown]
        fig, axes = plt.subplots(
            len(boards),
            1,
            figsize=(width, sum(heights)),
            height_ratios=heights,
            layout="constrained",
            squeeze=False,
        )
        for ax, b, rows in zip(axes[:, 0], boards, shown):
            _panel(ax, b, rows)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            atomic_write(path, lambda p: fig.savefig(p, dpi=DPI, format="png"))
        plt.close(fig)
    missing = [w for w in caught if _NO_GLYPH.search(str(w.message))]
    for w in caught:  # matplotlib's other warnings as they were
        if w not in missing:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        log.warning(
            "%s: some characters of the names have no glyph in matplotlib's font and show as "
            "boxes there; leaderboard.md and leaderboard.csv have them",
            path.name,
        )


def shown_rows(board: GroupBoard) -> list[str]:
    """The rows of ``board`` a panel draws: all of them in board order, or at most
    :data:`MAX_ROWS`: the baseline, then those with the best mean rank over the columns, best
    first (each column ranked on its own, higher is better; a row's missing cells skipped)."""
    table = board.table
    if len(table) <= MAX_ROWS:
        return list(table.index)
    score = table.rank(pct=True).mean(axis=1).fillna(-1.0)
    if board.baseline is not None:
        score[board.baseline] = 2.0  # always drawn: the colours are relative to it
    return list(score.sort_values(ascending=False, kind="stable").index[:MAX_ROWS])


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


def _panel(ax, board: GroupBoard, shown: list[str]) -> None:
    import matplotlib

    at = [board.table.index.get_loc(name) for name in shown]
    values = board.table.to_numpy(dtype=float)[at]
    best = board.best().to_numpy()[at]  # the best of every row, drawn or not
    colour, diff, cmap, note = cell_colours(board)
    colour, diff = colour[at], None if diff is None else diff[at]
    if len(shown) < len(board.table):
        note += f"\nbest {len(shown)} of {len(board.table)} by mean rank; all in leaderboard.md"
    shades = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")
    ax.imshow(np.ma.masked_invalid(colour), cmap=shades, vmin=-1, vmax=1, aspect="auto")
    rows = [_short(n) + (" (baseline)" if n == board.baseline else "") for n in shown]
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
        if diff is not None and shown[i] != board.baseline and diff[i, j] == diff[i, j]:
            text += f"\n{diff[i, j]:+.1f}"
        dark = abs(colour[i, j]) > 0.6 if diff is not None else colour[i, j] < -0.2
        ink = "white" if dark else "black"  # readable on the map's dark ends
        weight = "bold" if best[i, j] else "normal"
        ax.text(j, i, text, ha="center", va="center", color=ink, fontsize=7, fontweight=weight)
