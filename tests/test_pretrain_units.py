"""iBOT pretraining pieces on small, hand-checkable inputs (docs/protocols.md#pretraining)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ibot_bench.encoders.vit import ViTConfig
from ibot_bench.pretrain.head import IbotHead
from ibot_bench.pretrain.loss import IbotLoss
from ibot_bench.pretrain.masking import (
    MaskGenerator,
    block_mask,
    draw_block,
    random_mask,
    sample_ratio,
)
from ibot_bench.pretrain.model import (
    block_rows,
    build_backbone,
    build_networks,
    common_parameters,
)
from ibot_bench.pretrain.optim import (
    cancel_last_layer_grads,
    clip_gradients_per_tensor,
    ema_update,
    param_groups,
)
from ibot_bench.pretrain.schedules import cosine_schedule, teacher_temp_schedule

TINY = ViTConfig(16, 1, 2, patch_size=4, img_size=16)


# ---------------------------------------------------------------- masking (docs/protocols.md#block-masking)
def test_ratio_zero_masks_nothing():
    gen = MaskGenerator([0.0], [0.0])
    for seed in range(20):
        assert not gen(random.Random(seed), (14, 14), epoch=0).any()


def test_block_mask_never_exceeds_target_and_blocks_fit():
    for seed in range(300):
        rng = random.Random(seed)
        h, w = rng.choice([(4, 4), (14, 14), (6, 9)])
        target = rng.uniform(0.1, 0.5) * h * w
        mask = block_mask(rng, h, w, target)
        assert mask.sum() <= target
        assert mask.shape == (h, w)


def test_block_shapes_within_aspect_bounds():
    """Candidate blocks: strictly smaller than the grid, area <= budget + rounding, aspect
    within [0.3, 1/0.3] up to the rounding of each side."""
    seen = 0
    for seed in range(500):
        block = draw_block(random.Random(seed), 14, 14, remaining=40)
        if block is None:
            continue
        seen += 1
        top, left, h, w = block
        assert 0 < h < 14 and 0 < w < 14 and top + h <= 14 and left + w <= 14
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (w - 0.5) / (h + 0.5) <= 1 / 0.3
        assert (h - 0.5) * (w - 0.5) <= 40
    assert seen > 400


def test_block_mask_mean_fraction_like_reference():
    """docs/protocols.md#reference-subtleties: mean masked fraction 0.2945 on 14x14 for ratio 0.3 +- 0.2."""
    fractions = []
    for seed in range(400):
        rng = random.Random(seed)
        r = sample_ratio(rng, [0.3], [0.2])
        fractions.append(float(block_mask(rng, 14, 14, r * 196).float().mean()))
    assert abs(np.mean(fractions) - 0.2945) < 0.02


def test_random_shape_exact_count_and_start_epoch():
    for seed in range(20):
        mask = random_mask(random.Random(seed), 5, 7, target=0.37 * 35)
        assert int(mask.sum()) == int(0.37 * 35)
    gen = MaskGenerator([0.5], [0.0], shape="rand", start_epoch=3)
    assert not gen(random.Random(0), (4, 4), epoch=2).any()
    assert int(gen(random.Random(0), (4, 4), epoch=3).sum()) == 8


def test_ratio_list_draws_every_entry_then_picks_one():
    values = {sample_ratio(random.Random(s), [0.0, 0.3], [0.0, 0.2]) for s in range(200)}
    assert 0.0 in values
    others = [v for v in values if v]
    assert others and all(0.1 <= v <= 0.5 for v in others)


# ---------------------------------------------------------------- loss (docs/protocols.md#loss)
def _ce(t, s):
    return float(-(t * F.log_softmax(s, -1)).sum(-1).mean())


