"""The one encoder interface every loader returns (docs/design.md#data-path)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ibot_bench.errors import NotApplicableError

# the linear probe's last-blocks CLS feature uses the last min(4, depth) blocks by default
# (docs/protocols.md#default-features: the paper's ViT-S feature is the CLS of the last 4)
DEFAULT_LAST_BLOCKS = 4


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
    # ``cls`` is a CLS token (False: the model's pooled features, e.g. a CNN's global pool,
    # so ``cls`` and ``patch_mean`` carry the same information)
    cls_token: bool = True
    # every block yields a ``cls``-like feature, so ``cls_last_n`` exists for n up to
    # ``num_blocks`` (False: only the final pooled feature, n <= 1)
    block_features: bool = True
    # patch tokens of a plain ViT (prefix tokens + one grid of D-channel patch tokens per
    # block, absolute position embedding): what the dense tasks' ViT-pyramid adapter needs
    plain_vit: bool = False

    def default_last_blocks(self) -> int:
        """Blocks in ``cls_last_n`` when the feature settings leave it unset.

        ``min(4, num_blocks)`` for encoders with a CLS-like feature per block (the paper's
        4 for deep ViTs), 0 for encoders without (CNNs): no ``cls_last_n`` feature then.
        """
        return min(DEFAULT_LAST_BLOCKS, self.num_blocks) if self.block_features else 0

    def resolve_last_blocks(self, requested: int | None) -> int:
        """``requested`` (an explicit ``features.n_last_blocks``), or the default when None."""
        return self.default_last_blocks() if requested is None else int(requested)

    def layout(self, n_last_blocks: int | None = None) -> dict:
        """What this encoder's features are, for feature-cache metadata and task records."""
        return {
            "cls": "final-norm CLS token" if self.cls_token else "pooled features (no CLS token)",
            "cls_token": self.cls_token,
            "block_features": self.block_features,
            "num_blocks": int(self.num_blocks),
            "n_last_blocks": self.resolve_last_blocks(n_last_blocks),
            "plain_vit": self.plain_vit,
        }

    def require_plain_vit(self, task: str) -> None:
        """:class:`NotApplicableError` unless :attr:`plain_vit` (dense tasks' adapter)."""
        if not self.plain_vit:
            raise NotApplicableError(
                f"{task} is not applicable to {self.info.spec!r} ({self.info.arch}, "
                f"{type(self).__name__}): the ViT-pyramid adapter of the dense tasks needs the "
                "patch tokens of a plain ViT (one grid of D-channel tokens per block, absolute "
                "position embedding); this encoder has no such token layout"
            )

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
          concatenated oldest first (the linear-probe feature of the iBOT paper); (B, 0)
          for ``n_last_blocks=0``; encoders without :attr:`block_features` allow n <= 1,
        - ``maps``: list of (B, D, H/p, W/p) contiguous patch-token maps of the blocks
          in ``dense_blocks`` (0-based block indices), for dense tasks.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]
