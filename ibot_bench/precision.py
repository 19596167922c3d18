"""``precision=auto`` by measurement: time a few steps of the actual model in every precision
the device runs, keep the fastest, and cache the decision per machine and model shape.

No flag list predicts it: bf16 is 1.7-1.9x faster than fp32 for ViT-S on an AVX512-BF16 CPU
without AMX, 0.69x for a ViT-T/8 at 64 px on the same CPU, and 6-10x slower on AVX2-only
CPUs. The cache (``$IBOT_BENCH_CACHE/precision/<key>.json``) holds one decision per key, so
only the first run of a model shape on a machine pays for the timing (a few seconds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ibot_bench.distributed import broadcast_object, world
from ibot_bench.errors import UserError
from ibot_bench.io import atomic_write_text
from ibot_bench.runtime import PRECISIONS, autocast, available_precisions, check_precision

SCHEMA = "ibot-bench/precision-v1"
# a less exact precision must beat the more exact one by this factor to replace it: its
# rounding costs accuracy in small models (docs/protocols.md#feature-precision), and a near
# tie flips with the machine's load (the quick fine-tuning measured bf16 at 1.02x, 1.07x and
# 1.13x fp32 in three runs on one machine, each choice giving other numbers), so fp32 stays
# unless bf16 clearly pays, and bf16 (no overflow, no scaler) over fp16
MARGIN = 1.2
# no precision is this many times faster than another on any hardware we know (bf16 on AMX
# vs fp32 peaks: ~16x); a larger measured ratio is a busy machine (oversubscribed threads
# stall one precision's samples), and a decision from it must not be cached
PLAUSIBLE_RATIO = 20.0
# on a CPU a probe step of about this much work fills the cores and stays short (~0.5 s of
# fp32 on 2 cores): ViT-S/16 @224 inference 5 images, the quick.yaml pretraining step 35
CPU_PROBE_FLOP = 50e9


def probe_batch(device: torch.device, batch: int, run: Callable[[int], None]) -> int:
    """How many items to time ``run(n)`` (one step on ``n`` items) with: the real batch on a
    GPU (its speed depends on being filled); on a CPU as many as :data:`CPU_PROBE_FLOP`
    allows, counted on two items (a few items already fill a CPU's cores; one item would
    break BatchNorm in training mode on a 1x1 feature map)."""
    if device.type == "cuda" or batch <= 2:
        return max(1, batch)
    with FlopCounterMode(display=False) as counter:
        run(2)
    per_item = max(1, counter.get_total_flops() // 2)
    return max(2, min(batch, int(CPU_PROBE_FLOP // per_item)))


def probe_step(
    device: torch.device, batch: int, run: Callable[[int], None]
) -> Callable[[str], None]:
    """A step for :func:`choose_precision`: ``run`` on :func:`probe_batch` items (sized
    at the first call, so a cached decision costs nothing)."""
    size: list[int] = []

    def step(_precision: str) -> None:
        if not size:
            size.append(probe_batch(device, batch, run))
        run(size[0])

    return step


@contextlib.contextmanager
def scratch(*modules: torch.nn.Module) -> Iterator[None]:
    """Training steps that leave no trace: modes, buffers (BatchNorm statistics) and
    gradients of ``modules`` are restored afterwards; the modules are in train mode inside."""
    saved = [
        (
            m,
            m.training,
            {n: b.clone() for n, b in m.named_buffers()},
            [(p, p.grad) for p in m.parameters()],
        )
        for m in modules
    ]
    try:
        for m in modules:
            m.train()
        yield
    finally:
        with torch.no_grad():
            for m, training, buffers, grads in saved:
                m.train(training)
                for n, b in m.named_buffers():
                    b.copy_(buffers[n])
                for p, g in grads:
                    p.grad = g


def cpu_info() -> tuple[str, set[str]]:
    """This CPU's model name and feature flags from /proc/cpuinfo ("", {} where there is none)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def hardware_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (else the platform's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_info()[0] or platform.processor() or platform.machine()


def cpu_bf16_support() -> str:
    """How this CPU runs bf16 matmuls: ``amx``, ``avx512_bf16`` (native dot products) or
    ``emulated`` (converted to fp32, typically several times slower than fp32)."""
    flags = cpu_info()[1]
    if "amx_bf16" in flags or torch.backends.cpu.get_cpu_capability() == "AVX512_AMX":
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else "emulated"


