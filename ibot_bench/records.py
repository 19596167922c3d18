"""Result records: the one schema every task returns (docs/design.md#data-path).

One JSON file per (encoder, task, dataset, protocol), written atomically under
``<output>/records/``. Readers validate each file against the schema (every field's type
and shape, finite metrics within the range each can take, a parseable timestamp) and report
corrupt ones instead of failing: :func:`read_records` returns them as ``(path, reason)``.

Timestamps are ISO-8601 with a UTC offset (written in UTC); a timestamp without an
offset is read as UTC. :func:`parse_timestamp` turns one into an aware UTC datetime, so
records written on machines in different time zones compare by their real instant.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ibot_bench.display_names import derive_name
from ibot_bench.errors import UserError
from ibot_bench.io import atomic_write_text

SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 16 * 2**20  # a record is a few KiB; a bigger file is not one of ours
MAX_RECORD_DEPTH = 32  # nesting of a record's JSON values (configs and details nest ~4 deep)


class RecordError(ValueError):
    """A record file that does not follow the schema; the message says which field and why."""


@dataclass
class ResultRecord:
    """Metrics of one evaluation plus everything that changes the numbers."""

    task: str
    protocol: str
    # {"spec", "fingerprint", "arch", "name"}; name: display name; a partial load
    # (--allow-partial) adds "partial": true and "partial_keys"
    encoder: dict[str, Any]
    dataset: dict[str, Any]  # {"spec", "fingerprint", "split"}
    metrics: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. chosen head; not hashed
    seed: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    device: str = ""
    wall_time_s: float = 0.0
    timestamp: str = ""
    schema_version: int = SCHEMA_VERSION
    profile: str = ""  # a suite profile (e.g. "tiny") that shrank the protocol; "" = as specified

    def __post_init__(self) -> None:
        if not self.versions:
            self.versions = software_versions()
        if not self.timestamp:
            self.timestamp = now_timestamp()
        for name, value in self.metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
            if not _finite_number(value):
                raise UserError(
                    f"metric {name!r} is {_short(value)} (not a finite number); "
                    "no record is written for this evaluation"
                )
            self.metrics[name] = float(value)

    @property
    def protocol_hash(self) -> str:
        """Short hash of the resolved config: two records compare only if it matches."""
        return config_hash(self.config)

    def key(self) -> str:
        """File stem unique per (encoder, task, dataset, protocol config)."""
        enc = self.encoder.get("fingerprint", "noenc")[:12]
        data = self.dataset.get("fingerprint", "nodata")[:12]
        return f"{self.task}__{self.protocol}__{enc}__{data}__{self.protocol_hash}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=_jsonable)

    def write(self, output_dir: str | Path) -> Path:
        """Write atomically to ``output_dir/records/<key>.json``; returns the path."""
        path = Path(output_dir) / "records" / f"{self.key()}.json"
        atomic_write_text(path, self.to_json())
        return path

    @property
    def display_name(self) -> str:
        """The encoder's short name for leaderboards; records written before names existed
        (or with a blank one) get one derived from the spec
        (:func:`ibot_bench.display_names.derive_name`)."""
        name = self.encoder.get("name", "")
        return name if name.strip() else derive_name(self.encoder.get("spec", ""))

    @property
    def instant(self) -> datetime:
        """When the record was written, as an aware UTC datetime (see :func:`parse_timestamp`)."""
        return parse_timestamp(self.timestamp)

    @classmethod
    def from_dict(cls, data: Any) -> ResultRecord:
        """A record from its parsed JSON; :class:`RecordError` if it does not follow the schema.

        Unknown top-level keys are ignored (records of a newer minor revision still read).
        """
        validate_record(data)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def now_timestamp() -> str:
    """The current instant as ISO-8601 in UTC with its offset: ``2024-05-01T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_timestamp(text: str) -> datetime:
    """An ISO-8601 timestamp -> aware UTC datetime; one without an offset is taken as UTC.

    Accepts what records have held: ``2024-05-01T12:00:00+00:00`` (written now),
    ``2024-05-01T21:00:00+0900`` (``strftime("%z")``, older records), ``...Z`` and naive
    ``2024-05-01T12:00:00``. Raises :class:`ValueError` for anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"timestamp must be an ISO-8601 string, got {_kind(text)}")
    try:
        moment = datetime.fromisoformat(text.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"timestamp {_short(text)} is not an ISO-8601 date and time") from exc


# --- schema validation -------------------------------------------------------------------
# field -> (check, required). Checks raise RecordError naming the field and what was found.


def _kind(value: Any) -> str:
    """A value's JSON kind for messages: 'a string', 'a list', 'true'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "an object",
    }
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)  # repr: control characters and quotes stay visible in the message
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite as a float (ints beyond float range are not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _need(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        found = _kind(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            found += f" {_short(value)}"
        raise RecordError(f"{where} must be {expected}, got {found}")


def _check_str(where: str, value: Any, nonempty: bool = False) -> None:
    _need(isinstance(value, str) and (bool(value) or not nonempty), where,
          "a non-empty string" if nonempty else "a string", value)  # fmt: skip


def _check_int(where: str, value: Any) -> None:
    _need(isinstance(value, int) and not isinstance(value, bool), where, "an integer", value)


def _check_number(where: str, value: Any) -> None:
    _need(_finite_number(value), where, "a finite number", value)


def _check_object(
    where: str, value: Any, fields: dict[str, tuple[Any, bool]] | None = None
) -> None:
    """``value`` is a JSON object; its keys listed in ``fields`` pass their check (required
    ones must be present); other keys may hold any JSON value."""
    _need(isinstance(value, dict), where, "an object", value)
    fields = fields or {}
    missing = [k for k, (_, required) in fields.items() if required and k not in value]
    if missing:
        raise RecordError(f"{where} lacks {', '.join(map(repr, missing))}")
    for key, (check, _) in fields.items():
        if key in value:
            check(f"{where}[{key!r}]", value[key])


# Metrics the tasks record in percent: accuracies (top-1/5 in every task, Hungarian acc,
# mAcc, aAcc), NMI, FMI and mIoU lie in [0, 100]; ARI and AMI (chance-adjusted) and COCO AP
# (-100 where COCO has no ground truth) may be negative. Others (best_k, best_epoch) are counts.
_PERCENT = re.compile(r"(?:^|_)(?:top[15]|acc|macc|aacc|nmi|fmi|miou)(?:_|$)")
_AT_MOST_100 = re.compile(r"(?:^|_)(?:ari|ami|ap(?:50|75)?)$")


ROUNDING = 1e-6  # slack on those bounds, in percent points


def _metric_bounds(name: str) -> tuple[float, float] | None:
    """The range a recorded metric can lie in (None: unbounded); ``<m>_std`` and
    ``<m>_seed<i>`` follow ``<m>`` (a spread of values in [0, 100] is within it too)."""
    base, is_std = re.subn(r"_std$", "", name)
    base = re.sub(r"_seed\d+$", "", base)
    if _PERCENT.search(base):
        return 0.0, 100.0
    if is_std:
        return 0.0, math.inf
    if _AT_MOST_100.search(base):
        return -math.inf, 100.0
    return None


def _check_metrics(where: str, value: Any) -> None:
    _check_object(where, value)
    for name, number in value.items():
        _check_number(f"{where}[{_short(name)}]", number)
        bounds = _metric_bounds(name)
        # a float scores within rounding of its bound is valid (sklearn's NMI of a perfect
        # clustering can be 1 + 2e-16): rejecting it would rerun a finished evaluation forever
        if bounds is not None and not bounds[0] - ROUNDING <= number <= bounds[1] + ROUNDING:
            low, high = (f"{b:g}" for b in bounds)
            raise RecordError(
                f"{where}[{_short(name)}] is {_short(number)}, outside [{low}, {high}], "
                "the range this metric can take"
            )


def _check_config(where: str, value: Any) -> None:
    _check_object(where, value, {"features": (_check_object, False)})


def _check_versions(where: str, value: Any) -> None:
    _check_object(where, value)
    for name, version in value.items():
        _check_str(f"{where}[{_short(name)}]", version)


def _check_timestamp(where: str, value: Any) -> None:
    _check_str(where, value, nonempty=True)
    try:
        parse_timestamp(value)
    except ValueError as exc:
        raise RecordError(f"{where}: {exc}") from None


def _check_schema_version(where: str, value: Any) -> None:
    _check_int(where, value)
    if not 1 <= value <= SCHEMA_VERSION:
        raise RecordError(
            f"{where} is {value}; this ibot-bench reads schema 1 to {SCHEMA_VERSION} "
            "(a newer ibot-bench wrote it?)"
        )


def _text(where: str, value: Any) -> None:
    _check_str(where, value)


def _nonempty(where: str, value: Any) -> None:
    _check_str(where, value, nonempty=True)


_ENCODER = {
    "spec": (_nonempty, True),
    "fingerprint": (_text, False),
    "arch": (_text, False),
    "name": (_nonempty, False),
    "partial": (lambda w, v: _need(isinstance(v, bool), w, "true or false", v), False),
    "partial_keys": (_check_object, False),  # missing / unexpected / mismatched lists
}
_DATASET = {
    "spec": (_nonempty, True),
    "fingerprint": (_text, False),
    "test_fingerprint": (_text, False),
    "group": (_text, False),
    "split": (_text, False),
    "num_train": (_check_int, False),
    "num_test": (_check_int, False),
}
RECORD_FIELDS: dict[str, tuple[Any, bool]] = {
    "task": (lambda w, v: _check_str(w, v, nonempty=True), True),
    "protocol": (lambda w, v: _check_str(w, v, nonempty=True), True),
    "encoder": (lambda w, v: _check_object(w, v, _ENCODER), True),
    "dataset": (lambda w, v: _check_object(w, v, _DATASET), True),
    "metrics": (_check_metrics, True),
    "config": (_check_config, False),
    "details": (_check_object, False),
    "seed": (_check_int, False),
    "versions": (_check_versions, False),
    "device": (_text, False),
    "wall_time_s": (_check_number, False),
    "timestamp": (_check_timestamp, True),
    "schema_version": (_check_schema_version, False),
    "profile": (_text, False),
}


def _check_depth(data: Any) -> None:
    """No JSON value nested deeper than :data:`MAX_RECORD_DEPTH` (walked without recursion)."""
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_RECORD_DEPTH:
                raise RecordError(f"values nested more than {MAX_RECORD_DEPTH} levels deep")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)


def validate_record(data: Any) -> None:
    """Raise :class:`RecordError` unless ``data`` (parsed JSON) follows the record schema."""
    _need(isinstance(data, dict), "a record", "a JSON object", data)
    _check_depth(data)
    missing = [k for k, (_, required) in RECORD_FIELDS.items() if required and k not in data]
    if missing:
        raise RecordError(f"missing fields {missing}")
    for key, (check, _) in RECORD_FIELDS.items():
        if key in data:
            check(key, data[key])


# Settings that change speed or memory but not the numbers: left out of the protocol hash.
# A task's own ``batch_size`` is not one of them (it is the training batch of the linear
# probes, fine-tuning and the dense tasks): only the feature engine's is.
RUNTIME_KEYS = frozenset({"num_workers", "device", "chunk_size", "progress", "eval_batch_size"})
RUNTIME_PATHS = frozenset({"features.batch_size"})


def _without_runtime(value: Any, path: str = "") -> Any:
    if isinstance(value, dict):
        return {
            k: _without_runtime(v, f"{path}{k}.")
            for k, v in value.items()
            if k not in RUNTIME_KEYS and f"{path}{k}" not in RUNTIME_PATHS
        }
    return value


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and paths in records -> plain JSON values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def config_hash(config: dict[str, Any]) -> str:
    """Short hash of a resolved config, ignoring runtime-only keys (:data:`RUNTIME_KEYS`,
    :data:`RUNTIME_PATHS`)."""
    text = json.dumps(_without_runtime(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def read_record(path: str | Path) -> ResultRecord:
    """One record file; :class:`RecordError` (or :class:`OSError`) says why it is unusable."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_RECORD_BYTES:
        raise RecordError(f"{size} bytes, more than a record may have ({MAX_RECORD_BYTES})")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # tolerate an editor's byte-order mark
    except UnicodeDecodeError as exc:
        raise RecordError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"not valid JSON ({exc})") from None
    except (RecursionError, ValueError) as exc:  # absurd nesting; integers of > 4300 digits
        reason = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
        raise RecordError(f"not usable JSON ({reason})") from None
    try:
        return ResultRecord.from_dict(data)
    except UserError as exc:  # refused by ResultRecord itself: a corrupt file all the same
        raise RecordError(str(exc)) from None


def read_records(output_dir: str | Path) -> tuple[list[ResultRecord], list[tuple[Path, str]]]:
    """Read every record under ``output_dir/records``; returns (records, [(path, reason)]).

    A file that is not a valid record (not UTF-8, not JSON, not an object, a field of the
    wrong type or shape, a non-finite metric, ...) is skipped and reported with the reason.
    """
    records, errors = [], []
    for path in sorted((Path(output_dir) / "records").glob("*.json")):
        try:
            records.append(read_record(path))
        except RecordError as exc:
            errors.append((path, str(exc)))
        except (ValueError, TypeError, OSError) as exc:
            errors.append((path, f"{type(exc).__name__}: {exc}"))
    return records, errors


def software_versions() -> dict[str, str]:
    import numpy
    import torch

    import ibot_bench

    versions = {
        "ibot_bench": ibot_bench.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return versions


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std
