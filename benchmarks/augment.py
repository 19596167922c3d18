"""Multi-crop augmentation throughput against the training step, per-image vs batched (issue 15).

    python benchmarks/augment.py                  # ViT-S/16 2x224 + 10x96 and quick.yaml
    python benchmarks/augment.py --fit 2          # + quick.yaml training, modes alternated

An *image* is all of its crops (+ its block masks). Per case and round, in one process and
alternating: the per-image path on one thread (a loader worker), the batched path on one
thread (its CPU setting), and the training step on ``--threads`` threads on one loader
batch. ``--fit N`` then trains quick.yaml N times per setting (alternating, ``--iters``
steps each) and reports the median step rate after the first 3 steps (data wait included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# this file is benchmarks/augment.py: keep its folder from shadowing the `pretrain` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from ibot_bench.config import load_config  # noqa: E402
from ibot_bench.pretrain.augment import MaskedMultiCrop, MultiCropAugmentation  # noqa: E402
from ibot_bench.pretrain.augment_batched import BatchCollate, BatchedMultiCrop  # noqa: E402
from ibot_bench.pretrain.config import PretrainConfig  # noqa: E402
from ibot_bench.pretrain.monitor import ClusterMonitor  # noqa: E402
from ibot_bench.pretrain.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # ViT-S on 448-px images (about ImageNet's size), quick.yaml on its own data
    "vit_small": (
        ROOT / "configs/pretrain/vit_small_in1k.yaml",
        ["crops.local_number=10", "data=synthetic:shapes?size=448&train=8&classes=4&val=1"],
    ),
    "quick": (ROOT / "configs/pretrain/quick.yaml", []),
}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def throughput(name: str, batch: int, rounds: int, precision: str, out: Path) -> dict:
    path, overrides = CASES[name]
    cfg = load_config(
        PretrainConfig,
        path,
        [*overrides, f"optim.batch_size={batch}", f"precision={precision}", f"output_dir={out}"],
    )
    trainer = Trainer(cfg)
    ds = trainer.dataset
    args = (ds.data, None, ds.masks, ds.patch_size, ds.global_sizes)
    raw = MaskedMultiCrop(*args, seed=cfg.seed)
    per_image = MaskedMultiCrop(ds.data, MultiCropAugmentation(cfg.crops), *args[2:])
    collate = BatchCollate(BatchedMultiCrop(cfg.crops))
    idx = [i % len(raw) for i in range(batch)]
    per_image_batch = torch.utils.data.default_collate([per_image[i] for i in idx])
    monitor = ClusterMonitor()
    trainer._step(per_image_batch, 0, 0, monitor)  # warm-up
    times: dict[str, list[float]] = {"per-image": [], "batched": [], "step": []}
    for _ in range(rounds):
        times["per-image"].append(timed(lambda: [per_image[i] for i in idx]))
        times["batched"].append(timed(lambda: collate([raw[i] for i in idx])))
        times["step"].append(timed(lambda: trainer._step(per_image_batch, 0, 0, monitor)))
    rate = {k: batch / min(v) for k, v in times.items()}
    return {"case": name, "batch": batch, **rate}


def fit_rates(rounds: int, iters: int, precision: str, out: Path) -> dict[str, float]:
    """quick.yaml's step rate (img/s, median) per (augment, threads, workers) setting."""
    settings = {
        "per-image, 1 thread + 1 worker (quick.yaml)": ["augment=per-image"],
        "batched, 1 thread + 1 worker": ["augment=batched"],
        "batched, 2 threads + 0 workers": ["augment=batched", "threads=2", "num_workers=0"],
    }
    rates: dict[str, list[float]] = {k: [] for k in settings}
    for r in range(rounds):
        for i, (k, overrides) in enumerate(settings.items()):
            run = out / f"fit{r}_{i}"
            cfg = load_config(
                PretrainConfig,
                CASES["quick"][0],
                [
                    *overrides,
                    f"output_dir={run}",
                    f"precision={precision}",
                    f"max_iters={iters}",
                    "save_every_iters=0",
                    "save_init=false",
                    "monitor_knn=0",
                    "plot=false",
                ],
            )
            Trainer(cfg).fit()
            logs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
            steps = [x["img_per_s"] for x in logs if x["type"] == "train"][3:]
            rates[k].append(statistics.median(steps))
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="step threads (0: torch's)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--fit", type=int, default=0, help="quick.yaml training rounds")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--out", default="/tmp/ibot-bench-augment-bench")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    print(f"{torch.get_num_threads()} step threads, precision {args.precision}")
    print(
        "| case | batch | per-image img/s (1 thread) | batched img/s (1 thread) | step img/s | "
        "batched / per-image | per-image / step |\n|---|---|---|---|---|---|---|"
    )
    for name in args.cases:
        batch = 8 if name == "vit_small" else 64
        r = throughput(name, batch, args.rounds, args.precision, out / name)
        print(
            f"| {name} | {batch} | {r['per-image']:.1f} | {r['batched']:.1f} | {r['step']:.1f} | "
            f"{r['batched'] / r['per-image']:.2f}x | {r['per-image'] / r['step']:.2f} |",
            flush=True,
        )
    if args.fit:
        rates = fit_rates(args.fit, args.iters, args.precision, out)
        base = next(iter(rates.values()))
        print("\n| quick.yaml training | img/s | vs per-image |\n|---|---|---|")
        for k, v in rates.items():
            print(f"| {k} | {v:.1f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
