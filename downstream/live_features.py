"""Features computed live with training augmentation, for the linear probe's ``augment`` mode.

docs/protocols.md#linear-probe: the paper's 100-epoch protocol trains on
RandomResizedCrop(224, bicubic) + horizontal-flip views, so the frozen backbone runs on
every batch of every epoch (the cost the cached default avoids). Validation and test
features still come from the cached centre-crop engine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2 as T

from ibot_bench.data import require_classification
from ibot_bench.data.classification import normalize_batch
from ibot_bench.errors import UserError
from ibot_bench.features import FeatureSet, inference_precision
from ibot_bench.runtime import autocast, resolve_device
from ibot_bench.tasks import TaskContext

FeatureSource = Callable[[np.ndarray], dict[str, torch.Tensor]]
# training feature set -> the source of augmented features of its rows
LiveViews = Callable[[FeatureSet], "AugmentedFeatures"]


def augmented_source(
    ctx: TaskContext, train: FeatureSet, scale: tuple[float, float], seed: int, device: torch.device
) -> AugmentedFeatures:
    """``rows -> {cls, cls_last4, cls_patch}`` of freshly augmented views of those rows.

    Rows index ``train`` (features of the context's train split, possibly a label subset);
    they are mapped to the split's images by sample name, so images skipped as corrupt are
    never read. The views are cropped to the feature engine's crop size.
    """
    data = require_classification(ctx.split("train"), ctx.data_spec)
    index = {name: i for i, name in enumerate(data.sample_names)}
    missing = [name for name in train.sample_names if name not in index]
    if missing or not train.sample_names:
        raise UserError(
            f"augment=true: {len(missing) or len(train)} training feature row(s) have no image "
            f"in {ctx.data_spec} (e.g. {missing[:3]}); the features must come from that dataset"
        )
    images = np.array([index[name] for name in train.sample_names])
    crop = ctx.feature_config.img_size or data.default_img_size
    encoder = ctx.encoder().to(device).eval()
    n_blocks = encoder.resolve_last_blocks(ctx.feature_config.n_last_blocks)
    precision = inference_precision(  # the precision the cached features were made in
        device,
        ctx.feature_config,
        encoder.info.fingerprint,
        crop,
        lambda: encoder,
        ctx.log,
        every_rank=False,  # a frozen task: under torchrun only rank 0 runs it
    )
    augment = T.Compose(
        [
            T.RandomResizedCrop(crop, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
        ]
    )
    torch_gen = torch.Generator().manual_seed(seed)

    def views(rows: np.ndarray) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=torch_gen)))
            return torch.stack([augment(data.read(int(i))) for i in images[rows]])

    def features(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), autocast(device, precision):
            out = encoder.forward_features(normalize_batch(batch.to(device)), n_blocks)
        cls = out["cls"].float().clone()
        return {
            "cls": cls,
            "cls_last4": out["cls_last_n"].float().clone(),
            "cls_patch": torch.cat([cls, out["patch_mean"].float()], dim=1),
        }

    return AugmentedFeatures(lambda rows: features(views(rows)), torch_gen)


class AugmentedFeatures:
    """``rows -> features`` of fresh augmented views; the augmentation RNG's state can be
    saved and restored, so a resumed linear probe draws the views an unstopped one would."""

    def __init__(self, compute: FeatureSource, generator: torch.Generator) -> None:
        self.compute, self.generator = compute, generator

    def __call__(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return self.compute(rows)

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def live_views(ctx: TaskContext, cfg) -> LiveViews | None:
    """Augmented training views when ``cfg.augment`` is on, else None (cached features)."""
    if not cfg.augment:
        return None
    scale, device = tuple(cfg.aug_scale), resolve_device(cfg.device)
    return lambda train: augmented_source(ctx, train, scale, cfg.seed, device)
