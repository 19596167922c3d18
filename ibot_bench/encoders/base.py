"""The one encoder interface every loader returns (docs/design.md#data-path)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class EncoderInfo:
    """What a loader knows about the encoder it built; recorded in results and caches."""

    spec: str
    arch: str
    fingerprint: str
    source: str = ""  # weights file, or "" for random init
    extra: dict = field(default_factory=dict)


class Encoder(nn.Module):
    """A frozen-or-trainable image encoder with a uniform feature API.

    Subclasses wrap a backbone (a timm ViT, any timm model) and implement
    :meth:`forward_features`. Frozen use calls ``encoder.eval()``; loaders return
    encoders already in eval mode with ``requires_grad`` left on (training tasks
    decide themselves what to freeze).
    """

    embed_dim: int
    patch_size: int
    num_blocks: int
    info: EncoderInfo
    # iBOT/DINO projection-head weights when the checkpoint had them (see encoders.head)
    head_state: dict[str, torch.Tensor] | None = None

    def forward_features(
        self,
        x: torch.Tensor,
        n_last_blocks: int = 1,
        dense_blocks: tuple[int, ...] = (),
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Features for a batch of images ``x`` (B, 3, H, W), any H, W divisible by the patch.

        Returns a dict with
        - ``cls``: (B, D) final-norm CLS token (pooled output for models without one),
        - ``patch_mean``: (B, D) mean of the final-norm patch tokens,
        - ``cls_last_n``: (B, n*D) final-norm CLS of the last ``n_last_blocks`` blocks,
          concatenated oldest first (the linear-probe feature of the iBOT paper),
        - ``maps``: list of (B, D, H/p, W/p) contiguous patch-token maps of the blocks
          in ``dense_blocks`` (0-based block indices), for dense tasks.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]
