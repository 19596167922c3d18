"""Checks that the OpenMMLab stack is usable, with the exact command that fixes it."""

from __future__ import annotations

import importlib
import os

import numpy as np
import torch

from ibot_bench.dense_setup import INSTALL_COMMAND, mmcv_ops_status
from ibot_bench.errors import ConfigError, UserError

_PACKAGES = {"detection": "mmdet", "segmentation": "mmseg"}


def require_mm(task: str) -> None:
    """Raise a :class:`UserError` naming the install command unless ``task``'s stack works."""
    problem = mmcv_ops_status()
    if problem is None:
        try:
            importlib.import_module(_PACKAGES[task])
        except ImportError as exc:
            problem = f"{_PACKAGES[task]} cannot be imported ({exc})"
    if problem:
        raise UserError(
            f"{task} needs mmcv 2.1.0 with compiled ops, mmdet and mmsegmentation: {problem}. "
            f"Install them with: pip install -e '.[dense]' && {INSTALL_COMMAND}"
        )


def _history_buffer_state(self) -> dict:
    """``HistoryBuffer`` state without its statistics functions (class defaults on load)."""
    return {k: v for k, v in self.__dict__.items() if k != "statistics_methods"}


def mmengine_checkpoint_globals() -> list:
    """What ``torch.load(weights_only=True)`` must accept to resume our dense runs.

    mmengine 0.10.7 calls ``torch.load`` without ``weights_only``, which since torch 2.6
    means ``weights_only=True``: its resume checkpoints then fail on the message hub's
    ``HistoryBuffer`` objects and numpy arrays. Rather than turning the safe loader off we
    allow exactly those data types (use the list with ``torch.serialization.safe_globals``)
    and stop ``HistoryBuffer`` from pickling its statistics *functions*
    (``getattr(HistoryBuffer, "min")`` would need ``getattr`` allowed, i.e. arbitrary code);
    they are class-level defaults that ``__init__`` restores. Checkpoints from other sources
    still load only if they hold plain data.
    """
    import codecs

    from mmengine.logging.history_buffer import HistoryBuffer

    HistoryBuffer.__getstate__ = _history_buffer_state
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [HistoryBuffer, _reconstruct, scalar, np.ndarray, np.dtype, codecs.encode, *dtypes]


def resolve_mm_device(device: str) -> str:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is a config error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} but torch sees no CUDA GPU here; use device=cpu (or auto)."
        )
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu" and torch.cuda.is_available():
        raise ConfigError(
            "device=cpu: mmengine puts the model on the GPU whenever one is visible; run with "
            "CUDA_VISIBLE_DEVICES= (empty) to train a dense task on the CPU."
        )
    return device


def resolve_mm_precision(precision: str, device: str) -> str:
    """fp32 on CPU; mixed precision (mmengine's AmpOptimWrapper) only exists on CUDA."""
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if precision != "fp32" and device != "cuda":
        raise ConfigError(
            f"precision={precision} is CUDA-only for dense tasks (mmengine's AmpOptimWrapper "
            "needs a GPU); use precision=fp32 (or auto) on CPU."
        )
    return precision


def resolve_norm(norm: str, device: str) -> str:
    """``auto``: SyncBN when several CUDA processes train, else BN. SyncBN needs CUDA."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if norm == "auto":
        return "SyncBN" if distributed and device == "cuda" else "BN"
    if norm not in ("BN", "SyncBN"):
        raise ConfigError(f"norm must be auto, BN or SyncBN, got {norm!r}")
    if norm == "SyncBN" and device != "cuda":
        raise ConfigError("norm=SyncBN is CUDA-only; use norm=BN (or auto) on CPU.")
    return norm
