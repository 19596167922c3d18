"""Pretraining step throughput and MFU, fp32 vs bf16, in one run (issue 3).

    python benchmarks/pretrain.py                       # ViT-S/16 2x224 + 10x96 and quick.yaml
    python benchmarks/pretrain.py --cases quick --steps 5 --precisions fp32

An *image* is all of its crops. Each case times full training steps (teacher forward,
student forward, loss, backward, per-tensor clipping, AdamW, EMA) on fixed random crops,
after one warm-up step. Model FLOPs per step are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; forward and
backward of the work this implementation actually does), and MFU is achieved FLOP/s over
the bf16 matmul peak measured in the same run (a 4096^3 matmul; ``--peak-size`` to change).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# this file is benchmarks/pretrain.py: keep its folder from shadowing the `pretrain` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from ibot_bench.config import load_config  # noqa: E402
from ibot_bench.precision import cpu_bf16_support  # noqa: E402
from ibot_bench.pretrain.config import PretrainConfig, crop_sizes  # noqa: E402
from ibot_bench.pretrain.monitor import ClusterMonitor  # noqa: E402
from ibot_bench.pretrain.train import Trainer  # noqa: E402
from ibot_bench.runtime import resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
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


def matmul_peak(dtype: torch.dtype, n: int, device: torch.device, repeats: int = 3) -> float:
    """FLOP/s of an n^3 matmul on ``device`` (best of ``repeats``)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a[:256, :256], b[:256, :256])
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def fake_batch(cfg: PretrainConfig, batch: int, patch: int) -> tuple:
    g_sizes, l_sizes = crop_sizes(cfg)
    views = [torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8) for s in g_sizes + l_sizes]
    masks = []
    for s in g_sizes:
        m = torch.rand(batch, s // patch, s // patch) < 0.15  # ~ the README ratios' mean
        masks.append(m)
    return views, masks, torch.zeros(batch, dtype=torch.long)


def bench(
    name: str,
    precision: str,
    steps: int,
    out: Path,
    batch: int = 0,
    flop_img: float = 0.0,
    device: str = "cpu",
) -> dict:
    path, overrides = CASES[name]
    overrides = [*overrides, f"optim.batch_size={batch}"] if batch else overrides
    cfg = load_config(
        PretrainConfig,
        path,
        [
            *overrides,
            f"precision={precision}",
            f"output_dir={out}",
            "progress=false",
            "data=synthetic:shapes",
            "save_init=false",
            f"device={device}",
        ],
    )
    trainer = Trainer(cfg)
    batch = fake_batch(cfg, trainer.batch, trainer.vit.patch_size)
    monitor = ClusterMonitor()
    trainer._step(batch, 0, 0, monitor)  # warm-up
    if not flop_img:  # the same model work in every precision: count once per case
        with FlopCounterMode(display=False) as counter:
            trainer._step(batch, 0, 0, monitor)
        flop_img = counter.get_total_flops() / trainer.batch
    flops = flop_img * trainer.batch
    sync(trainer.device)
    t = time.perf_counter()
    for _ in range(steps):
        trainer._step(batch, 0, 0, monitor)
    sync(trainer.device)
    dt = (time.perf_counter() - t) / steps
    g, loc = crop_sizes(cfg)
    return {
        "case": f"{name} ({trainer.vit.name}, {len(g)}x{g[0]}"
        + (f" + {len(loc)}x{loc[0]}" if loc else "")
        + f", batch {trainer.batch})",
        "precision": precision,
        "img_s": trainer.batch / dt,
        "gflop_img": flops / trainer.batch / 1e9,
        "tflop_s": flops / dt / 1e12,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case")
    parser.add_argument(
        "--bf16-batch", type=int, default=0, help="smaller batch for slow (emulated) bf16 rows"
    )
    parser.add_argument(
        "--peak-size", type=int, default=0, help="matmul size (default 4096; 1024 if bf16 is slow)"
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--out", default="/tmp/ibot-bench-pretrain-bench")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    # emulated bf16 (AVX2 only) runs a 4096^3 matmul for minutes: measure a 1024^3 one there
    bf16 = "native" if device.type == "cuda" else cpu_bf16_support()
    args.peak_size = args.peak_size or (1024 if bf16 == "emulated" else 4096)
    peak16 = matmul_peak(torch.bfloat16, args.peak_size, device)
    peak32 = matmul_peak(torch.float32, args.peak_size, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{where}, {torch.get_num_threads()} threads, bf16: {bf16}; "
        f"{args.peak_size}^3 matmul peak: bf16 {peak16 / 1e9:.1f} GFLOP/s, "
        f"fp32 {peak32 / 1e9:.1f} GFLOP/s"
    )
    print(
        "| case | precision | img/s | GFLOP/img | GFLOP/s | MFU vs bf16 peak | vs fp32 peak |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name in args.cases:
        flop_img = 0.0
        for precision in args.precisions:
            batch = args.bf16_batch if precision == "bf16" and name == "vit_small" else 0
            out = Path(args.out) / f"{name}_{precision}"
            r = bench(name, precision, args.steps, out, batch, flop_img, str(device))
            flop_img = r["gflop_img"] * 1e9
            print(
                f"| {r['case']} | {precision} | {r['img_s']:.2f} | {r['gflop_img']:.1f} | "
                f"{r['tflop_s'] * 1e3:.1f} | {100 * r['tflop_s'] * 1e12 / peak16:.1f}% | "
                f"{100 * r['tflop_s'] * 1e12 / peak32:.1f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
