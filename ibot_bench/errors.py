"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad input, config, path). The message names the fix."""


class ConfigError(UserError):
    """Unknown key, wrong type or missing value in a config."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, unsafe or does not match the model."""


class DatasetError(UserError):
    """A dataset root that is missing or empty, or an unreadable image."""


class NotApplicableError(UserError):
    """The protocol does not apply to this encoder (e.g. no projection head): reported, not run."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library error's first message line (without OmegaConf's / torch's detail lines)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
