"""kNN on the GPU against kNN on the CPU, on the same features (not a test).

Both searches run the project's kNN classifier (:func:`ibot_bench.downstream.knn.knn_classify`:
a reduced-precision candidate search re-ranked in fp32, fp16 candidates on the GPU and bf16 or
fp32 on the CPU) on one random bank. Both are exact after re-ranking, so their predictions must
agree; only a class-score near-tie (a relative gap near fp32 rounding) may flip, at most 0.1%
of the queries. Prints the count and both times; exit status 1 when they disagree beyond that.

    python benchmarks/knn_gpu_agreement.py --bank 100000 --queries 10000 --dim 384 --classes 1000
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from ibot_bench.downstream.knn import knn_classify


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ks", default="10,20,100,200")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check compares the GPU kNN path with the CPU one")
        return 1
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((args.bank, args.dim), dtype=np.float32)
    labels = rng.integers(0, args.classes, args.bank)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    ks = [int(k) for k in args.ks.split(",")]
    results, seconds = {}, {}
    for device in ("cpu", "gpu"):
        start = time.perf_counter()
        results[device] = knn_classify(bank, labels, queries, ks, args.classes, device=device)
        seconds[device] = time.perf_counter() - start
    worst = 0
    for k in ks:
        differ = int((results["cpu"].top1[k] != results["gpu"].top1[k]).sum())
        worst = max(worst, differ)
        print(f"k={k}: top-1 differs on {differ} of {args.queries} queries")
    ok = worst <= args.queries // 1000
    print(
        f"knn cpu {seconds['cpu']:.2f}s, gpu {seconds['gpu']:.2f}s "
        f"({seconds['cpu'] / seconds['gpu']:.1f}x); agree: {ok}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
