"""kNN with faiss on the GPU against faiss on the CPU, on the same features (not a test).

Both searches run the project's kNN classifier (:func:`ibot_bench.downstream.knn.knn_classify`)
on one random bank; the predictions must agree (a floating-point near-tie may flip: at most
0.1% of the queries' top-1 may differ; the script prints how many did) and the GPU should
be faster. Exit status 1 when they disagree beyond near-ties.

    python benchmarks/faiss_agreement.py --bank 100000 --queries 10000 --dim 384 --classes 1000
"""

from __future__ import annotations

import argparse
import sys
import time

import faiss
import numpy as np

from ibot_bench.downstream.knn import knn_classify


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ks", default="10,20,100,200")
    args = p.parse_args()
    if faiss.get_num_gpus() == 0:
        print("faiss sees no GPU (install faiss-gpu-cu12: pip install 'ibot-bench[gpu]')")
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
    print(
        f"faiss cpu {seconds['cpu']:.2f}s, gpu {seconds['gpu']:.2f}s "
        f"({seconds['cpu'] / seconds['gpu']:.1f}x); agree: {worst <= args.queries // 1000}"
    )
    return 0 if worst <= args.queries // 1000 else 1  # <= 0.1%: fp near-ties only


if __name__ == "__main__":
    sys.exit(main())
