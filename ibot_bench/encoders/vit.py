"""ViT backbones as in iBOT (docs/protocols.md#backbone), built from timm, and the ViT encoder wrapper."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ibot_bench.encoders.base import Encoder, EncoderInfo
from ibot_bench.errors import CheckpointError, UserError

# name -> (width, depth, heads)
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}

PosInterp = Literal["dino_offset", "exact_size"]


@dataclass(frozen=True)
class ViTConfig:
    """Shape of an iBOT-style ViT; ``img_size`` is the trained size (sets the pos-embed grid)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    in_chans: int = 3

    @property
    def name(self) -> str:
        for arch, (width, depth, heads) in VIT_ARCHS.items():
            if (width, depth, heads) == (self.embed_dim, self.depth, self.num_heads):
                return f"{arch}_patch{self.patch_size}"
        return (
            f"vit(dim={self.embed_dim},depth={self.depth},heads={self.num_heads},"
            f"patch={self.patch_size})"
        )


def parse_vit_arch(arch: str) -> ViTConfig:
    """``vit_small``, ``vit_small_patch8``, ... -> :class:`ViTConfig`."""
    m = re.fullmatch(r"(vit_[a-z]+)(?:_patch(\d+))?", arch)
    if not m or m.group(1) not in VIT_ARCHS:
        known = ", ".join(VIT_ARCHS)
        raise UserError(
            f"unknown architecture {arch!r}: expected one of {known}, optionally with a patch "
            "size suffix such as vit_small_patch8."
        )
    width, depth, heads = VIT_ARCHS[m.group(1)]
    patch = int(m.group(2) or 16)
    if patch < 1:
        raise UserError(f"patch size must be >= 1 in {arch!r}, e.g. {m.group(1)}_patch16")
    return ViTConfig(width, depth, heads, patch_size=patch)


