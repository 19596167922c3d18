"""Layer ids for layer-wise lr decay and drop-path, shared by fine-tuning and dense tasks.

The BEiT / iBOT rule (docs/protocols.md#full-fine-tuning, docs/protocols.md#detection): parameter group
``i`` gets ``lr * decay ** (L + 1 - i)`` with ``i = 0`` for patch embed / cls / pos, ``k + 1``
for block ``k`` and ``L + 1`` for everything after the blocks (final norm, heads, necks).

Any timm model (:func:`layer_plan`): ViTs by that rule (mode ``vit-blocks``); other models
whose blocks timm can group (``model.group_matcher()``, e.g. ResNets, ConvNeXts,
EfficientNets) by timm's grouping, the same formula over its groups (``timm-group-matcher``);
anything else in one lr group (``none``). Drop-path (:func:`set_drop_path`) rises over the
residual blocks of any model whose blocks have a drop-path slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from timm.layers import DropPath
from timm.models import group_parameters
from torch import nn

from ibot_bench.errors import ConfigError

STEM_PARAMS = ("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token", "norm_pre")
NO_WEIGHT_DECAY = {"cls_token", "pos_embed", "reg_token", "dist_token"}


def is_vit(backbone: nn.Module) -> bool:
    return all(hasattr(backbone, a) for a in ("blocks", "patch_embed", "cls_token"))


@dataclass(frozen=True)
class LayerPlan:
    """Layer ids of a backbone's parameters (0..L; the head is L + 1) and how they were made.

    ``mode``: ``vit-blocks`` (the paper's rule for ViTs), ``timm-group-matcher`` (timm's
    ``group_matcher`` groups of a non-ViT model) or ``none`` (one lr group: no blocks known).
    """

    ids: dict[str, int]
    depth: int
    mode: str


def layer_plan(backbone: nn.Module) -> LayerPlan:
    """Layer ids of every parameter of ``backbone`` for layer-wise lr decay.

    ViTs follow the paper's formula (BEiT): 0 for patch_embed / cls_token / pos_embed,
    ``k + 1`` for block ``k``, ``L + 1`` (the head's id) for the final norm. timm's own
    grouping (``param_groups_layer_decay`` via ``group_matcher``) puts the final norm in
    the last block's group and that group at scale 1, so the last block would get
    ``decay**0`` instead of the paper's ``decay**1``: that is why ViT ids are assigned
    here. Other timm models use timm's ``group_matcher(coarse=False)`` ids (stem 0, then
    one id per block); a model without one (or with a single group) gets one id, 0, and
    with L = 0 the new head alone sits one decay step above it: mode ``none`` (for
    callers, layer decay is off then).
    """
    names = [n for n, _ in backbone.named_parameters()]
    if is_vit(backbone):
        depth = len(backbone.blocks)
        ids = {}
        for n in names:
            m = re.match(r"blocks\.(\d+)\.", n)
            ids[n] = 0 if n.startswith(STEM_PARAMS) else int(m.group(1)) + 1 if m else depth + 1
        return LayerPlan(ids, depth, "vit-blocks")
    if hasattr(backbone, "group_matcher"):
        try:
            grouped = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
        except (NotImplementedError, TypeError, AttributeError):
            grouped = {}
        top = max(grouped.values(), default=0)
        if top > 0:
            return LayerPlan({n: grouped.get(n, top) for n in names}, top, "timm-group-matcher")
    return LayerPlan(dict.fromkeys(names, 0), 0, "none")


def backbone_layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """``(parameter name -> layer id, L)`` for a backbone; ids run 0..L, the head is L + 1.

    See :func:`layer_plan` (this is its ids and depth).
    """
    plan = layer_plan(backbone)
    return plan.ids, plan.depth


DROP_PATH_SLOTS = ("drop_path1", "drop_path2", "drop_path")


def drop_path_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The residual blocks of ``backbone`` that have a drop-path slot, in depth order.

    timm ViTs: ``blocks``. Other timm models: every module with a ``drop_path`` /
    ``drop_path1`` / ``drop_path2`` attribute that is a :class:`DropPath`, an identity or
    None (ResNet blocks hold None when built without drop-path and skip it then).
    """
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and is_vit(backbone):
        return list(blocks)
    return [m for m in backbone.modules() if any(_is_slot(m, a) for a in DROP_PATH_SLOTS)]


def _is_slot(module: nn.Module, attr: str) -> bool:
    if not hasattr(module, attr):
        return False
    slot = getattr(module, attr)
    return slot is None or isinstance(slot, DropPath | nn.Identity)


def set_drop_path(backbone: nn.Module, rate: float) -> int:
    """Stochastic depth rising linearly 0 -> ``rate`` over the residual blocks.

    Returns the number of blocks given a drop-path slot; 0 when the model has none (then
    ``rate`` cannot apply: callers record that, see :func:`drop_path_blocks`).
    """
    blocks = drop_path_blocks(backbone)
    if not blocks:
        return 0
    rates = torch.linspace(0, rate, len(blocks)).tolist()
    for block, r in zip(blocks, rates):
        for attr in DROP_PATH_SLOTS:
            if _is_slot(block, attr):
                setattr(block, attr, DropPath(r) if r > 0 else nn.Identity())
    return len(blocks)


def check_layer_decay(rate: float) -> float:
    """Reject a layer decay outside (0, 1] with the paper's values as a hint."""
    if not 0.0 < rate <= 1.0:
        raise ConfigError(
            f"layer_decay must be in (0, 1] (1 = no decay), got {rate}; the paper uses "
            "0.75 for ViT-S/L and 0.65 for ViT-B"
        )
    return rate
