"""Masked ViT backbone and the student / teacher networks (docs/protocols.md#pretraining).

The backbone is timm's ViT (via :class:`IbotVisionTransformer`: patch embed, blocks, norm,
DINO's pos-embed interpolation) plus the student's ``masked_embed`` token. Networks talk to
the backbone only through :class:`MaskableBackbone`, so a Swin can be added behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from ibot_bench.encoders.vit import IbotVisionTransformer, ViTConfig, vit_kwargs
from ibot_bench.pretrain.head import IbotHead


class MaskableBackbone(Protocol):
    """What the iBOT networks need from a backbone."""

    embed_dim: int

    def forward_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class MaskedVisionTransformer(IbotVisionTransformer):
    """iBOT ViT with BEiT-style masking (docs/protocols.md#mask-tokens): masked patch embeddings are replaced by the
    learnable, zero-initialised ``masked_embed`` right after the patch conv, *before* the
    CLS token and position embeddings are added; the student sees the full sequence."""

    def __init__(self, *args: Any, masked_embed: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.masked_embed = nn.Parameter(torch.zeros(1, self.embed_dim)) if masked_embed else None

    def forward_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-norm tokens (B, 1 + N, D); ``mask`` is bool (B, H/p, W/p), True = masked.

        With ``keep`` (bool (B, 1 + N)) only the kept tokens come back, as (R, D) rows in
        row-major order, and the last block computes only those rows (:func:`block_rows`):
        the loss reads the CLS of every crop and the masked patches of the global ones."""
        x = self.patch_embed(x)  # (B, H, W, D): dynamic_img_size keeps the grid
        if mask is not None:
            if self.masked_embed is None:
                raise RuntimeError("this backbone has no masked_embed (a teacher?)")
            x = torch.where(mask.unsqueeze(-1), self.masked_embed.to(x.dtype), x)
        fused = fused_attention(x.device, 1 + x.shape[1] * x.shape[2])
        for block in self.blocks:
            block.attn.fused_attn = fused
        x = self._pos_embed(x)
        x = self.norm_pre(self.patch_drop(x))
        if keep is None or not rows_supported(self.blocks[-1]):
            x = self.norm(self.blocks(x))
            return x if keep is None else x[keep]
        x = self.blocks[:-1](x)
        return self.norm(block_rows(self.blocks[-1], x, keep))


def rows_supported(block: nn.Module) -> bool:
    """Whether :func:`block_rows` knows ``block``'s computation: timm's pre-norm ``Block``
    with its plain ``Attention`` (no gate)."""
    return (
        type(block) is Block
        and type(block.attn) is Attention
        and getattr(block.attn, "gate", None) is None
    )


def block_rows(block: Block, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``block(x)[keep]`` without computing the other rows: keys and values come from every
    token, queries, attention output, residuals and MLP only from the kept ones. Same maths,
    same random draws (stochastic depth draws one factor per image, as the block does);
    in the last block this skips about 3/4 of the FLOPs of every token the loss never reads
    (docs/protocols.md#compute-profile)."""
    attn = block.attn
    b, s, d = x.shape
    counts = keep.sum(1)
    width = int(counts.max())
    # kept positions first, in ascending order; the tail of each row is padding
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=x.device) < counts[:, None]
    qkv = attn.qkv(block.norm1(x)).reshape(b, s, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q = q.gather(2, order[:, None, :, None].expand(-1, attn.num_heads, -1, attn.head_dim))
    if attn.fused_attn:
        dropout = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    else:
        out = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)) @ v
    out = out.transpose(1, 2).reshape(b, width, -1)[valid]
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    image = torch.arange(b, device=x.device)[:, None].expand(b, width)[valid]
    rows = x.gather(1, order[..., None].expand(-1, -1, d))[valid]
    rows = rows + _drop_per_image(block.drop_path1, block.ls1(out), image, b)
    return rows + _drop_per_image(
        block.drop_path2, block.ls2(block.mlp(block.norm2(rows))), image, b
    )


def _drop_per_image(
    drop: nn.Module, branch: torch.Tensor, image: torch.Tensor, images: int
) -> torch.Tensor:
    """``branch`` rows (R, D) of images ``image`` after stochastic depth: the module draws
    its per-image factors (0 or 1/keep, in the branch's dtype) exactly as on (B, S, D)."""
    if isinstance(drop, nn.Identity):
        return branch
    return branch * drop(branch.new_ones(images, 1))[image]


def fused_attention(device: torch.device, tokens: int) -> bool:
    """SDPA (True) or the explicit softmax(q k^T) v (False) for this forward: the same
    attention, the faster kernel. Measured on a 2-core Zen 5 (head dim 64): on CPUs the
    explicit form is faster in bf16, with gradients (1.6-2.4x, SDPA's backward is slow) and
    without (the teacher's forward: 1.06x for ViT-S/16 at 224, 1.12x for the quick model);
    in fp32 it is 1.3-1.6x faster with gradients for sequences under 64 tokens, SDPA
    1.1-1.4x faster for longer ones, and the two are even without gradients."""
    if device.type != "cpu":
        return True
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32:
        return False
    return not torch.is_grad_enabled() or tokens >= 64


def build_backbone(
    cfg: ViTConfig, drop_path: float = 0.0, masked_embed: bool = True
) -> MaskedVisionTransformer:
    """Same shape arguments as :func:`ibot_bench.encoders.vit.build_vit`; drop-path rises
    linearly 0 -> ``drop_path`` over depth (docs/protocols.md#backbone, timm's rule)."""
    return MaskedVisionTransformer(
        **vit_kwargs(cfg), drop_path_rate=drop_path, masked_embed=masked_embed
    )


def size_groups(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive crops with the same size: each run is one forward."""
    groups, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


@dataclass
class StudentOutput:
    cls: list[torch.Tensor]  # per view (B, out_dim), global views first
    patch: list[torch.Tensor]  # per global view, logits of its masked tokens (M_v, patch_out_dim)


@dataclass
class TeacherOutput:
    cls: list[torch.Tensor]  # per global view (B, out_dim)
    patch: list[torch.Tensor]  # per global view (B, N, patch_out_dim)


class IbotStudent(nn.Module):
    """Backbone + head over all crops in one call (one DDP forward per step).

    Global crops are masked and give CLS logits plus patch logits of the masked tokens
    (the only ones the MIM loss reads); local crops are unmasked and only their CLS goes
    through the head (the reference projects every local token and discards them, docs/protocols.md#compute-profile)."""

    def __init__(self, backbone: MaskedVisionTransformer, head: IbotHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(
        self,
        global_crops: list[torch.Tensor],
        masks: list[torch.Tensor],
        local_crops: list[torch.Tensor],
    ) -> StudentOutput:
        cls_out: list[torch.Tensor] = []
        patch_out: list[torch.Tensor] = []
        for start, end in size_groups(global_crops):
            m = torch.cat(masks[start:end])
            flat_mask = m.flatten(1)
            keep = torch.cat([flat_mask.new_ones(len(m), 1), flat_mask], 1)
            rows = self.backbone.forward_tokens(torch.cat(global_crops[start:end]), m, keep)
            # rows come image by image (CLS, then its masked patches); the head wants every
            # CLS first, then the masked patches in the same image-major order
            masked = flat_mask.sum(1)
            first = torch.cumsum(masked + 1, 0) - (masked + 1)
            is_cls = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
            is_cls[first] = True
            order = torch.cat([first, (~is_cls).nonzero().squeeze(1)])
            cls, patch = self.head.forward_rows(rows.index_select(0, order), len(m))
            cls_out += list(cls.chunk(end - start))
            patch_out += list(patch.split(masked.view(end - start, -1).sum(1).tolist()))
        for start, end in size_groups(local_crops):
            crops = torch.cat(local_crops[start:end])
            ph, pw = self.backbone.patch_embed.patch_size
            tokens = 1 + (crops.shape[-2] // ph) * (crops.shape[-1] // pw)
            keep = torch.zeros(len(crops), tokens, dtype=torch.bool, device=crops.device)
            keep[:, 0] = True
            cls, _ = self.head.forward_tokens(self.backbone.forward_tokens(crops, keep=keep), None)
            cls_out += list(cls.chunk(end - start))
        return StudentOutput(cls_out, patch_out)


class IbotTeacher(nn.Module):
    """Backbone (no ``masked_embed``, no drop-path) + head on the unmasked global crops."""

    def __init__(self, backbone: MaskedVisionTransformer, head: IbotHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, global_crops: list[torch.Tensor]) -> TeacherOutput:
        cls_out: list[torch.Tensor] = []
        patch_out: list[torch.Tensor] = []
        for start, end in size_groups(global_crops):
            tokens = self.backbone.forward_tokens(torch.cat(global_crops[start:end]))
            cls, patch = self.head.forward_sequence(tokens)
            cls_out += list(cls.chunk(end - start))
            patch_out += list(patch.chunk(end - start))
        return TeacherOutput(cls_out, patch_out)


def build_networks(
    vit: ViTConfig,
    *,
    drop_path: float,
    out_dim: int,
    patch_out_dim: int,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    shared_head: bool = True,
    shared_head_teacher: bool = True,
    norm_last_layer: bool = True,
) -> tuple[IbotStudent, IbotTeacher]:
    """Student and teacher with identical starting weights on their common parameters
    (the teacher is loaded from the student, docs/protocols.md#projection-head); the teacher never gets gradients."""
    head = partial(
        IbotHead,
        vit.embed_dim,
        out_dim,
        patch_out_dim,
        hidden_dim,
        bottleneck_dim,
        norm_last_layer=norm_last_layer,
    )
    student = IbotStudent(build_backbone(vit, drop_path, True), head(shared=shared_head))
    teacher = IbotTeacher(build_backbone(vit, 0.0, False), head(shared=shared_head_teacher))
    teacher.load_state_dict(
        {k: v for k, v in student.state_dict().items() if k in teacher.state_dict()},
        strict=False,
    )
    if not shared_head_teacher and shared_head:  # separate teacher patch layer starts equal
        teacher.head.last_layer2.load_state_dict(student.head.last_layer.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def common_parameters(
    student: nn.Module, teacher: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters whose names exist in both networks (EMA pairs, docs/protocols.md#projection-head), in matching order."""
    teacher_params = dict(teacher.named_parameters())
    pairs = [(p, teacher_params[n]) for n, p in student.named_parameters() if n in teacher_params]
    return [s for s, _ in pairs], [t for _, t in pairs]