def machine_key(device: torch.device) -> dict:
    """What a timing depends on besides the model: hardware, torch build, device, threads."""
    return {
        "device": device.type,
        "hardware": hardware_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def decide(seconds: Mapping[str, float]) -> str:
    """The fastest precision, where each less exact one must win by :data:`MARGIN`."""
    order = [p for p in ("fp32", "bf16", "fp16") if p in seconds]
    best = order[0]
    for p in order[1:]:
        if seconds[p] * MARGIN < seconds[best]:
            best = p
    return best


def _timed(step: Callable[[str], None], precision: str, device: torch.device, reps: int) -> float:
    """Seconds per step of ``reps`` steps in ``precision`` (GPU work included)."""
    start = time.perf_counter()
    for _ in range(reps):
        with autocast(device, precision):
            step(precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / reps


def measure(
    step: Callable[[str], None],
    candidates: tuple[str, ...],
    device: torch.device,
    rounds: int = 3,
    budget_s: float = 10.0,
) -> dict[str, float]:
    """Seconds per ``step`` for each candidate: the fastest of its samples, since other work
    on the machine only ever adds time (on a shared 2-core CPU, medians of 3 swung 0.9-2x).

    One warm-up step each, then rounds alternating the order (so a load change hits both
    alike); it stops early once a candidate is 2x slower than another, or after the round
    that passes ``budget_s`` (warm-up included).
    Steps this short that timer noise matters (a GPU) are repeated to ~50 ms per sample.
    The global RNG streams are restored afterwards, so timing never changes a seeded run.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        warm = {p: _timed(step, p, device, 1) for p in candidates}
        reps = {p: max(1, min(20, math.ceil(0.05 / max(t, 1e-6)))) for p, t in warm.items()}
        samples: dict[str, list[float]] = {p: [] for p in candidates}
        for r in range(rounds):
            for p in candidates if r % 2 == 0 else candidates[::-1]:
                samples[p].append(_timed(step, p, device, reps[p]))
            best = [min(v) for v in samples.values()]
            if max(best) > 2 * min(best) or time.perf_counter() - start > budget_s:
                break
    return {p: min(v) for p, v in samples.items()}


def _plausible(seconds: Mapping[str, float]) -> bool:
    """Whether the candidates' timings differ by at most :data:`PLAUSIBLE_RATIO`."""
    return max(seconds.values()) <= PLAUSIBLE_RATIO * min(seconds.values())


def _load(path: Path, key: dict, candidates: tuple[str, ...]) -> dict | None:
    """The cached entry at ``path`` if it is exactly ours and consistent, else None."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("schema") != SCHEMA or entry.get("key") != key:
        return None
    seconds = entry.get("seconds")
    if not isinstance(seconds, dict) or set(seconds) != set(candidates):
        return None
    if not all(type(t) is float and math.isfinite(t) and t > 0 for t in seconds.values()):
        return None
    if not _plausible(seconds):  # written by a version without the check: time again
        return None
    if entry.get("choice") != decide(seconds):
        return None
    return entry


def _describe(choice: str, seconds: Mapping[str, float], hardware: str) -> str:
    """``bf16 1.80x, fp16 1.75x the speed of fp32 on NAME``."""
    speeds = ", ".join(f"{p} {seconds['fp32'] / t:.2f}x" for p, t in seconds.items() if p != "fp32")
    return f"{speeds} the speed of fp32 on {hardware}"


def choose_precision(
    device: torch.device,
    requested: str,
    key: Mapping,
    step: Callable[[str], None],
    *,
    log: Callable[[str], None] = print,
    cache_dir: str | Path | None = None,
    every_rank: bool = True,
    allowed: tuple[str, ...] | None = None,
) -> str:
    """``requested`` if it is a precision; for ``auto`` the fastest one, measured once.

    ``key`` names the work (e.g. ``{"work": "train", "arch": ..., "params": ...,
    "img_size": ..., "batch": ...}``; JSON values); together with :func:`machine_key` it
    names the cache file under ``cache_dir`` (default ``$IBOT_BENCH_CACHE/precision``).
    ``step(precision)`` runs one forward (inference) or forward+backward (training) of the
    actual model on a small batch of the real input shape; it is called inside autocast for
    that precision, only on a cache miss and only on rank 0: it must not use collectives
    (no DDP wrapper) and should leave no state behind (drop gradients). Under torchrun
    every rank gets rank 0's decision, so every rank must call this (a broadcast); code that
    runs on one rank only (a rank-0 task) passes ``every_rank=False`` and decides alone. A
    damaged or foreign cache file is ignored and rewritten atomically. ``allowed`` limits
    the candidates to the precisions the caller implements (e.g. no fp16).
    """
    check_precision(device, requested)
    if requested != "auto":
        return requested
    candidates = tuple(p for p in available_precisions(device) if p in (allowed or PRECISIONS))
    if len(candidates) == 1:
        return candidates[0]
    if not every_rank:
        return _choose_here(device, candidates, dict(key), step, log, cache_dir)
    choice = None
    if world()[0] == 0:
        choice = _choose_here(device, candidates, dict(key), step, log, cache_dir)
    return str(broadcast_object(choice))


def _choose_here(
    device: torch.device,
    candidates: tuple[str, ...],
    key: dict,
    step: Callable[[str], None],
    log: Callable[[str], None],
    cache_dir: str | Path | None,
) -> str:
    from ibot_bench.data import cache_root  # the package's cache folder (deferred: heavy)

    try:
        full = json.loads(json.dumps({"machine": machine_key(device), "work": key}, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"precision key must hold JSON values: {exc}") from None
    name = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir or cache_root() / "precision") / f"{name}.json"
    hardware = full["machine"]["hardware"]
    entry = _load(path, full, candidates)
    if entry is not None:
        choice = entry["choice"]
        log(f"precision auto -> {choice} ({_describe(choice, entry['seconds'], hardware)}; "
            f"cached in {path})")  # fmt: skip
        return choice
    if path.exists():
        log(f"precision: ignoring the damaged or foreign cache file {path}; measuring again")
    seconds = measure(step, candidates, device)
    if not _plausible(seconds):
        seconds = measure(step, candidates, device)
    if not _plausible(seconds):
        log(f"precision: implausible timings ({_describe('fp32', seconds, hardware)}): the "
            "machine is busy; using fp32 this time, not caching it (set precision= to force)")  # fmt: skip
        return "fp32"
    choice = decide(seconds)
    entry = {"schema": SCHEMA, "key": full, "choice": choice, "seconds": seconds}
    try:
        atomic_write_text(path, json.dumps(entry, indent=1, sort_keys=True))
        where = f"cached in {path}"
    except UserError as exc:  # an unwritable cache only costs timing again next time
        where = f"not cached: {exc}"
    log(f"precision auto -> {choice} ({_describe(choice, seconds, hardware)}; measured, {where})")
    return choice
