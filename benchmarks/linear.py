"""Linear-probe head training: achieved FLOP/s vs. the matmul peak, and vs. one head at a time.

One epoch of :func:`ibot_bench.downstream.linear.train_heads` on random cached features (13
lrs x the three feature variants = 39 heads by default), timed between the ends of epochs
1 and 2 (init and warm-up excluded). FLOPs per epoch: forward and weight-gradient matmuls,
``4 x N x D_f x C`` per head. The peak is the best of fp32 (or bf16 with ``--bf16``)
square matmuls of 2048 and 4096 measured in the same run. The baseline trains the heads one
at a time in plain torch (``nn.Linear``, ``torch.optim.SGD``, one pass over the features per
epoch), as the reference runs one training per learning rate.

    python benchmarks/linear.py              # 2,000 x 384 features, 1,000 classes, 39 heads
    python benchmarks/linear.py --small      # 500 samples, 100 classes (< 1 min)

Target (issue #15): >= 60% of the matmul peak.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from ibot_step import matmul_peak
from torch.nn import functional as F

from ibot_bench.downstream.linear import (
    DINOV2_BASE_LRS,
    LinearConfig,
    feature_batch,
    head_specs,
    train_heads,
)
from ibot_bench.features import FeatureSet

FULL = {"samples": 2000, "dim": 384, "classes": 1000, "peak_sizes": (2048, 4096)}
SMALL = {"samples": 500, "dim": 384, "classes": 100, "peak_sizes": (1024, 2048)}


def features(samples: int, dim: int, classes: int) -> FeatureSet:
    rng = np.random.default_rng(0)
    cls = rng.standard_normal((samples, dim), dtype=np.float32)
    patch = rng.standard_normal((samples, dim), dtype=np.float32)
    last = rng.standard_normal((samples, 4 * dim), dtype=np.float32)
    labels = rng.integers(0, classes, samples)
    return FeatureSet(cls, patch, last, labels, [f"c{i}" for i in range(classes)])


def epoch_seconds(fs: FeatureSet, cfg: LinearConfig, classes: int) -> float:
    """Seconds of the second epoch of training every head together."""
    ends: list[float] = []
    rows = np.arange(len(fs))
    train_heads(
        fs, rows, head_specs(cfg), classes, cfg, lambda e, m: ends.append(time.perf_counter())
    )
    return ends[1] - ends[0]


def one_at_a_time_seconds(fs: FeatureSet, cfg: LinearConfig, classes: int) -> float:
    """Seconds of one epoch of every head trained alone in plain torch (reference protocol)."""
    device = torch.device("cpu")
    y_all = torch.from_numpy(np.asarray(fs.labels, dtype=np.int64))
    total = 0.0
    for spec in head_specs(cfg):
        head = torch.nn.Linear(
            feature_batch(fs, np.arange(1), [spec.feature], device)[spec.feature].shape[1], classes
        )
        opt = torch.optim.SGD(head.parameters(), lr=spec.lr, momentum=cfg.momentum)
        perm = np.random.default_rng(0).permutation(len(fs))
        start = time.perf_counter()
        for s in range(0, len(perm), cfg.batch_size):
            batch = perm[s : s + cfg.batch_size]
            x = feature_batch(fs, batch, [spec.feature], device)[spec.feature]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = head(x)
            loss = F.cross_entropy(logits.float(), y_all[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        total += time.perf_counter() - start
    return total


def rows(small: bool = False, bf16: bool = False) -> list[dict]:
    """Two rows: fraction of the matmul peak (ratio), and speed-up over one head at a time."""
    size = SMALL if small else FULL
    fs = features(size["samples"], size["dim"], size["classes"])
    precision = "bf16" if bf16 else "fp32"
    cfg = LinearConfig(epochs=2, base_lrs=list(DINOV2_BASE_LRS), precision=precision, device="cpu")
    dtype = torch.bfloat16 if bf16 else torch.float32
    specs = head_specs(cfg)
    dims = {"cls": size["dim"], "cls_last4": 4 * size["dim"], "cls_patch": 2 * size["dim"]}
    flops = sum(4 * size["samples"] * dims[s.feature] * size["classes"] for s in specs)
    peak = matmul_peak(dtype, torch.device("cpu"), size["peak_sizes"])
    ours = epoch_seconds(fs, cfg, size["classes"])
    # alternate: peak, ours, peak
    peak = max(peak, matmul_peak(dtype, torch.device("cpu"), size["peak_sizes"]))
    base = one_at_a_time_seconds(fs, cfg, size["classes"])
    name = str(dtype).removeprefix("torch.")
    shape = f"{len(specs)} heads, {size['samples']} x {size['dim']}, {size['classes']} classes"
    at_peak = flops / peak
    return [
        {
            "name": f"linear heads, fraction of {name} matmul peak",
            "ours_s": ours,
            "baseline_s": at_peak,
            "ratio": at_peak / ours,
            "target": 0.6,
            "note": f"{shape}; {flops / ours / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s; "
            "baseline = the epoch's matmul FLOPs at peak",
        },
        {
            "name": "linear heads vs one at a time",
            "ours_s": ours,
            "baseline_s": base,
            "ratio": base / ours,
            "target": None,
            "note": f"{shape}; one epoch, plain torch per head",
        },
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="500 samples, 100 classes")
    p.add_argument("--bf16", action="store_true", help="bf16 heads and a bf16 peak")
    args = p.parse_args(argv)
    result = rows(args.small, args.bf16)
    print("name | ours | baseline | ratio | target")
    for r in result:
        target = "-" if r["target"] is None else f">= {r['target']:g}"
        print(
            f"{r['name']} | {r['ours_s']:.2f}s | {r['baseline_s']:.2f}s | {r['ratio']:.2f} | "
            f"{target}  ({r['note']})"
        )
    return result


if __name__ == "__main__":
    main()
