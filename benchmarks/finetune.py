"""Fine-tuning train throughput, fp32 vs bf16 autocast, in one run (not a test).

    python benchmarks/finetune.py                       # ViT-S/16 @224, batch 8, this machine
    python benchmarks/finetune.py --arch vit_tiny_patch8 --img-size 64 --batch 32

Times the full training step of ``finetune`` — forward with drop-path, soft-target loss,
backward, AdamW over the layer-decay groups — on random images (data loading excluded),
once per precision, after warm-up steps, and prints images/s and the bf16 / fp32 ratio.
``precision=auto`` times a few such steps itself (:mod:`ibot_bench.precision`) and keeps the
faster precision; this table is the long-form version of that measurement.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

from ibot_bench.downstream.finetune import FinetuneModel, param_groups
from ibot_bench.encoders import load_encoder
from ibot_bench.layer_decay import set_drop_path
from ibot_bench.precision import cpu_bf16_support
from ibot_bench.runtime import autocast, resolve_device


def time_steps(
    arch: str, img_size: int, batch: int, steps: int, warmup: int, precision: str, device
):
    """Median seconds per training step for one precision."""
    backbone = load_encoder(f"random:{arch}").model
    set_drop_path(backbone, 0.1)
    model = FinetuneModel(backbone, num_classes=1000).to(device).train()
    opt = create_optimizer_v2(param_groups(model, 0.05, 0.75), opt="adamw", lr=1e-3)
    loss_fn = SoftTargetCrossEntropy()
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    target = torch.softmax(torch.randn(batch, 1000, device=device), dim=-1)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(device, precision):
            loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="vit_small", help="random:ARCH encoder (vit_small = ViT-S/16)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per precision")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = p.parse_args()

    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device {device} ({where or platform.machine()}), {torch.get_num_threads()} threads, "
        f"bf16: {'native' if device.type == 'cuda' else cpu_bf16_support()}"
    )
    print(f"{args.arch} @{args.img_size}px, batch {args.batch}, median of {args.steps} steps\n")
    print(f"{'precision':<10}{'s/step':>10}{'img/s':>10}{'vs fp32':>10}")
    base = None
    for precision in args.precisions:
        sec = time_steps(
            args.arch, args.img_size, args.batch, args.steps, args.warmup, precision, device
        )
        base = base or (sec if precision == "fp32" else None)
        ratio = f"{base / sec:.2f}x" if base else "-"
        print(f"{precision:<10}{sec:>10.3f}{args.batch / sec:>10.2f}{ratio:>10}")


if __name__ == "__main__":
    main()
