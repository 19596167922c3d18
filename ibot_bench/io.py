"""Atomic file writes: a reader never sees a half-written file (temp file + rename)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from ibot_bench.errors import UserError

# temp files and folders carry their writer (host, pid): ".NAME.~HOST-PID~XXXX.tmp", so the
# leftovers of a killed writer can be told from those of a live one and removed
_TEMP = re.compile(r"^\..+\.~(?P<host>[^~]*)-(?P<pid>\d+)~.*\.tmp$")


def temp_prefix(path: Path) -> str:
    """Prefix of a temp file or folder standing in for ``path`` while it is written."""
    return f".{path.name}.~{socket.gethostname()}-{os.getpid()}~"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> int:
    """Remove the temp files/folders in ``folder`` left by killed writers on this host."""
    removed, host = 0, socket.gethostname()
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["host"] != host or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``.

    The temp file lives in the same folder so the rename is atomic; on any error
    it is removed and ``path`` is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    except OSError as exc:
        raise UserError(
            f"cannot write to {path.parent} ({exc.strerror}). "
            "Choose a writable folder (e.g. --output or IBOT_BENCH_CACHE)."
        ) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from others
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, PermissionError):
            raise UserError(
                f"cannot write {path} ({exc.strerror}); make it writable or choose another "
                "folder (--output, IBOT_BENCH_CACHE)"
            ) from None
        if _disk_full(exc):
            raise UserError(
                f"no space left on the device of {path.parent} while writing {path.name}; "
                "free space or write elsewhere (--output, IBOT_BENCH_CACHE); nothing was "
                "half-written"
            ) from None
        raise
    return path


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(exc: BaseException) -> bool:
    """An out-of-space error, raw or wrapped (torch.save raises RuntimeError for it)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, RuntimeError) and "No space left on device" in str(exc)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))
