"""Every benchmark, one markdown table of ratios with their targets, and the machine line.

    python benchmarks/run_all.py --small                          # a few minutes on 2 cores
    python benchmarks/run_all.py --reference /work/ref/ibot       # full, incl. vs the reference

Each benchmark module of this folder gives ``rows(small) -> list[dict]`` with the keys
name, ours_s, baseline_s, ratio (baseline_s / ours_s: above 1 = ours faster; for MFU rows
the baseline is the work at the matmul peak), target and note; features and fine-tuning
are adapted here from their own scripts. A benchmark that fails (or is missing) gets one
row saying so with its error, and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from ibot_bench.precision import cpu_info


def machine() -> str:
    """CPU model, the bf16-relevant flags, threads, torch, GPU."""
    model, flags = cpu_info()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted) if flags else "n/a"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"{model or platform.processor() or platform.machine()}; {shown}; "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; GPU: {gpu}"
    )


def features_rows(small: bool) -> list[dict]:
    """Feature engine vs the raw model forward on the same images (target >= 0.8x)."""
    features = importlib.import_module("features")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        if small:
            cases = [("ViT-T/8 @64, synthetic", "random:vit_tiny_patch8", "synthetic:shapes", 64)]
            batch = 64
        else:
            features.write_jpegs(Path(tmp), 192)
            cases = [("ViT-S/16 @224, 256px JPEG", "random:vit_small", f"imagefolder:{tmp}", 224)]
            batch = 32
        for name, enc, data, size in cases:
            for case, precision, n, raw, engine, ratio in features.bench(
                name, enc, data, size, ["fp32"], batch, torch.device("cpu")
            ):
                out.append(
                    {
                        "name": f"feature engine vs raw forward, {case}, {precision}",
                        "ours_s": n / engine,
                        "baseline_s": n / raw,
                        "ratio": ratio,
                        "target": 0.8,
                        "note": f"{n} images, decode + resize + batching included",
                    }
                )
    return out


def finetune_rows(small: bool) -> list[dict]:
    """Fine-tuning step, bf16 autocast vs fp32 (no target: shows what bf16 buys here)."""
    finetune = importlib.import_module("finetune")
    arch, size, batch = ("vit_tiny_patch8", 64, 16) if small else ("vit_small", 224, 8)
    name = f"fine-tuning step, {arch} @{size}, batch {batch}, bf16 vs fp32"
    step_tools = importlib.import_module("ibot_step")
    if step_tools.skips_bf16(small):
        return [{"name": name, "skip": step_tools.EMULATED_BF16}]
    device = torch.device("cpu")
    fp32 = finetune.time_steps(arch, size, batch, 2, 1, "fp32", device)
    bf16 = finetune.time_steps(arch, size, batch, 2, 1, "bf16", device)
    return [
        {
            "name": name,
            "ours_s": bf16,
            "baseline_s": fp32,
            "ratio": fp32 / bf16,
            "target": None,
            "note": "median of 2 steps each",
        }
    ]


def suites(reference: str | None) -> list[tuple[str, Callable[[bool], list[dict]]]]:
    def module_rows(name: str, **kwargs) -> Callable[[bool], list[dict]]:
        return lambda small: importlib.import_module(name).rows(small, **kwargs)

    return [
        ("pretraining step", module_rows("pretrain")),
        (
            "pretraining step vs reference",
            module_rows("reference_step", reference=reference)
            if reference
            else lambda small: [{"name": "iBOT step vs reference", "skip": "no --reference"}],
        ),
        ("features", features_rows),
        ("kNN", module_rows("knn")),
        ("linear", module_rows("linear")),
        ("fine-tuning", finetune_rows),
    ]


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: list[dict]) -> str:
    lines = [
        "| benchmark | ours | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r or "skip" in r:
            why = f"FAILED: {r['error']}" if "error" in r else f"not run: {r['skip']}"
            lines.append(f"| {r['name']} | {why} | | | | |")
            continue
        target = r.get("target")
        met = "-" if target is None else ("yes" if r["ratio"] >= target else "no")
        note = f" ({r['note']})" if r.get("note") else ""
        # a miss that rounds to its target shows one more digit (1.498, not "1.50 ... no")
        near = met == "no" and f"{r['ratio']:.2f}" == f"{target:.2f}"
        lines.append(
            f"| {r['name']}{note} | {cell(r['ours_s'], '.3f')} s | "
            f"{cell(r.get('baseline_s'), '.3f')} s | {cell(r['ratio'], '.3f' if near else '.2f')} | "
            f"{cell(target, '.2f')} | {met} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes: minutes on 2 cores")
    parser.add_argument("--reference", help="checkout of bytedance/ibot for the step comparison")
    parser.add_argument("--only", nargs="+", help="run only the suites whose name contains these")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    results, failed = [], False
    for name, run in suites(args.reference):
        if args.only and not any(o in name for o in args.only):
            continue
        start = time.perf_counter()
        try:
            got = run(args.small)
        except (Exception, SystemExit) as exc:  # one failure must not hide the other rows
            traceback.print_exc()
            got = [{"name": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}]
        failed |= any("error" in r for r in got)
        results += got
        print(f"[run_all] {name}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    print(f"Machine: {machine()}\n")
    print(table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
