"""Any timm model as an :class:`Encoder`: ViTs through :class:`ViTEncoder`, others (CNNs) here."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from ibot_bench.encoders.base import Encoder, EncoderInfo
from ibot_bench.encoders.vit import ViTEncoder, check_blocks
from ibot_bench.errors import UserError


class TimmEncoder(Encoder):
    """A timm model without tokens (e.g. a ResNet).

    ``cls`` and ``patch_mean`` are both the pooled pre-logits (no CLS token:
    ``cls_token=False``); there is no CLS-like feature per block (``block_features=False``),
    so ``cls_last_n`` is empty by default (n=0) and the pooled output for n=1; ``maps`` come
    from ``forward_intermediates`` (block indices are its feature levels,
    ``model.feature_info``; channels differ per level), not the plain-ViT token layout the
    dense tasks need (``plain_vit=False``). ``patch_size`` is the final stride.
    """

    cls_token = False
    block_features = False
    plain_vit = False

    def __init__(
        self, model: nn.Module, info: EncoderInfo, head_state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self.head_state = head_state
        self.embed_dim = int(model.num_features)
        feature_info = getattr(model, "feature_info", None) or [{"reduction": 32}]
        self.patch_size = int(feature_info[-1].get("reduction", 32))
        self.num_blocks = len(feature_info)

    def forward_features(
        self,
        x: torch.Tensor,
        n_last_blocks: int = 1,
        dense_blocks: tuple[int, ...] = (),
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Pooled features (and feature-level maps) in one forward pass."""
        dense = check_blocks(1, dense_blocks, self.num_blocks)
        if n_last_blocks not in (0, 1):
            raise UserError(
                f"{self.info.spec}: cls_last_n with n_last_blocks={n_last_blocks} needs a model "
                "with a CLS token per block (a ViT); this model has pooled features only: leave "
                "features.n_last_blocks unset (or use 0 or 1)."
            )
        maps: list[torch.Tensor] = []
        if dense:
            if not hasattr(self.model, "forward_intermediates"):
                raise UserError(f"{self.info.spec}: timm model has no forward_intermediates")
            take = sorted(set(dense))
            final, inter = self.model.forward_intermediates(x, indices=take)
            by_level = dict(zip(take, inter))
            maps = [by_level[b].contiguous() for b in dense]
        else:
            final = self.model.forward_features(x)
        pooled = self.model.forward_head(final, pre_logits=True)
        last = pooled if n_last_blocks == 1 else pooled[:, :0]
        return {"cls": pooled, "patch_mean": pooled, "cls_last_n": last, "maps": maps}


def check_model_name(name: str) -> None:
    """Raise a :class:`UserError` with close matches when timm does not know ``name``."""
    if timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise UserError(f"timm does not know the model {name!r}.{hint} See timm.list_models().")


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """An uninitialised-weights timm model without classifier; ViTs accept any input size.
    ``kwargs`` (e.g. a Swin's ``window_size``) go to ``timm.create_model``."""
    check_model_name(name)
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
        )
    except TypeError:  # not a ViT: no dynamic_img_size argument
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def find_cached_weights(name: str) -> Path | None:
    """The locally cached pretrained weights of ``name`` (Hugging Face or torch hub), if any.

    Only looks at the disk, never at the network.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            filename = cfg.hf_hub_filename or "pytorch_model.bin"
            candidates = [filename]
            if filename.endswith(".bin"):
                stem = "model" if filename == "pytorch_model.bin" else filename[:-4]
                candidates.insert(0, f"{stem}.safetensors")
            for fn in candidates:
                found = try_to_load_from_cache(repo, fn, revision=revision or None)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    if cfg.url:
        cached = (
            Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        )
        if cached.is_file():
            return cached
    return None


def pretrained_tags(name: str) -> list[str]:
    arch = name.split(".", 1)[0]
    return timm.list_pretrained(f"{arch}.*") or timm.list_pretrained(arch)


def wrap_timm_model(
    model: nn.Module, info: EncoderInfo, head_state: dict[str, torch.Tensor] | None = None
) -> Encoder:
    """:class:`ViTEncoder` for token models (timm ViTs), :class:`TimmEncoder` otherwise."""
    if hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens"):
        return ViTEncoder(model, info, head_state)
    return TimmEncoder(model, info, head_state)
