"""Result records: the one schema every task returns (docs/design.md#data-path).

One JSON file per (encoder, task, dataset, protocol), written atomically under
``<output>/records/``. Readers validate each file and report corrupt ones instead
of failing.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ibot_bench.io import atomic_write_text

SCHEMA_VERSION = 1


@dataclass
class ResultRecord:
    """Metrics of one evaluation plus everything that changes the numbers."""

    task: str
    protocol: str
    encoder: dict[str, Any]  # {"spec", "fingerprint", "arch"}
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
            self.timestamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for name, value in self.metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResultRecord:
        required = ("task", "protocol", "encoder", "dataset", "metrics")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing fields {missing}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# Settings that change speed or memory but not the numbers: left out of the protocol hash.
RUNTIME_KEYS = frozenset({"batch_size", "num_workers", "device", "chunk_size", "progress"})


def _without_runtime(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_runtime(v) for k, v in value.items() if k not in RUNTIME_KEYS}
    return value


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and paths in records -> plain JSON values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def config_hash(config: dict[str, Any]) -> str:
    """Short hash of a resolved config, ignoring runtime-only keys (:data:`RUNTIME_KEYS`)."""
    text = json.dumps(_without_runtime(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def read_records(output_dir: str | Path) -> tuple[list[ResultRecord], list[tuple[Path, str]]]:
    """Read every record under ``output_dir/records``; returns (records, [(path, error)])."""
    records, errors = [], []
    for path in sorted((Path(output_dir) / "records").glob("*.json")):
        try:
            records.append(ResultRecord.from_dict(json.loads(path.read_text())))
        except (ValueError, TypeError, OSError) as exc:  # JSONDecodeError is a ValueError
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