def test_loss_pairs_masked_mean_and_unmasked_images_count_as_zero():
    torch.manual_seed(0)
    b, k, n = 3, 5, 4  # 3 images, 5 dims, 2x2 patch grid
    loss = IbotLoss(k, k, student_temp=1.0, lambda1=1.0, lambda2=1.0)
    t_cls = [torch.randn(b, k) for _ in range(2)]
    s_cls = [torch.randn(b, k) for _ in range(4)]  # 2 global + 2 local views
    t_patch = [torch.randn(b, n, k) for _ in range(2)]
    masks = [torch.zeros(b, 2, 2, dtype=torch.bool) for _ in range(2)]
    masks[0][0, 0, 0] = masks[0][0, 1, 1] = True  # image 0: 2 masked; images 1, 2: none
    masks[1][2, 0, 1] = True
    s_full = [torch.randn(b, n, k) for _ in range(2)]
    s_patch = [s_full[v][masks[v].flatten(1)] for v in range(2)]
    parts = loss(s_cls, s_patch, t_cls, t_patch, masks, teacher_temp=1.0, teacher_patch_temp=1.0)

    tp = [F.softmax(t, -1) for t in t_cls]
    pairs = [(q, v) for q in range(2) for v in range(4) if v != q]
    assert len(pairs) == 6  # 2 x (4 - 1)
    expect_cls = np.mean([_ce(tp[q], s_cls[v]) for q, v in pairs])
    assert parts.cls.item() == pytest.approx(expect_cls, rel=1e-5)

    def ce_tok(v, i, j):
        return float(-(F.softmax(t_patch[v][i, j], -1) * F.log_softmax(s_full[v][i, j], -1)).sum())

    view0 = (ce_tok(0, 0, 0) + ce_tok(0, 0, 3)) / 2 / 3  # mean over 3 images, 2 count 0
    view1 = ce_tok(1, 2, 1) / 3
    assert parts.mim.item() == pytest.approx((view0 + view1) / 2, rel=1e-5)
    assert parts.total.item() == pytest.approx(expect_cls + (view0 + view1) / 2, rel=1e-5)


def test_loss_temperatures_and_lambdas():
    torch.manual_seed(1)
    loss = IbotLoss(4, 4, student_temp=0.1, lambda1=0.5, lambda2=2.0)
    t_cls, s_cls = [torch.randn(2, 4)], [torch.randn(2, 4), torch.randn(2, 4)]
    masks = [torch.ones(2, 1, 1, dtype=torch.bool)]
    t_patch, s_patch = [torch.randn(2, 1, 4)], [torch.randn(2, 4)]
    parts = loss(s_cls, s_patch, t_cls, t_patch, masks, 0.04, 0.07)
    cls = _ce(F.softmax(t_cls[0] / 0.04, -1), s_cls[1] / 0.1)
    mim = _ce(F.softmax(t_patch[0][:, 0] / 0.07, -1), s_patch[0] / 0.1)
    assert parts.total.item() == pytest.approx(0.5 * cls + 2.0 * mim, rel=1e-5)


def test_center_update_momentum():
    loss = IbotLoss(3, 2, center_momentum=0.9, center_momentum2=0.9)
    t_cls = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])]
    t_patch = [torch.tensor([[[1.0, 0.0], [3.0, 2.0]]]), torch.zeros(1, 2, 2)]
    loss.update_center(t_cls, t_patch)
    assert torch.allclose(loss.center, 0.1 * torch.tensor([[2.0, 2.0, 2.0]]))
    # per-image mean over all patches: image A (2, 1), image B (0, 0) -> mean (1, 0.5)
    assert torch.allclose(loss.center2, 0.1 * torch.tensor([[[1.0, 0.5]]]))
    loss.update_center(t_cls, t_patch)
    assert torch.allclose(loss.center, 0.19 * torch.tensor([[2.0, 2.0, 2.0]]))


# ---------------------------------------------------------------- schedules (docs/protocols.md#optimisation, docs/protocols.md#reference-subtleties)
def test_cosine_schedule_endpoints_and_warmup():
    s = cosine_schedule(1.0, 0.1, epochs=4, iters_per_epoch=5, warmup_epochs=2)
    assert len(s) == 20
    assert s[0] == 0.0 and s[9] == pytest.approx(1.0)  # linear warm-up reaches base ...
    assert s[10] == pytest.approx(
        1.0
    )  # ... and the cosine starts at base again (docs/protocols.md#reference-subtleties)
    assert np.all(np.diff(s[:10]) > 0) and np.all(np.diff(s[10:]) < 0)
    assert s[-1] > 0.1 and s[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 9 / 10)))
    flat = cosine_schedule(0.996, 1.0, 2, 3)
    assert flat[0] == pytest.approx(0.996) and flat[-1] < 1.0


def test_teacher_temp_schedule():
    t = teacher_temp_schedule(0.04, 0.07, warmup_epochs=4, epochs=6)
    assert list(np.round(t, 4)) == [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    t2 = teacher_temp_schedule(0.04, 0.07, warmup_epochs=4, epochs=8, start_epoch=2)
    assert list(np.round(t2, 4)) == [0.04, 0.04, 0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    assert len(teacher_temp_schedule(0.04, 0.07, 30, 5)) == 5


# ---------------------------------------------------------------- optimisation (docs/protocols.md#projection-head, docs/protocols.md#optimisation)
def test_ema_update_and_common_parameters():
    student, teacher = build_networks(TINY, drop_path=0.1, out_dim=8, patch_out_dim=8,
                                      hidden_dim=8, bottleneck_dim=4)  # fmt: skip
    s_params, t_params = common_parameters(student, teacher)
    assert len(s_params) == len(list(student.parameters())) - 1  # all but masked_embed
    assert all(torch.equal(s, t) for s, t in zip(s_params, t_params))
    before = [t.clone() for t in t_params]
    with torch.no_grad():
        for s in s_params:
            s.add_(1.0)
    ema_update(t_params, s_params, 0.9)
    for b, s, t in zip(before, s_params, t_params):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)


def test_per_tensor_clipping():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> clipped to 1
    b.grad = torch.tensor([0.1, 0.0, 0.0])  # norm 0.1 -> untouched
    norms = clip_gradients_per_tensor([a, b], 1.0)
    assert torch.allclose(norms, torch.tensor([5.0, 0.1]))
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0]) / (5 + 1e-6))
    assert torch.equal(b.grad, torch.tensor([0.1, 0.0, 0.0]))


