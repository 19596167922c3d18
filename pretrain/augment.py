"""Multi-crop augmentation and the masked multi-crop dataset (docs/protocols.md#multi-crop, docs/protocols.md#block-masking).

Views are built with torchvision's v2 transforms on uint8 (3, H, W) tensors and stay uint8
until the training step normalises the whole batch at once. Every sample's randomness comes
from a seed derived from (run seed, epoch, index), so the crops and masks of an image do not
depend on the number of loader workers or on where a run was resumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import Dataset

from ibot_bench.data.classification import ClassificationSplit, read_for_training
from ibot_bench.pretrain.config import CropsConfig, per_crop
from ibot_bench.pretrain.masking import MaskGenerator
from ibot_bench.runtime import threads_restored


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small per-image ops on one torch thread: on tiny images thread start-up costs
    ~10x the work (measured, 2 cores)."""
    with threads_restored():
        torch.set_num_threads(1)
        yield


def blur_kernel_size(sigma_max: float) -> int:
    """Gaussian kernel covering 3 sigma each side (PIL's blur radius ~ sigma)."""
    return 2 * int(-(-3 * sigma_max // 1)) + 1


def view_transform(
    size: int, scale: tuple[float, float], blur_p: float, solarize_p: float, c: CropsConfig
) -> T.Compose:
    """One view of docs/protocols.md#multi-crop: RandomResizedCrop (bicubic), flip, colour jitter, grayscale, blur,
    solarize; uint8 in, uint8 out (normalisation is done per batch)."""
    steps: list[T.Transform] = [
        T.RandomResizedCrop(
            size, scale=scale, interpolation=T.InterpolationMode.BICUBIC, antialias=True
        ),
        T.RandomHorizontalFlip(c.flip_p),
        T.RandomApply([T.ColorJitter(*c.color_jitter)], p=c.color_jitter_p),
        T.RandomGrayscale(c.grayscale_p),
    ]
    if blur_p > 0:
        sigma = (c.blur_sigma[0], c.blur_sigma[1])
        blur = T.GaussianBlur(blur_kernel_size(sigma[1]), sigma=sigma)
        steps.append(T.RandomApply([blur], p=blur_p))
    if solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarize_p))
    return T.Compose(steps)


class MultiCropAugmentation:
    """The global then local views of one image (global 1 and 2 differ in blur/solarize)."""

    def __init__(self, c: CropsConfig) -> None:
        g_sizes = per_crop(c.global_size, c.global_number, "global_size")
        l_sizes = per_crop(c.local_size, c.local_number, "local_size")
        g_blur = per_crop(c.global_blur_p, c.global_number, "global_blur_p")
        g_sol = per_crop(c.global_solarize_p, c.global_number, "global_solarize_p")
        l_blur = per_crop(c.local_blur_p, c.local_number, "local_blur_p")
        l_sol = per_crop(c.local_solarize_p, c.local_number, "local_solarize_p")
        g_scale, l_scale = tuple(c.global_scale), tuple(c.local_scale)
        self.global_views = [
            view_transform(s, g_scale, b, p, c) for s, b, p in zip(g_sizes, g_blur, g_sol)
        ]
        self.local_views = [
            view_transform(s, l_scale, b, p, c) for s, b, p in zip(l_sizes, l_blur, l_sol)
        ]

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [t(img) for t in self.global_views + self.local_views]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one (run seed, epoch, sample index)."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) % (2**63)


# removing an unreadable image changes the data fingerprint a resume compares
RESUME_NOTE = (
    " Removing it changes the data, so resuming a run started with it then needs --force-resume."
)


@dataclass
class MaskedMultiCrop(Dataset):
    """Dataset of (views, masks, label): uint8 views (globals first), one bool mask per
    global view on its patch grid (docs/protocols.md#block-masking; the reference also draws unused local masks).

    Without ``augment`` (``augment=batched``, :mod:`ibot_bench.pretrain.augment_batched`)
    an item is (image, masks, label, seed): the decoded image, cropped later per batch. The
    masks are the same in both modes: they depend only on the sample's seed and grid.
    """

    data: ClassificationSplit
    augment: MultiCropAugmentation | None
    masks: MaskGenerator
    patch_size: int
    global_sizes: list[int]
    seed: int = 0
    epoch: int = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple:
        s = sample_seed(self.seed, self.epoch, index)
        img = read_for_training(self.data, index, "pretraining", RESUME_NOTE)
        rng = random.Random(s)
        masks = [
            self.masks(rng, (size // self.patch_size, size // self.patch_size), self.epoch)
            for size in self.global_sizes
        ]
        label = int(self.data.labels[index])
        if self.augment is None:
            return img, masks, label, s
        with one_thread(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            views = self.augment(img)
        return views, masks, label
