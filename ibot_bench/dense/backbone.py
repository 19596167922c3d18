"""Any ViT encoder spec as a multi-scale backbone for mmdet / mmseg (docs/protocols.md#detection, docs/protocols.md#segmentation).

The paper's recipe ("Detection", "Semantic segmentation"): the outputs of blocks 3, 5, 7, 11
(0-based) of a 12-block ViT, reshaped to maps at the patch stride, then a pyramid to strides
4 / 8 / 16 / 32 — for 16 px patches ConvT2x2-BN-GELU-ConvT2x2, ConvT2x2, identity and
MaxPool2x2. Other patch sizes get the same rule per level: an upsampling factor ``2^n`` is
``n`` ConvT2x2 with BN-GELU between them, a downsampling factor is one MaxPool (so ViT-T/8
maps go ConvT2x2, identity, MaxPool2, MaxPool4). Position embeddings are interpolated once to
the training crop (``img_size``) and, per forward, to any other input size; missing
interpolation is what cost the reference's linear ADE20K ~19 points (docs/protocols.md#known-problems-of-the-reference).

This module only needs torch; :mod:`ibot_bench.dense.register` puts it in the registries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ibot_bench.encoders import load_encoder
from ibot_bench.encoders.vit import ViTEncoder, interpolate_pos_embed_offset
from ibot_bench.errors import ConfigError, UserError
from ibot_bench.layer_decay import backbone_layer_ids, set_drop_path

PAPER_BLOCKS_12 = (3, 5, 7, 11)


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Blocks 3/5/7/11 of 12, scaled: the blocks ending 1/3, 1/2, 2/3 and all of the depth.

    ViT-L (24 blocks) gets 7/11/15/23 as in BEiT. Depths where the scaled blocks collide
    (fewer than 4 blocks) have no default: the caller must set ``out_indices``.
    """
    if depth == 12:
        return PAPER_BLOCKS_12
    picks = tuple(max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1.0))
    if len(set(picks)) != 4:
        raise ConfigError(
            f"a {depth}-block encoder has no default dense output blocks (the paper's 3/5/7/11 "
            "of 12 scale to repeated blocks); set the option out_indices, e.g. "
            f"out_indices=[{', '.join(str(i) for i in range(max(0, depth - 4), depth))}]"
            if depth >= 4
            else f"a {depth}-block encoder has no default dense output blocks; set "
            f"out_indices to {min(depth, 4)} block indices in 0..{depth - 1}"
        )
    return picks