def test_param_groups_and_frozen_last_layer():
    backbone = build_backbone(TINY)
    groups = param_groups(backbone)
    names = {id(p): n for n, p in backbone.named_parameters()}
    reg = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert {"cls_token", "pos_embed", "masked_embed", "patch_embed.proj.weight"} <= reg
    assert "norm.weight" in plain and "blocks.0.attn.qkv.bias" in plain
    assert groups[1]["weight_decay"] == 0.0

    head = IbotHead(16, 8, 8, 8, 4, shared=True, norm_last_layer=False)
    names = {id(p): n for n, p in head.named_parameters()}
    assert "last_layer.weight_g" in {names[id(p)] for p in param_groups(head)[0]["params"]}
    frozen = IbotHead(16, 8, 8, 8, 4, norm_last_layer=True)
    assert "last_layer.weight_g" not in {n for n, p in frozen.named_parameters() if p.requires_grad}
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_grads(head, epoch=0, freeze_epochs=1)
    assert head.last_layer.weight_v.grad is None and head.mlp[0].weight.grad is not None


def test_head_keys_and_shared_outputs():
    head = IbotHead(16, 8, 8, 12, 4, shared=True)
    keys = set(head.state_dict())
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_g",
            "last_layer.weight_v", "last_layer2.weight_g", "last_layer2.weight_v"} <= keys  # fmt: skip
    cls, patch = torch.randn(2, 16), torch.randn(5, 16)
    c, p = head.forward_tokens(cls, patch)
    assert torch.allclose(c, head(cls), atol=1e-6) and torch.allclose(p, head(patch), atol=1e-6)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(8))


def test_student_masking_replaces_patch_embeddings():
    torch.manual_seed(0)
    vit = build_backbone(TINY)
    with torch.no_grad():
        vit.masked_embed.normal_()
    x = torch.randn(1, 3, 16, 16)
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    a = vit.forward_tokens(x, full)
    b = vit.forward_tokens(torch.randn(1, 3, 16, 16), full)
    assert torch.allclose(a, b, atol=1e-5)  # every patch replaced: the image no longer matters
    none = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert torch.allclose(vit.forward_tokens(x, none), vit.forward_tokens(x), atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_last_block_on_kept_rows_equals_the_full_block(fused):
    """The student's last block computes only the tokens the loss reads: same values, same
    gradients, same stochastic-depth draws as the full block, with any number kept per image
    (none but the CLS, all, a few)."""
    torch.manual_seed(0)
    vit = build_backbone(ViTConfig(32, 2, 2, patch_size=4, img_size=16), drop_path=0.5).train()
    x = torch.randn(4, 3, 16, 16)
    keep = torch.rand(4, 17) < 0.3
    keep[:, 0] = True
    keep[1] = True  # every token of one image
    keep[2, 1:] = False  # only the CLS of another
    outputs, grads = [], []
    for rows in (False, True):
        vit.zero_grad()
        for block in vit.blocks:
            block.attn.fused_attn = fused
        torch.manual_seed(1)
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        h = vit.blocks[:-1](h)
        out = block_rows(vit.blocks[-1], h, keep) if rows else vit.blocks[-1](h)[keep]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in vit.parameters() if p.grad is not None]))
    assert len(outputs[1]) == keep.sum()
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_forward_tokens_with_keep_returns_the_kept_final_tokens():
    torch.manual_seed(0)
    vit = build_backbone(TINY).eval()
    x = torch.randn(3, 3, 16, 16)
    mask = torch.rand(3, 4, 4) < 0.4
    keep = torch.cat([torch.ones(3, 1, dtype=torch.bool), mask.flatten(1)], 1)
    with torch.no_grad():
        full = vit.forward_tokens(x, mask)
        rows = vit.forward_tokens(x, mask, keep)
    assert torch.allclose(rows, full[keep], atol=1e-5)
