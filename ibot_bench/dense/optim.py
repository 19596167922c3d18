"""Layer-wise lr decay for mmengine optimizers (docs/protocols.md#detection, BEiT rule).

Every parameter gets ``lr = base_lr * rate ** (L + 1 - i)``: ``i = 0`` for patch embed / cls /
pos, ``k + 1`` for block ``k``, ``L + 1`` (scale 1) for the pyramid, neck and heads. No weight
decay on 1-D parameters (biases, norms), ``pos_embed`` and ``cls_token``. Use it with
``optim_wrapper=dict(constructor="LayerDecayOptimWrapperConstructor",
paramwise_cfg=dict(layer_decay_rate=0.75))``.
"""

from __future__ import annotations

from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from ibot_bench.layer_decay import check_layer_decay


def layer_decay_groups(
    model: nn.Module, base_lr: float, weight_decay: float, rate: float
) -> list[dict]:
    """Parameter groups of ``model`` (whose ``backbone`` has ``layer_ids``), one per
    (layer, decay/no-decay), each with ``lr``, ``weight_decay``, ``lr_scale``, ``layer_id``
    and ``param_names``."""
    check_layer_decay(rate)
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "layer_ids"):
        raise TypeError("layer decay needs model.backbone to be an ibot-bench EncoderBackbone")
    ids, depth = backbone.layer_ids(prefix="backbone.")
    no_wd = backbone.no_weight_decay_names(prefix="backbone.")
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = ids.get(name, depth + 1)
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in no_wd)
        scale = rate ** (depth + 1 - layer)
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "param_names": [],
                "layer_id": layer,
                "lr_scale": scale,
                "lr": base_lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine constructor applying :func:`layer_decay_groups` (``paramwise_cfg.layer_decay_rate``)."""

    def add_params(self, params: list[dict], module: nn.Module, **kwargs) -> None:
        rate = float(self.paramwise_cfg.get("layer_decay_rate", 1.0))
        wd = float(self.optimizer_cfg.get("weight_decay", 0.0))
        params.extend(layer_decay_groups(module, self.base_lr, wd, rate))
