"""Feature-engine throughput vs. the raw model forward on the same images (one run).

For each case and precision it times (a) the encoder's forward on pre-decoded,
pre-normalised batches held in memory (the ceiling) and (b) the full engine —
reading JPEGs, decoding, resizing, batching, forward, gathering — and prints the ratio.

    python benchmarks/features.py                  # both cases, fp32 and bf16
    python benchmarks/features.py --images 128 --cases vit_s16_224

Target (issue "Foundation"): engine >= 0.8x raw forward for ViT-S/16 @224 on 256-px JPEGs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ibot_bench.data import load_split
from ibot_bench.data.classification import EvalTransform, normalize_batch
from ibot_bench.encoders import load_encoder
from ibot_bench.features import FeatureConfig, extract_features
from ibot_bench.precision import cpu_bf16_support
from ibot_bench.runtime import autocast, resolve_device


def write_jpegs(root: Path, n: int, size: int = 256, classes: int = 4) -> None:
    """Smooth gradients + texture + noise: JPEGs that decode like photos, not flat colour."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        folder = root / "val" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(2, 12, 3)
        img = np.stack([np.sin(f[c] * (xx + yy * c) + i) for c in range(3)], -1) * 80 + 128
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def raw_forward_rate(
    encoder, batches: list[torch.Tensor], precision: str, device: torch.device
) -> float:
    """Images/s of the encoder alone on batches already on ``device`` (the engine's ceiling)."""
    batches = [x.to(device) for x in batches]
    with torch.inference_mode(), autocast(device, precision):
        encoder.forward_features(batches[0], n_last_blocks=4)  # warm-up at the timed shape
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for x in batches:
            encoder.forward_features(x, n_last_blocks=4)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    return sum(len(x) for x in batches) / elapsed


def bench(
    name: str, enc_spec: str, data_spec: str, img_size: int, precisions, batch: int,
    device: torch.device, workers: int = -1,
):  # fmt: skip
    encoder = load_encoder(enc_spec).to(device).eval()
    data = load_split(data_spec, "val")
    t = EvalTransform.for_size(img_size)
    images = torch.stack([t(data.read(i)) for i in range(len(data))])
    batches = [normalize_batch(b) for b in images.split(batch)]
    rows = []
    for precision in precisions:
        raw = raw_forward_rate(encoder, batches, precision, device)
        cfg = FeatureConfig(
            img_size=img_size,
            batch_size=batch,
            precision=precision,
            device=str(device),
            num_workers=workers,
        )
        with tempfile.TemporaryDirectory() as cache:
            feats = extract_features(
                enc_spec, data_spec, "val", cfg, cache_dir=cache, encoder=encoder,
                progress=False, log=lambda s: None,
            )  # fmt: skip
        engine = feats.meta["images_per_s"]
        label = name if workers < 0 else f"{name}, {workers} workers"
        rows.append((label, precision, len(data), raw, engine, engine / raw))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=192, help="images for ViT-S/16 @224")
    parser.add_argument("--cases", default="vit_s16_224,vit_t8_64")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--workers", default="-1", help="loader workers, comma-separated (-1: the engine's choice)"
    )
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"bf16 on this CPU: {cpu_bf16_support()}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "vit_s16_224" in args.cases:
            write_jpegs(Path(tmp), args.images)
            for workers in map(int, args.workers.split(",")):
                rows += bench(
                    "ViT-S/16 @224, 256px JPEG", "random:vit_small", f"imagefolder:{tmp}", 224,
                    precisions, args.batch_size, device, workers,
                )  # fmt: skip
        if "vit_t8_64" in args.cases:
            rows += bench(
                "ViT-T/8 @64, synthetic", "random:vit_tiny_patch8", "synthetic:shapes", 64,
                precisions, 64, device,
            )  # fmt: skip
    print(
        f"\n{'case':40s} {'prec':5s} {'images':>6s} {'raw img/s':>10s} {'engine img/s':>12s} {'ratio':>6s}"
    )
    for name, prec, n, raw, engine, ratio in rows:
        print(f"{name:40s} {prec:5s} {n:6d} {raw:10.1f} {engine:12.1f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
