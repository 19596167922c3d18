"""Multi-crop augmentation on whole uint8 batches (``augment=batched``, docs/protocols.md#multi-crop).

The loader only decodes: images stay uint8 at their own size, padded into one
(B, 3, H, W) tensor. Here every crop of the batch is made at once, on the training device
when that is a GPU (else in the loader's collate), with the distributions of the per-image
path (:mod:`ibot_bench.pretrain.augment`, torchvision's v2 transforms): RandomResizedCrop's
scale/ratio draw (10 tries, centre-crop fallback), flip, ColorJitter (p, factor ranges, a
random order per image), grayscale, Gaussian blur (sigma per image, reflect padding),
solarize. Each image draws its own parameters; the ops take them as per-row tensors.
Resampling on a GPU is one ``roi_align`` per crop (bilinear, averaging ceil(scale) samples
per output pixel when shrinking) instead of antialiased bicubic: the crop geometry is
identical, the kernel not; on a CPU it is the per-image path's uint8 bicubic resize per crop.
Views come back uint8 like the per-image path's, so the training step treats both alike.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align

from ibot_bench.pretrain.augment import blur_kernel_size, one_thread
from ibot_bench.pretrain.config import CropsConfig, per_crop
from ibot_bench.runtime import available_cpus

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BICUBIC = TF.InterpolationMode.BICUBIC
_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


def augment_mode(requested: str, device: torch.device, processes: int = 1) -> str:
    """``per-image`` or ``batched`` for ``augment=requested``.

    ``auto`` is batched on CUDA (per image, ViT-S's 12 crops run at 10-30 img/s per CPU
    core, far below a GPU's step) and with <= 4 CPUs per process, where the per-image loader
    takes a core for most of a step and batched needs a tenth of it (measured on 2 cores,
    docs/protocols.md#multi-crop); per-image elsewhere.
    """
    if requested != "auto":  # validated by ibot_bench.pretrain.config.validate
        return requested
    cpus = available_cpus() // max(1, processes)
    return "batched" if device.type == "cuda" or cpus <= 4 else "per-image"


class ImageBatch(NamedTuple):
    """Decoded images padded to one uint8 (B, 3, H, W) tensor, each one's (h, w), a seed."""

    images: torch.Tensor
    sizes: torch.Tensor
    seed: int

    def to(self, device: torch.device) -> ImageBatch:
        return ImageBatch(
            self.images.to(device, non_blocking=True), self.sizes.to(device), self.seed
        )


def pad_images(images: list[torch.Tensor], seed: int) -> ImageBatch:
    """Stack uint8 (3, h, w) images at the top-left of a canvas of the largest h and w.

    The row and column just past each image repeat its edge, so bilinear sampling at a
    crop's border never mixes in padding.
    """
    sizes = torch.tensor([img.shape[-2:] for img in images], dtype=torch.long)
    height, width = (int(v) for v in sizes.max(0).values)
    canvas = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
    for out, img in zip(canvas, images):
        h, w = img.shape[-2:]
        out[:, :h, :w] = img
        if w < width:
            out[:, :h, w] = img[:, :, -1]
        if h < height:
            out[:, h, : min(w + 1, width)] = out[:, h - 1, : min(w + 1, width)]
    return ImageBatch(canvas, sizes, seed)


def crop_boxes(
    sizes: torch.Tensor,
    scale: tuple[float, float],
    gen: torch.Generator,
    ratio: tuple[float, float] = _RATIO,
    tries: int = 10,
) -> torch.Tensor:
    """(x1, y1, x2, y2) per image of RandomResizedCrop's draw: up to ``tries`` (area
    fraction U(scale), log-aspect U(log ratio), sides rounded) until one fits, a uniform
    integer offset, else the centre crop clipped to ``ratio``."""
    dev, n = sizes.device, sizes.shape[0]
    h_img, w_img = sizes[:, :1].double(), sizes[:, 1:].double()
    u = torch.rand(n, tries, 2, generator=gen, device=dev, dtype=torch.float64)
    area = h_img * w_img * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    w, h = w.gather(1, first), h.gather(1, first)
    offset = torch.rand(n, 2, generator=gen, device=dev, dtype=torch.float64)
    top = torch.floor(offset[:, :1] * (h_img - h + 1))
    left = torch.floor(offset[:, 1:] * (w_img - w + 1))
    # fallback: the whole image, its aspect clipped to the ratio range, centred
    in_ratio = w_img / h_img
    fw = torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img)
    fh = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    ok = fits.any(1, keepdim=True)
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    top = torch.where(ok, top, torch.div(h_img - fh, 2, rounding_mode="floor"))
    left = torch.where(ok, left, torch.div(w_img - fw, 2, rounding_mode="floor"))
    return torch.cat([left, top, left + w, top + h], 1).float()


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, roi: bool) -> torch.Tensor:
    """Float ``size`` x ``size`` crops in [0, 1] of (B, 3, H, W) ``images`` (0..255) at
    per-image ``boxes``. ``roi``: one ``roi_align`` over the batch (for GPUs; float images).
    Else torch's vectorised uint8 bicubic antialiased resize per crop (the per-image path's
    kernel; uint8 images), on a CPU faster than roi_align on a float copy of the batch."""
    if not roi:
        crops = [
            TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [size, size], BICUBIC, antialias=True)
            for img, (x1, y1, x2, y2) in zip(images, boxes.long().tolist())
        ]
        return torch.stack(crops).float().div_(255)
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device)[:, None].float(), boxes], 1)
    out = roi_align(images, rois, (size, size), sampling_ratio=-1, aligned=True)
    return out.div_(255)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor + other * (1 - factor)).clamp_(0, 1)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of float RGB ``x`` (N, 3, H, W) by ``shift`` (N, 1, 1, 1) turns."""
    r, g, b = x.unbind(1)
    v, argmax = x.max(1)
    delta = v - x.min(1).values
    s = delta / torch.where(v > 0, v, 1)
    d = torch.where(delta > 0, delta, 1)
    h = torch.where(
        argmax == 0, (g - b) / d, torch.where(argmax == 1, 2 + (b - r) / d, 4 + (r - g) / d)
    )
    h = torch.where(delta > 0, h / 6, 0) + shift[:, 0]
    h6 = torch.remainder(h, 1.0) * 6
    k = torch.stack([torch.remainder(n + h6, 6) for n in (5.0, 3.0, 1.0)], 1)
    edge = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * edge)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def color_jitter(
    x: torch.Tensor, apply: torch.Tensor, strength: list[float], gen: torch.Generator
) -> torch.Tensor:
    """torchvision's ColorJitter(*strength) on the rows where ``apply``: factors
    U(max(0, 1 - s), 1 + s) for brightness/contrast/saturation and U(-h, h) for hue, in a
    random order per row; an op of strength 0 is skipped, as there."""
    n, dev = x.shape[0], x.device
    lo = torch.tensor([max(0.0, 1 - s) for s in strength[:3]] + [-strength[3]], device=dev)
    hi = torch.tensor([1 + s for s in strength[:3]] + [strength[3]], device=dev)
    factors = lo + (hi - lo) * torch.rand(n, 4, generator=gen, device=dev)
    order = torch.rand(n, 4, generator=gen, device=dev).argsort(1)
    enabled = torch.tensor([s > 0 for s in strength], device=dev)
    x = x.clone()
    for step in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            rows = (apply & (order[:, step] == op) & enabled[op]).nonzero().squeeze(1)
            if len(rows):
                x[rows] = fn(x[rows], factors[rows, op].view(-1, 1, 1, 1))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-row ``sigma``, ``kernel`` taps, reflect padding
    (torchvision's gaussian_blur with one sigma per image)."""
    n, c, height, width = x.shape
    half = (kernel - 1) / 2
    taps = torch.linspace(-half, half, kernel, device=x.device)
    weights = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c)
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c)
    return y.view(n, c, height, width)


