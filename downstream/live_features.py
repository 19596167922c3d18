"""Features computed live with training augmentation, for the linear probe's ``augment`` mode.

ibot-protocols.md §2 "Linear probe": the paper's 100-epoch protocol trains on
RandomResizedCrop(224, bicubic) + horizontal-flip views, so the frozen backbone runs on
every batch of every epoch (the cost the cached default avoids). Validation and test
features still come from the cached centre-crop engine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2 as T

from ibot_bench.data import load_split
from ibot_bench.data.classification import normalize_batch
from ibot_bench.encoders import load_encoder
from ibot_bench.errors import UserError
from ibot_bench.features import FeatureSet, autocast, resolve_device, resolve_precision

FeatureSource = Callable[[np.ndarray], dict[str, torch.Tensor]]


def augmented_source(
    train: FeatureSet, scale: tuple[float, float], seed: int, device: torch.device
) -> FeatureSource:
    """``rows -> {cls, cls_last4, cls_patch}`` of freshly augmented views of those rows.

    Rows index ``train`` (the cached features); they are mapped to the dataset's images
    through the sample names, so images skipped as corrupt are never read.
    """
    meta = train.meta
    if not {"encoder_spec", "dataset_spec", "sample_names"} <= set(meta):
        raise UserError(
            "augment=true needs features made by the engine (encoder and dataset known)"
        )
    data = load_split(meta["dataset_spec"], meta.get("split", "train"))
    index = {name: i for i, name in enumerate(data.sample_names)}
    images = np.array([index[name] for name in meta["sample_names"]])
    crop = int(meta["key"]["transform"]["crop"])
    encoder = load_encoder(meta["encoder_spec"]).to(device).eval()
    precision = resolve_precision(device, meta["key"].get("precision", "auto"))
    augment = T.Compose(
        [
            T.RandomResizedCrop(crop, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
        ]
    )
    torch_gen = torch.Generator().manual_seed(seed)

    def source(rows: np.ndarray) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=torch_gen)))
            batch = torch.stack([augment(data.read(int(i))) for i in images[rows]])
        with torch.inference_mode(), autocast(device, precision):
            out = encoder.forward_features(normalize_batch(batch.to(device)), n_last_blocks=4)
        cls = out["cls"].float().clone()
        return {
            "cls": cls,
            "cls_last4": out["cls_last_n"].float().clone(),
            "cls_patch": torch.cat([cls, out["patch_mean"].float()], dim=1),
        }

    return source


def live_source_for(train: FeatureSet, cfg) -> FeatureSource | None:
    """The augmented source when ``cfg.augment`` is on, else None (use cached features)."""
    if not cfg.augment:
        return None
    return augmented_source(train, tuple(cfg.aug_scale), cfg.seed, resolve_device(cfg.device))