def interpolate_pos_embed_offset(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix: int = 1,
) -> torch.Tensor:
    """Bicubic pos-embed resize with DINO/iBOT's offset trick (docs/protocols.md#reference-subtleties).

    The reference passes ``scale_factor=(new + 0.1) / old`` to ``F.interpolate``
    instead of a target size; that changes the sampling grid slightly (final CLS at
    96 px differs by ~0.01), so we keep it to reproduce reference numbers. Unlike
    the reference, height and width are not swapped for non-square inputs.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    scale = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, grid], dim=1)


class IbotVisionTransformer(VisionTransformer):
    """timm's ViT with a choice of pos-embed interpolation.

    ``pos_embed_interp="dino_offset"`` (default) matches the iBOT/DINO reference;
    ``"exact_size"`` uses timm's ``resample_abs_pos_embed`` to the exact grid. Initial
    weights follow the reference (docs/protocols.md#backbone): timm's, but ``cls_token``
    truncated-normal with std 0.02 like ``pos_embed``.
    """

    def __init__(self, *args: Any, pos_embed_interp: PosInterp = "dino_offset", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pos_embed_interp = pos_embed_interp
        if self.cls_token is not None:  # timm draws it with std 1e-6; the reference with 0.02
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed_interp == "exact_size" or self.pos_embed is None or x.dim() != 4:
            return super()._pos_embed(x)
        batch, h, w, dim = x.shape
        pos = interpolate_pos_embed_offset(
            self.pos_embed, (h, w), tuple(self.patch_embed.grid_size), self.num_prefix_tokens
        )
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return self.pos_drop(x + pos)


def vit_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """timm ``VisionTransformer`` arguments of an iBOT ViT (docs/protocols.md#backbone): pre-norm,
    LayerNorm eps 1e-6, qkv bias, no layer scale, CLS token, no classifier, any input size."""
    return {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_chans,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "norm_layer": partial(nn.LayerNorm, eps=1e-6),
        "num_classes": 0,
        "global_pool": "token",
        "dynamic_img_size": True,
    }


def build_vit(cfg: ViTConfig, pos_embed_interp: PosInterp = "dino_offset") -> IbotVisionTransformer:
    """An iBOT ViT for evaluation (see :func:`vit_kwargs`)."""
    return IbotVisionTransformer(**vit_kwargs(cfg), pos_embed_interp=pos_embed_interp)


def _timm_hint(state: Mapping[str, torch.Tensor]) -> str:
    """A timm name for weights of a well-known non-ViT layout (DINO's and iBOT's releases)."""
    if "layer4.0.conv3.weight" in state:  # torchvision ResNet-50 (DINO's ResNet-50 release)
        blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layer3."))
        name = {6: "resnet50", 23: "resnet101", 36: "resnet152"}.get(blocks, "resnet50")
        return f", e.g. timm:{name}:PATH (these are ResNet weights)"
    if any(k.startswith("layers.") and ".attn.relative_position" in k for k in state):
        return ", e.g. timm:swin_tiny_patch4_window7_224:PATH (these are Swin weights)"
    return ""


def _num_heads(dim: int, args: Mapping[str, Any], source: str) -> int:
    """Attention heads of a width-``dim`` ViT, which its weights' shapes do not tell: from
    ``args.arch`` or ``args.num_heads``, else the iBOT/DINO/DeiT width's own (ViT-T/S/B/L).
    Any other width without a count is an error: a guess would give wrong features silently."""
    arch = str(args.get("arch", ""))
    if arch in VIT_ARCHS:
        width, _, heads = VIT_ARCHS[arch]
        if width != dim:
            raise CheckpointError(
                f"{source}: the checkpoint's args say arch={arch!r} (width {width}) but its "
                f"weights have width {dim}; the file is inconsistent. Re-save it or fix args.arch."
            )
        return heads
    if int(args.get("num_heads", 0) or 0) > 0:  # custom widths (ibot-bench pretrain saves it)
        return int(args["num_heads"])
    standard = {width: heads for width, _, heads in VIT_ARCHS.values()}
    if dim in standard:
        return standard[dim]
    widths = ", ".join(f"{w} -> {h}" for w, h in standard.items())
    raise CheckpointError(
        f"{source}: the number of attention heads of this width-{dim} ViT cannot be read off "
        f"its weights, and the file names none (no args.arch / args.num_heads; standard widths: "
        f"{widths}). Re-save it with the count: torch.save({{'state_dict': sd, 'args': "
        "{'num_heads': N}}, 'weights.pth')."
    )


def infer_vit_config(
    state: Mapping[str, torch.Tensor], args: Mapping[str, Any], source: str = "checkpoint"
) -> ViTConfig:
    """Read a ViT's shape off its (prefix-stripped) weights of file ``source``; ``args`` (or
    the standard width) names the heads (:func:`_num_heads`).

    Width from ``cls_token``, depth from block indices, patch size from the patch
    conv, trained size from ``pos_embed``.
    """
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    if any(k not in state for k in needed):
        arch = args.get("arch", "")
        hint = f" (its args say arch={arch!r})" if arch else ""
        raise CheckpointError(
            f"{source}: the weights do not look like an iBOT/DINO ViT{hint}: missing "
            f"{[k for k in needed if k not in state]} (keys start with {sorted(state)[:5]}). "
            f"For other architectures use timm:NAME:PATH{_timm_hint(state)}."
        )
    dim = state["cls_token"].shape[-1]
    proj = state["patch_embed.proj.weight"]
    patch = proj.shape[-1]
    depth = 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
    )
    n_patches = state["pos_embed"].shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches or depth == 0:
        raise CheckpointError(
            f"{source}: cannot infer the ViT shape: pos_embed has {n_patches} patch positions "
            f"(not a square grid) or no blocks.N keys (depth {depth})."
        )
    heads = _num_heads(dim, args, source)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    return ViTConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        patch_size=patch,
        img_size=side * patch,
        mlp_ratio=fc1.shape[0] / dim if fc1 is not None else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        in_chans=proj.shape[1],
    )


def check_blocks(n_last_blocks: int, dense_blocks: tuple[int, ...], num_blocks: int) -> list[int]:
    """Validate ``n_last_blocks`` (0 = none); ``dense_blocks`` as 0-based indices (negatives
    from the end)."""
    if not 0 <= n_last_blocks <= num_blocks:
        raise UserError(
            f"n_last_blocks={n_last_blocks} must be in 0..{num_blocks} for this "
            f"{num_blocks}-block encoder; leave features.n_last_blocks unset to use the last "
            f"min(4, depth) = {min(4, num_blocks)} blocks"
        )
    dense = []
    for b in dense_blocks:
        if not -num_blocks <= b < num_blocks:
            raise UserError(f"dense block {b} out of range for a {num_blocks}-block encoder")
        dense.append(b % num_blocks)
    return dense


class ViTEncoder(Encoder):
    """Wraps a timm ViT-like model (``blocks``, ``norm``, ``forward_intermediates``).

    ``head_state`` holds the iBOT/DINO projection head weights when the checkpoint
    had them (see :func:`ibot_bench.encoders.head.build_head`). For iBOT ViTs,
    ``encoder.model.pos_embed_interp`` picks the pos-embed resize ("dino_offset" or
    "exact_size").
    """

    def __init__(
        self,
        model: nn.Module,
        info: EncoderInfo,
        head_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self.head_state = head_state
        self.embed_dim = int(model.embed_dim)
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_blocks = len(model.blocks)
        self.cls_token = getattr(model, "cls_token", None) is not None
        self.block_features = True
        self.plain_vit = isinstance(getattr(model, "pos_embed", None), torch.Tensor) and hasattr(
            model.patch_embed, "grid_size"
        )

    def forward_features(
        self,
        x: torch.Tensor,
        n_last_blocks: int = 1,
        dense_blocks: tuple[int, ...] = (),
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encoder features in one forward pass (see :meth:`Encoder.forward_features`).

        ``maps`` are the raw block outputs (final norm NOT applied), reshaped to
        (B, D, H/p, W/p), as dense heads expect; ``cls_last_n`` applies the final
        norm to each block's output like iBOT's ``get_intermediate_layers``.
        """
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            p = self.patch_size
            side = max(h, w)
            sizes = sorted({max(p, side // p * p), -(-side // p) * p})
            raise UserError(
                f"input size {h}x{w} is not divisible by the patch size {p} of this encoder; "
                f"use a multiple of {p}, e.g. {' or '.join(map(str, sizes))} (features.img_size for "
                "the frozen tasks, img_size for finetune)"
            )
        dense = check_blocks(n_last_blocks, dense_blocks, self.num_blocks)
        last = list(range(self.num_blocks - n_last_blocks, self.num_blocks))
        take = sorted(set(last) | set(dense))
        m = self.model
        if take:
            final, inter = m.forward_intermediates(
                x, indices=take, return_prefix_tokens=True, norm=False, output_fmt="NLC"
            )
        else:
            final, inter = m.forward_features(x), []
        by_block = dict(zip(take, inter))
        npt = m.num_prefix_tokens

        def full(i: int) -> torch.Tensor:
            tokens, prefix = by_block[i] if npt else (by_block[i], None)
            return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)

        grid = (h // self.patch_size, w // self.patch_size)
        maps = []
        for i in dense:
            tokens = full(i)[:, npt:]
            maps.append(tokens.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous())
        cls = m.forward_head(final, pre_logits=True)
        per_block = [m.forward_head(m.norm(full(i)), pre_logits=True) for i in last]
        return {
            "cls": cls,
            "patch_mean": final[:, npt:].mean(dim=1),
            "cls_last_n": torch.cat(per_block, dim=-1) if per_block else cls[:, :0],
            "maps": maps,
        }