class BatchedMultiCrop:
    """The global then local views of a batch of images (uint8 in, uint8 views out)."""

    def __init__(self, c: CropsConfig, roi: bool | None = None) -> None:
        """``roi``: resample with roi_align (None: on GPUs; per-crop resize on CPUs)."""
        self.c, self.roi = c, roi
        self.global_sizes = per_crop(c.global_size, c.global_number, "global_size")
        local_sizes = per_crop(c.local_size, c.local_number, "local_size")
        g_scale, l_scale = (
            (c.global_scale[0], c.global_scale[1]),
            (c.local_scale[0], c.local_scale[1]),
        )
        blur = per_crop(c.global_blur_p, c.global_number, "global_blur_p")
        blur += per_crop(c.local_blur_p, c.local_number, "local_blur_p")
        solarize = per_crop(c.global_solarize_p, c.global_number, "global_solarize_p")
        solarize += per_crop(c.local_solarize_p, c.local_number, "local_solarize_p")
        scales = [g_scale] * c.global_number + [l_scale] * c.local_number
        self.crops = list(zip(self.global_sizes + local_sizes, scales, blur, solarize))
        self.blur_kernel = blur_kernel_size(c.blur_sigma[1])

    def __call__(self, batch: ImageBatch) -> list[torch.Tensor]:
        """uint8 views of ``batch``, globals first. On a CPU on one thread, as a loader
        worker: these ops are too small to pay for threads (10-30x slower on a busy 2-core
        machine, measured)."""
        if batch.images.device.type != "cpu":
            return self._views(batch)
        with one_thread():
            return self._views(batch)

    def _views(self, batch: ImageBatch) -> list[torch.Tensor]:
        gen = torch.Generator(batch.images.device).manual_seed(batch.seed)
        roi = batch.images.device.type != "cpu" if self.roi is None else self.roi
        images = batch.images.float() if roi else batch.images
        n, dev = len(images), images.device
        groups: dict[int, list[int]] = {}  # crops of one size share the colour work
        for i, (size, *_) in enumerate(self.crops):
            groups.setdefault(size, []).append(i)
        views: dict[int, torch.Tensor] = {}
        for size, members in groups.items():
            x = torch.cat(
                [
                    resized_crops(images, crop_boxes(batch.sizes, self.crops[i][1], gen), size, roi)
                    for i in members
                ]
            )
            blur_p, sol_p = (
                torch.tensor([self.crops[i][k] for i in members], device=dev).repeat_interleave(n)
                for k in (2, 3)
            )
            x = self._photometric(x, blur_p, sol_p, gen).mul_(255).round_().to(torch.uint8)
            views.update(zip(members, x.split(n)))
        return [views[i] for i in range(len(self.crops))]

    def _photometric(
        self, x: torch.Tensor, blur_p: torch.Tensor, sol_p: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """Flip, jitter, grayscale, blur, solarize on float (N, 3, S, S) crops in [0, 1]."""
        c, n, dev = self.c, x.shape[0], x.device
        u = torch.rand(n, 6, generator=gen, device=dev)
        flip = (u[:, 0] < c.flip_p).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        x = color_jitter(x, u[:, 1] < c.color_jitter_p, list(c.color_jitter), gen)
        gray = (u[:, 2] < c.grayscale_p).view(-1, 1, 1, 1)
        x = torch.where(gray, _gray(x).expand_as(x), x)
        rows = (u[:, 3] < blur_p).nonzero().squeeze(1)
        if len(rows):
            lo, hi = c.blur_sigma[0], c.blur_sigma[1]
            x[rows] = gaussian_blur(x[rows], lo + (hi - lo) * u[rows, 4], self.blur_kernel)
        solar = (u[:, 5] < sol_p).view(-1, 1, 1, 1) & (x >= 128 / 255)
        return torch.where(solar, 1 - x, x)


class BatchCollate:
    """Collates (image, masks, label, seed) items into (views or ImageBatch, masks, labels).

    With ``augment`` (CPU runs) the views are made here, in the loader; without it the
    :class:`ImageBatch` goes to the training step, which augments it on the GPU. The batch's
    seed is its first sample's, so its crops do not depend on workers or on a resume.
    """

    def __init__(self, augment: BatchedMultiCrop | None = None) -> None:
        self.augment = augment

    def __call__(self, items: list[tuple]) -> tuple:
        images, masks, labels, seeds = zip(*items)
        batch = pad_images(list(images), seeds[0])
        stacked = [torch.stack(m) for m in zip(*masks)]
        views = self.augment(batch) if self.augment is not None else batch
        return views, stacked, torch.tensor(labels)
