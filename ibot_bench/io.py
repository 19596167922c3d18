"""Atomic file writes: a reader never sees a half-written file (temp file + rename)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ibot_bench.errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``.

    The temp file lives in the same folder so the rename is atomic; on any error
    it is removed and ``path`` is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(
            f"cannot write to {path.parent} ({exc.strerror}). "
            "Choose a writable folder (e.g. --output or IBOT_BENCH_CACHE)."
        ) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if _disk_full(exc):
            raise UserError(
                f"no space left on the device of {path.parent} while writing {path.name}; "
                "free space or write elsewhere (--output, IBOT_BENCH_CACHE); nothing was "
                "half-written"
            ) from None
        raise
    return path


def _disk_full(exc: BaseException) -> bool:
    """An out-of-space error, raw or wrapped (torch.save raises RuntimeError for it)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, RuntimeError) and "No space left on device" in str(exc)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))