def _level(dim: int, factor: float, norm: str) -> nn.Module:
    """Resample a (B, D, h, w) map by ``factor`` (a power of two): ConvT chain or MaxPool."""
    if factor == 1:
        return nn.Identity()
    if factor < 1:
        k = round(1 / factor)
        return nn.MaxPool2d(kernel_size=k, stride=k)
    steps = round(math.log2(factor))
    layers: list[nn.Module] = []
    for i in range(steps):
        if i:
            layers += [nn.SyncBatchNorm(dim) if norm == "SyncBN" else nn.BatchNorm2d(dim)]
            layers += [nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class EncoderBackbone(nn.Module):
    """``encoder`` (any ViT spec: ``ibot:``, ``dino:``, ``timm:``, ``random:``) -> 4 maps.

    Args:
        encoder: encoder spec, loaded with :func:`ibot_bench.encoders.load_encoder`.
        out_indices: 0-based blocks to output (default: :func:`default_out_indices`).
        out_strides: stride of each output map; ``None`` keeps every map at the patch stride
            (the linear segmentation protocol). Default 4/8/16/32 (the paper's pyramid).
        final_norm: apply the encoder's final LayerNorm to each output (linear protocol).
        frozen: no gradients into the encoder and it stays in eval mode.
        drop_path: stochastic depth rate, rising linearly over the blocks.
        img_size: training crop (H, W): pos_embed is resized to it once, at load.
        norm: ``BN`` or ``SyncBN`` for the pyramid's BatchNorm.
    """

    def __init__(
        self,
        encoder: str,
        out_indices: Sequence[int] | None = None,
        out_strides: Sequence[int] | None = (4, 8, 16, 32),
        final_norm: bool = False,
        frozen: bool = False,
        drop_path: float = 0.0,
        img_size: int | Sequence[int] | None = None,
        norm: str = "BN",
        allow_partial: bool = False,
    ) -> None:
        super().__init__()
        enc = load_encoder(encoder, allow_partial=allow_partial)
        if not isinstance(enc, ViTEncoder):
            raise UserError(
                f"dense tasks need a ViT encoder (patch tokens + blocks); {encoder!r} loads "
                f"a {type(enc).__name__} ({enc.info.arch})."
            )
        self.encoder = enc
        self.spec = encoder
        depth = enc.num_blocks
        self.out_indices = tuple(default_out_indices(depth) if out_indices is None else out_indices)
        bad = [i for i in self.out_indices if not 0 <= i < depth]
        if bad:
            raise ConfigError(
                f"out_indices {list(self.out_indices)}: {bad} not in 0..{depth - 1} for this "
                f"{depth}-block encoder"
            )
        self.final_norm = final_norm
        self.frozen = frozen
        self.embed_dim = enc.embed_dim
        self.patch_size = enc.patch_size
        if img_size is not None:
            self._resize_pos_embed(img_size)
        if frozen:
            enc.requires_grad_(False)
        else:
            set_drop_path(enc.model, drop_path)
        strides = out_strides or [self.patch_size] * len(self.out_indices)
        if len(strides) != len(self.out_indices):
            raise ConfigError(
                f"out_strides {list(strides)} and out_indices {list(self.out_indices)} differ "
                "in length"
            )
        for s in strides:
            factor = self.patch_size / s
            if factor <= 0 or abs(math.log2(factor) - round(math.log2(factor))) > 1e-9:
                raise ConfigError(
                    f"out_stride {s} is not the patch size {self.patch_size} times a power of 2"
                )
        self.out_strides = tuple(int(s) for s in strides)
        self.levels = nn.ModuleList(
            _level(self.embed_dim, self.patch_size / s, norm) for s in self.out_strides
        )

    @property
    def num_layers(self) -> int:
        return self.encoder.num_blocks

    def _resize_pos_embed(self, img_size: int | Sequence[int]) -> None:
        """Interpolate pos_embed to the training crop's grid, once (DINO offset resize)."""
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        model = self.encoder.model
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ConfigError(
                f"crop size {size} is not divisible by the patch size {self.patch_size}"
            )
        new = (size[0] // self.patch_size, size[1] // self.patch_size)
        old = tuple(model.patch_embed.grid_size)
        if new == old:
            return
        with torch.no_grad():
            pos = interpolate_pos_embed_offset(
                model.pos_embed.data, new, old, model.num_prefix_tokens
            )
        model.pos_embed = nn.Parameter(pos)
        model.patch_embed.img_size = size
        model.patch_embed.grid_size = new
        model.patch_embed.num_patches = new[0] * new[1]

    def layer_ids(self, prefix: str = "") -> tuple[dict[str, int], int]:
        """``(name -> layer id, L)`` for layer decay: the encoder by the paper's rule,
        the pyramid at ``L + 1`` like the heads."""
        ids, depth = backbone_layer_ids(self.encoder.model)
        out = {f"{prefix}encoder.model.{k}": v for k, v in ids.items()}
        for name, _ in self.named_parameters():
            out.setdefault(prefix + name, depth + 1)
        return out, depth

    def no_weight_decay_names(self, prefix: str = "") -> set[str]:
        return {f"{prefix}encoder.model.{n}" for n in ("pos_embed", "cls_token")}

    def train(self, mode: bool = True) -> EncoderBackbone:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def init_weights(self) -> None:
        """Weights come from the encoder spec; mmengine must not re-initialise them."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.encoder.forward_features(x, dense_blocks=self.out_indices)["maps"]
        if self.final_norm:
            norm = self.encoder.model.norm
            maps = [norm(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for m in maps]
        # contiguous: mmcv's CPU RoIAlign is wrong on channels-last inputs (mmcv#2203)
        return tuple(level(m).contiguous() for level, m in zip(self.levels, maps))
