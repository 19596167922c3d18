"""Layer ids for layer-wise lr decay and drop-path, shared by fine-tuning and dense tasks.

The BEiT / iBOT rule (docs/protocols.md#full-fine-tuning, docs/protocols.md#detection): parameter group
``i`` gets ``lr * decay ** (L + 1 - i)`` with ``i = 0`` for patch embed / cls / pos, ``k + 1``
for block ``k`` and ``L + 1`` for everything after the blocks (final norm, heads, necks).
"""

from __future__ import annotations

import re

import torch
from timm.layers import DropPath
from timm.models import group_parameters
from torch import nn

from ibot_bench.errors import ConfigError, UserError

STEM_PARAMS = ("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token", "norm_pre")
NO_WEIGHT_DECAY = {"cls_token", "pos_embed", "reg_token", "dist_token"}


def is_vit(backbone: nn.Module) -> bool:
    return all(hasattr(backbone, a) for a in ("blocks", "patch_embed", "cls_token"))


def backbone_layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """``(parameter name -> layer id, L)`` for a backbone; ids run 0..L, the head is L + 1.

    ViTs follow the paper's formula (BEiT): 0 for patch_embed / cls_token / pos_embed,
    ``k + 1`` for block ``k``, ``L + 1`` (the head's id) for the final norm. timm's own
    grouping (``param_groups_layer_decay`` via ``group_matcher``) puts the final norm in
    the last block's group and that group at scale 1, so the last block would get
    ``decay**0`` instead of the paper's ``decay**1``: that is why ViT ids are assigned
    here. Other timm models (CNNs) use timm's ``group_matcher`` ids.
    """
    names = [n for n, _ in backbone.named_parameters()]
    if is_vit(backbone):
        depth = len(backbone.blocks)
        ids = {}
        for n in names:
            m = re.match(r"blocks\.(\d+)\.", n)
            ids[n] = 0 if n.startswith(STEM_PARAMS) else int(m.group(1)) + 1 if m else depth + 1
        return ids, depth
    if hasattr(backbone, "group_matcher"):
        ids = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
        top = max(ids.values(), default=0)
        return {n: ids.get(n, top) for n in names}, top
    return dict.fromkeys(names, 0), 0


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly 0 -> ``rate`` over the blocks (timm ViT blocks)."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        if rate > 0:
            raise UserError("drop_path needs a ViT backbone with blocks; set drop_path=0")
        return
    rates = torch.linspace(0, rate, len(blocks)).tolist()
    for block, r in zip(blocks, rates):
        for attr in ("drop_path1", "drop_path2", "drop_path"):
            if hasattr(block, attr):
                setattr(block, attr, DropPath(r) if r > 0 else nn.Identity())


def check_layer_decay(rate: float) -> float:
    """Reject a layer decay outside (0, 1] with the paper's values as a hint."""
    if not 0.0 < rate <= 1.0:
        raise ConfigError(
            f"layer_decay must be in (0, 1] (1 = no decay), got {rate}; the paper uses "
            "0.75 for ViT-S/L and 0.65 for ViT-B"
        )
    return rate
