"""Where and how work runs, one rule each for every entry point: device, the precisions a
device supports, autocast, torch threads and data-loader worker processes.

Feature extraction, the probes, fine-tuning and pretraining all call these, so a machine
gets the same choices whatever command runs on it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator

import torch

from ibot_bench.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the current CUDA device if there is one, else the CPU; ``cuda`` gets an index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.cache
def _cpu_bf16_works() -> bool:
    """A bf16 matmul runs on this CPU (natively or emulated); a build without it raises."""
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        return bool(torch.isfinite((a @ a).float()).all())
    except (RuntimeError, TypeError):
        return False


def available_precisions(device: torch.device) -> tuple[str, ...]:
    """The precisions ``device`` can run, most exact first: fp32 everywhere, bf16 where its
    matmuls run, fp16 on CUDA only (CPU fp16 autocast is not supported by this project)."""
    if device.type == "cuda":
        return ("fp32", "bf16", "fp16") if torch.cuda.is_bf16_supported() else ("fp32", "fp16")
    if device.type == "cpu" and _cpu_bf16_works():
        return ("fp32", "bf16")
    return ("fp32",)


def check_precision(device: torch.device, precision: str) -> str:
    """``precision`` if it is ``auto`` or runs on ``device``; else a UserError naming what does.

    ``auto`` is decided by measurement (:func:`ibot_bench.precision.choose_precision`).
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} unknown; use {', '.join(PRECISIONS)}")
    available = available_precisions(device)
    if precision != "auto" and precision not in available:
        where = "this CPU"
        if device.type == "cuda":
            where = f"{device} ({torch.cuda.get_device_name(device)})"
        raise UserError(
            f"precision {precision} is not available on {where}; "
            f"available here: auto, {', '.join(available)}"
        )
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast to ``precision`` (bf16 / fp16) on ``device``; a no-op for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@contextlib.contextmanager
def threads_restored() -> Iterator[None]:
    """Restore torch's intra-op thread count on exit, whatever the body set it to."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def set_threads(threads: int, log: Callable[[str], None] | None = None) -> int:
    """Torch intra-op threads: ``threads`` if > 0, torch's default (one per core) for 0, and
    for -1 the count that runs fastest right now (:func:`fastest_threads`). Returns the count."""
    if threads < -1:
        raise UserError(
            f"threads must be >= 0 (0: torch's default) or -1 (automatic), got {threads}"
        )
    if threads == -1:
        threads, speeds = fastest_threads(available_cpus())
        if log and len(speeds) > 1:
            timed = ", ".join(f"{n}: {s:.2f}x" for n, s in speeds.items())
            log(f"threads auto -> {threads} (a timed matmul, speed vs 1 thread: {timed})")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def fastest_threads(cpus: int, min_gain: float = 0.3) -> tuple[int, dict[int, float]]:
    """How many torch threads to use on ``cpus`` CPUs, by timing a matmul with each count.

    Candidates are 1, 2, 4, ... and ``cpus``. A step up is taken when it delivers at least
    ``min_gain`` of its ideal gain (1 -> 2 threads: >= 1.3x). On an idle 2-core CPU two
    threads win (the quick pretraining step: 1.6x); when another job holds one of the cores,
    the second thread waits at every barrier for a core it rarely gets (the same step: 1.6x
    *slower*), and the timed matmul shows no gain. Decided once, when the caller starts: a
    load that starts later is not seen. Returns the count and each count's speed vs 1.
    """
    counts = sorted({min(2**i, cpus) for i in range(cpus.bit_length() + 1)})
    if len(counts) == 1:
        return 1, {1: 1.0}
    x, w = torch.randn(2048, 128), torch.randn(128, 512)
    best = {n: math.inf for n in counts}
    with threads_restored():
        for _ in range(4):  # interleaved rounds, the best of each: load comes and goes
            for n in counts:
                torch.set_num_threads(n)
                for _ in range(2):  # wake the pool's threads
                    x @ w
                start = time.perf_counter()
                for _ in range(8):
                    x @ w
                best[n] = min(best[n], time.perf_counter() - start)
    speeds = {n: best[1] / best[n] for n in counts}
    return pick_threads(speeds, min_gain), speeds


def pick_threads(speeds: dict[int, float], min_gain: float = 0.3) -> int:
    """The thread count to use, given each count's measured speed: from 1 up, a step to more
    threads is taken when it gives at least ``min_gain`` of its ideal gain."""
    chosen = 1
    for n in sorted(speeds):
        if n > chosen and speeds[n] / speeds[chosen] >= 1 + min_gain * (n / chosen - 1):
            chosen = n
    return chosen


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def loader_workers(requested: int, device: torch.device, processes: int = 1) -> int:
    """Data-loader worker processes: ``requested`` if >= 0, else chosen for the machine.

    The CPUs are shared by ``processes`` ranks on the node. With a GPU, up to 8 workers keep
    it fed. On a CPU-only machine with <= 4 CPUs per process, decoding in the main process
    wins: measured on 2 cores (ViT-S/16 @224, 256-px JPEGs, fp32) 0 workers gave 8.9 img/s,
    1 worker 8.4 and 2 workers 8.5 -- a worker only steals cycles from the model's threads.
    """
    if requested >= 0:
        return requested
    cpus = max(1, available_cpus() // max(1, processes))
    if device.type == "cuda":
        return min(8, cpus)
    return 0 if cpus <= 4 else min(4, cpus // 4)
