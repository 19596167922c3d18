"""Batched multi-crop augmentation (augment=batched) against the per-image path: the same
crop geometry, flip/jitter/grayscale/blur/solarize rates and output statistics, exact colour
ops, reproducible draws, masks unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from scipy.stats import ks_2samp

from ibot_bench.data import load_split
from ibot_bench.errors import ConfigError
from ibot_bench.pretrain import augment_batched as ab
from ibot_bench.pretrain.augment import MaskedMultiCrop, MultiCropAugmentation
from ibot_bench.pretrain.config import CropsConfig, PretrainConfig, validate
from ibot_bench.pretrain.masking import MaskGenerator

N = 400  # images per statistical comparison: rates to +-0.07 (3.5 sd at p=0.2)


def crops_config(**overrides) -> CropsConfig:
    base = dict(global_size=[16], local_number=2, local_size=[8], blur_sigma=[1.0, 2.0])
    return CropsConfig(**{**base, **overrides})


def per_image(c: CropsConfig, images: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """All crops of the per-image path, stacked per view."""
    aug, threads = MultiCropAugmentation(c), torch.get_num_threads()
    torch.manual_seed(seed)
    try:  # one thread, as in the loader (threads cost ~20x the work on tiny images)
        torch.set_num_threads(1)
        views = [aug(img) for img in images]
    finally:
        torch.set_num_threads(threads)
    return [torch.stack(v) for v in zip(*views)]


def batched(c: CropsConfig, images: list[torch.Tensor], roi: bool, seed: int = 0) -> list:
    return ab.BatchedMultiCrop(c, roi=roi)(ab.pad_images(images, seed))


def both(c: CropsConfig, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    images = [image] * N
    return {
        "per-image": per_image(c, images),
        "resize": batched(c, images, roi=False),
        "roi": batched(c, images, roi=True),
    }


def test_crop_boxes_follow_random_resized_crop():
    h, w, n = 60, 100, 3000
    # (0.5, 1): the centre-crop fallback happens at times; (0.9, 1): always
    for scale in ((0.14, 1.0), (0.05, 0.4), (0.5, 1.0), (0.9, 1.0)):
        rrc = T.RandomResizedCrop(8, scale=scale)
        torch.manual_seed(0)
        ref = [rrc.make_params([torch.empty(3, h, w)]) for _ in range(n)]
        ref_hw = np.array([(p["height"], p["width"]) for p in ref], dtype=float)
        ref_left = np.array([p["left"] / max(1, w - p["width"]) for p in ref if p["width"] < w])
        g = torch.Generator().manual_seed(0)
        x1, y1, x2, y2 = ab.crop_boxes(torch.tensor([[h, w]] * n), scale, g).double().T.numpy()
        ours_hw = np.stack([y2 - y1, x2 - x1], 1)
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
        assert np.array_equal(ours_hw, np.round(ours_hw))  # whole pixels, as torchvision
        area = (ours_hw.prod(1) / (h * w), ref_hw.prod(1) / (h * w))
        aspect = (ours_hw[:, 1] / ours_hw[:, 0], ref_hw[:, 1] / ref_hw[:, 0])
        ours_left = (x1 / np.maximum(1, w - ours_hw[:, 1]))[ours_hw[:, 1] < w]
        for a, b in (area, aspect, (ours_left, ref_left)):
            assert ks_2samp(a, b).pvalue > 1e-3, scale
        fallback = np.mean((ref_hw == [60, 80]).all(1)), np.mean((ours_hw == [60, 80]).all(1))
        assert abs(fallback[0] - fallback[1]) < 0.03


def _rate(hit: torch.Tensor) -> float:
    return float(hit.float().mean())


def test_flip_rate():
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    img[:, :, 8:] = 255  # black left, white right
    c = crops_config(global_scale=[1.0, 1.0], color_jitter_p=0.0, grayscale_p=0.0)
    c.global_blur_p, c.global_solarize_p, c.local_number = [0.0], [0.0], 0
    for name, views in both(c, img).items():
        flipped = views[0][:, :, :, :4].float().mean((1, 2, 3)) > 128
        assert abs(_rate(flipped) - 0.5) < 0.09, name


def test_grayscale_and_solarize_rates_on_a_two_colour_image():
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    img[0, :, :8], img[1, :, 8:] = 200, 200  # red | green: grey only after grayscale
    c = crops_config(global_scale=[1.0, 1.0], color_jitter_p=0.0, global_blur_p=[0.0])
    c.local_blur_p = [0.0]
    for name, views in both(c, img).items():
        for i, view in enumerate(views):
            grey = (view[:, 0] == view[:, 1]).all(-1).all(-1)
            assert abs(_rate(grey) - 0.2) < 0.07, (name, i)
        # solarized: 200 -> 55, so no pixel >= 128 and not grey (grey 60 | 117 stays)
        dark = views[1].float().amax((1, 2, 3)) < 128
        grey = (views[1][:, 0] == views[1][:, 1]).all(-1).all(-1)
        assert abs(_rate(dark & ~grey) - 0.2 * 0.8) < 0.07, name
        grey0 = (views[0][:, 0] == views[0][:, 1]).all(-1).all(-1)
        assert (views[0].float().amax((1, 2, 3)) >= 128)[~grey0].all(), name  # global 1: never


def test_blur_rates_per_crop():
    img = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 255  # checkerboard
    img = img.to(torch.uint8).expand(3, -1, -1).contiguous()
    c = crops_config(global_scale=[1.0, 1.0], local_scale=[1.0, 1.0], local_size=[16])
    c.color_jitter_p, c.grayscale_p, c.global_solarize_p = 0.0, 0.0, [0.0]
    for name, views in both(c, img).items():
        for view, p in zip(views, (1.0, 0.1, 0.5, 0.5)):
            blurred = view.float().std((1, 2, 3)) < 100  # sharp: std ~127
            assert abs(_rate(blurred) - p) < 0.08, (name, p)


def test_jitter_rate_and_output_statistics_agree():
    uniform = torch.full((3, 16, 16), 128, dtype=torch.uint8)  # only brightness changes it
    c = crops_config(grayscale_p=0.0, global_blur_p=[0.0], local_blur_p=[0.0])
    c.global_solarize_p = [0.0]
    for name, views in both(c, uniform).items():
        changed = (views[0].float() - 128).abs().amax((1, 2, 3)) > 1
        assert abs(_rate(changed) - 0.8 * 0.975) < 0.07, name  # |f - 1| > 1/128: 97.5%

    g = torch.Generator().manual_seed(0)  # smooth random colour image: every op matters
    small = torch.rand(1, 3, 4, 4, generator=g)
    img = (TF.resize(small, [24, 24], antialias=True)[0] * 255).to(torch.uint8)
    out = both(crops_config(), img)
    for i in range(4):
        ref = out["per-image"][i].float()
        for name in ("resize", "roi"):
            x = out[name][i].float()
            # per-image means vary with the crop: tolerance = 4 standard errors + 2 levels
            # (the per-image path truncates to uint8 after each colour op)
            se = ((x.mean((2, 3)).var(0) + ref.mean((2, 3)).var(0)) / N).sqrt()
            assert ((x.mean((0, 2, 3)) - ref.mean((0, 2, 3))).abs() < 4 * se + 2).all(), (name, i)
            assert torch.allclose(x.std((0, 2, 3)), ref.std((0, 2, 3)), rtol=0.1), (name, i)


def test_colour_ops_equal_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    f = torch.tensor([0.6, 0.9, 1.2, 1.4]).view(-1, 1, 1, 1)
    h = torch.tensor([-0.5, -0.1, 0.2, 0.45]).view(-1, 1, 1, 1)
    for ours, theirs, factors in (
        (ab._brightness, TF.adjust_brightness, f),
        (ab._contrast, TF.adjust_contrast, f),
        (ab._saturation, TF.adjust_saturation, f),
        (ab._hue, TF.adjust_hue, h),
    ):
        got = ours(x.clone(), factors)
        want = torch.stack([theirs(xi, float(fi)) for xi, fi in zip(x, factors)])
        assert torch.allclose(got, want, atol=1e-5), ours.__name__
    sigma = torch.tensor([0.3, 1.0, 1.7, 2.0])
    got = ab.gaussian_blur(x, sigma, 7)
    want = torch.stack([TF.gaussian_blur(xi, [7, 7], [float(s)] * 2) for xi, s in zip(x, sigma)])
    assert torch.allclose(got, want, atol=1e-5)


def test_padding_never_leaks_into_crops_and_shapes():
    small = torch.full((3, 10, 14), 255, dtype=torch.uint8)
    large = torch.full((3, 30, 20), 255, dtype=torch.uint8)
    c = crops_config(color_jitter_p=0.0, grayscale_p=0.0, global_solarize_p=[0.0])
    for roi in (False, True):
        views = batched(c, [small, large] * 8, roi=roi)
        assert [tuple(v.shape) for v in views] == [(16, 3, 16, 16)] * 2 + [(16, 3, 8, 8)] * 2
        assert all(v.dtype == torch.uint8 for v in views)
        assert all(bool((v >= 254).all()) for v in views), roi


def test_seeds_make_it_reproducible():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=g)
    c = crops_config()
    a, b = batched(c, [img] * 4, False, seed=3), batched(c, [img] * 4, False, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    d = batched(c, [img] * 4, False, seed=4)
    assert not all(torch.equal(x, y) for x, y in zip(a, d))


def test_masks_are_the_same_in_both_modes(tiny_imagefolder):
    data = load_split(f"imagefolder:{tiny_imagefolder}", "train")
    c = crops_config(global_size=[32], local_size=[16])
    masks = MaskGenerator([0.0, 0.3], [0.0, 0.2])
    one = MaskedMultiCrop(data, MultiCropAugmentation(c), masks, 8, [32, 32], seed=1, epoch=2)
    other = MaskedMultiCrop(data, None, masks, 8, [32, 32], seed=1, epoch=2)
    collate = ab.BatchCollate(ab.BatchedMultiCrop(c))
    views, stacked, labels = collate([other[i] for i in range(4)])
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert labels.tolist() == [int(data.labels[i]) for i in range(4)]
    for i in range(4):
        assert all(torch.equal(m, s[i]) for m, s in zip(one[i][1], stacked))
    assert any(bool(s.any()) for s in stacked)


def test_auto_is_batched_on_cuda_and_small_cpu_machines(monkeypatch):
    monkeypatch.setattr(ab, "available_cpus", lambda: 2)
    assert ab.augment_mode("auto", torch.device("cpu")) == "batched"
    assert ab.augment_mode("per-image", torch.device("cpu")) == "per-image"
    monkeypatch.setattr(ab, "available_cpus", lambda: 32)
    assert ab.augment_mode("auto", torch.device("cpu")) == "per-image"
    assert ab.augment_mode("auto", torch.device("cpu"), processes=8) == "batched"
    assert ab.augment_mode("auto", torch.device("cuda", 0)) == "batched"
    assert ab.augment_mode("batched", torch.device("cpu")) == "batched"


@pytest.mark.parametrize("bad", ["gpu", "per_image"])
def test_unknown_mode_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="augment="):
        validate(PretrainConfig(augment=bad))
