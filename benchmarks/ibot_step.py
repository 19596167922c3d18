"""Shared tools of the iBOT-step benchmarks (benchmarks/pretrain.py, benchmarks/reference_step.py).

One place for what makes a pretraining number honest: the cases (model + crops), a real
batch from the project's own data path (multi-crop augmentation, block masks) at an epoch
where every parameter trains (past last-layer freezing and the masking start), the matmul
peak of the *same* precision measured in the same run, FLOPs counted by
``torch.utils.flop_counter``, and a per-phase breakdown from the profiler labels of
:meth:`ibot_bench.pretrain.train.Trainer._step`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ibot_bench.config import load_config
from ibot_bench.precision import cpu_bf16_support
from ibot_bench.pretrain.config import PretrainConfig, crop_sizes
from ibot_bench.pretrain.monitor import ClusterMonitor
from ibot_bench.pretrain.train import PHASES, Trainer

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EMULATED_BF16 = "bf16 is emulated on this CPU (no avx512_bf16 or AMX); runs use fp32 here"


def skips_bf16(small: bool) -> bool:
    """A ``--small`` run leaves bf16 out where the CPU emulates it: a step takes minutes
    there, and precision=auto runs fp32 anyway."""
    return small and cpu_bf16_support() == "emulated"


CASES = {
    "vit_small": (
        ROOT / "configs/pretrain/vit_small_in1k.yaml",
        ["optim.batch_size=8", "crops.local_number=10"],
    ),
    "quick": (ROOT / "configs/pretrain/quick.yaml", []),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, sizes=(2048, 4096)) -> float:
    """FLOP/s of the best n^3 matmul over ``sizes`` (each best of 3), in ``dtype``; a GPU
    also tries 8192^3, the size its peak needs."""
    if device.type == "cuda":
        sizes = (*sizes, 8192)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up (packing, thread pool)
        for _ in range(3):
            sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def make_trainer(case: str, precision: str, out: Path, device: str = "cpu", extra=()) -> Trainer:
    """A :class:`Trainer` for ``case`` on the synthetic shapes (the data only feeds crops)."""
    path, overrides = CASES[case]
    cfg = load_config(
        PretrainConfig,
        path,
        [
            *overrides,
            *extra,
            f"precision={precision}",
            f"output_dir={out}",
            "progress=false",
            "data=synthetic:shapes",
            "save_init=false",
            f"device={device}",
            "num_workers=0",
            "threads=0",
        ],
    )
    return Trainer(cfg)


def training_epoch(trainer: Trainer) -> int:
    """The first epoch where every parameter trains and masking is on."""
    o, m = trainer.cfg.optim, trainer.cfg.mask
    return min(max(o.freeze_last_layer, m.pred_start_epoch, 1), o.epochs - 1)


def real_batch(trainer: Trainer, epoch: int) -> tuple:
    """One batch from the project's data path: uint8 multi-crops and block masks."""
    trainer.dataset.epoch = epoch
    return trainer.loader.collate_fn([trainer.dataset[i] for i in range(trainer.batch)])


def augmented(trainer: Trainer, batch: tuple) -> tuple:
    """``batch`` with its views already made, and ``trainer`` set to take such batches.

    With ``augment=batched`` on a GPU the loader yields uint8 images and the step makes the
    crops on the device; a comparison with the reference, whose crops come from its loader,
    gives both the same finished crops instead."""
    if trainer.device_augment is None:
        return batch
    images, masks, labels = batch
    views = trainer.device_augment(images.to(trainer.device))
    trainer.device_augment = None
    return views, masks, labels


def data_seconds(trainer: Trainer, epoch: int) -> float:
    """Seconds to augment one batch in this process (what one loader worker must keep up with)."""
    trainer.dataset.epoch = epoch
    t = time.perf_counter()
    real_batch(trainer, epoch)
    return time.perf_counter() - t


def case_label(trainer: Trainer) -> str:
    g, loc = crop_sizes(trainer.cfg)
    crops = f"{len(g)}x{g[0]}" + (f" + {len(loc)}x{loc[0]}" if loc else "")
    return f"{trainer.vit.name}, {crops}, batch {trainer.batch}"


def stepper(trainer: Trainer, batch: tuple, epoch: int) -> Callable[[], Any]:
    """A zero-argument full training step of ``trainer`` at ``epoch`` (same batch each time)."""
    it = epoch * trainer.iters_per_epoch
    monitor = ClusterMonitor()
    return lambda: trainer._step(batch, it, epoch, monitor)


def count_flops(step: Callable[[], Any]) -> float:
    """Model FLOPs of one call (matmuls, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def timed(step: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t


def median_seconds(step: Callable[[], Any], device: torch.device, n: int) -> float:
    return statistics.median(timed(step, device) for _ in range(n))


def phase_seconds(step: Callable[[], Any], steps: int = 1) -> dict[str, float]:
    """Mean seconds per step of each labelled phase of the training step (profiler ranges)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in PHASES}
    return {name: totals.get(name, 0.0) / 1e6 / steps for name in PHASES}


def check_mfu(mfu: float, what: str) -> None:
    """An MFU above 100% means the peak or the FLOP count is wrong: fail loudly."""
    if mfu > 1.0:
        raise SystemExit(
            f"error: {what} MFU {100 * mfu:.0f}% > 100%: the peak or the FLOP count is wrong; "
            "no result printed for it"
        )
