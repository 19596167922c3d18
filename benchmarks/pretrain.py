"""Pretraining step time, MFU and per-phase breakdown, fp32 and bf16, in one run.

    python benchmarks/pretrain.py                       # ViT-S/16 2x224 + 10x96 and quick.yaml
    python benchmarks/pretrain.py --cases quick --steps 5 --precisions fp32

An *image* is all of its crops. Each case times full training steps (teacher forward,
student forward, loss, backward, per-tensor clipping, AdamW, EMA) on one real batch of the
project's data path (multi-crop augmentation, block masks), at an epoch where every
parameter trains (past last-layer freezing), after one warm-up step; the median step counts.
Model FLOPs per step are counted with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions, attention; forward and backward of the work this implementation
does) and MFU is achieved FLOP/s over the matmul peak of the *same* precision, measured in
this run (best of 2048^3 and 4096^3). An MFU above 100% fails the run: the peak or the
count would be wrong. The phase table comes from the profiler labels of the step
(``step/head`` is inside the teacher and student phases); "augment" is one batch of the
per-image augmentation in this process, what a loader worker must keep up with.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ibot_step as bs
import torch


def measure(
    case: str,
    precision: str,
    steps: int,
    out: Path,
    device: str = "cpu",
    batch_size: int = 0,
    peak_sizes: tuple[int, ...] = (2048, 4096),
) -> dict:
    """Median step seconds, FLOPs, MFU and phase seconds of one case in one precision
    (``batch_size`` 0: the case's own batch; ``peak_sizes``: the n of the n^3 peak matmuls)."""
    extra = [f"optim.batch_size={batch_size}"] if batch_size else []
    trainer = bs.make_trainer(case, precision, out, device, extra)
    epoch = bs.training_epoch(trainer)
    step = bs.stepper(trainer, bs.real_batch(trainer, epoch), epoch)
    step()  # warm-up
    flops = bs.count_flops(step)
    seconds = bs.median_seconds(step, trainer.device, steps)
    peak = bs.matmul_peak(bs.DTYPES[precision], trainer.device, peak_sizes)
    mfu = flops / seconds / peak
    bs.check_mfu(mfu, f"{case} {precision}")
    return {
        "case": f"{case} ({bs.case_label(trainer)})",
        "precision": precision,
        "seconds": seconds,
        "img_s": trainer.batch / seconds,
        "gflop_img": flops / trainer.batch / 1e9,
        "gflops": flops / seconds / 1e9,
        "peak_gflops": peak / 1e9,
        "mfu": mfu,
        "phases": {
            **bs.phase_seconds(step),
            "augment": bs.data_seconds(trainer, epoch) if trainer.device.type == "cpu" else 0.0,
        },
    }


def rows(small: bool) -> list[dict]:
    """run_all.py rows: MFU of the step in each precision (ratio = time at the peak / time;
    target 35% for ViT-S bf16). ``small`` times quick.yaml only, with a 2048^3 peak, and skips
    bf16 on a CPU that emulates it (minutes per step there, and fp32 is what runs)."""
    cases = [("quick", "bf16"), ("quick", "fp32")] if small else [
        ("vit_small", "bf16"), ("vit_small", "fp32"), ("quick", "bf16"), ("quick", "fp32")
    ]  # fmt: skip
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, precision in cases:
            if precision == "bf16" and bs.skips_bf16(small):
                out.append({"name": f"iBOT step MFU, {case}, bf16", "skip": bs.EMULATED_BF16})
                continue
            r = measure(
                case, precision, 2 if small else 4, Path(tmp) / f"{case}_{precision}",
                peak_sizes=(2048,) if small else (2048, 4096),
            )  # fmt: skip
            out.append(
                {
                    "name": f"iBOT step MFU, {r['case']}, {precision}",
                    "ours_s": r["seconds"],
                    "baseline_s": r["seconds"] * r["mfu"],
                    "ratio": r["mfu"],
                    "target": 0.35 if (case, precision) == ("vit_small", "bf16") else None,
                    "note": f"MFU: baseline = the step's FLOPs at the {r['peak_gflops']:.0f} "
                    f"GFLOP/s {precision} matmul peak; {r['gflop_img']:.1f} GFLOP/img",
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(bs.CASES), choices=list(bs.CASES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (median)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the case's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            for precision in args.precisions:
                out = Path(tmp) / f"{name}_{precision}"
                results.append(measure(name, precision, args.steps, out, args.device, args.batch))
    print(
        "| case | precision | s/step | img/s | GFLOP/img | GFLOP/s | peak GFLOP/s (same precision) "
        "| MFU |\n|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['case']} | {r['precision']} | {r['seconds']:.3f} | {r['img_s']:.2f} | "
            f"{r['gflop_img']:.2f} | {r['gflops']:.1f} | {r['peak_gflops']:.0f} | "
            f"{100 * r['mfu']:.1f}% |"
        )
    names = list(results[0]["phases"])
    print("\nseconds per step by phase (profiled step)\n")
    print("| case | precision | " + " | ".join(n.removeprefix("step/") for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in results:
        cells = " | ".join(f"{r['phases'][n]:.3f}" for n in names)
        print(f"| {r['case']} | {r['precision']} | {cells} |")


if __name__ == "__main__":
    main()
