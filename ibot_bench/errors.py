"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""

import re


class UserError(Exception):
    """A problem the user can fix (bad input, config, path). The message names the fix."""


class ConfigError(UserError):
    """Unknown key, wrong type or missing value in a config."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, unsafe or does not match the model."""


class DatasetError(UserError):
    """A dataset root that is missing or empty, or an unreadable image."""


class UnreadableImageError(DatasetError):
    """One image file that cannot be decoded (``path``, and PIL's ``reason``)."""

    def __init__(self, message: str, path: object = None, reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


class NotApplicableError(UserError):
    """The protocol does not apply to this encoder (e.g. no projection head): reported, not run."""


_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*Original Traceback")


def user_message(exc: BaseException) -> str:
    """The message of a :class:`UserError` for the console. One raised in a DataLoader worker
    reaches the main process wrapped in the worker's traceback: only its own last line is
    kept (without the ``module.ClassName:`` prefix)."""
    text = str(exc).strip()
    if not _WORKER.match(text):
        return text
    last = text.splitlines()[-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library error's first message line (without OmegaConf's / torch's detail lines),
    cut to ``limit`` characters at a sentence end where it has one.

    For torch's safe loader it is the unpickler's own reason: the preamble suggesting
    ``weights_only=False`` (running the file's pickled code) is advice ibot-bench never takes.
    """
    text = str(exc).strip()
    if text.startswith("Weights only load failed") and (
        reason := re.search(
            r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the doc|$)", text, re.S
        )
    ):
        text = "torch's safe loader refused it: " + " ".join(reason.group(1).split())
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    end = line.rfind(". ", 0, limit)  # whole sentences where there are some, else cut visibly
    return line[: end + 1] if end > 0 else line[: limit - 3].rstrip() + "..."
