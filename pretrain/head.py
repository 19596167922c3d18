"""The trainable iBOT projection head (docs/protocols.md#projection-head).

Extends :class:`ibot_bench.encoders.head.ProjectionHead` (MLP -> L2-norm -> last layer)
with weight-normalised last layers whose parameters carry the official checkpoint names
``last_layer.weight_g`` / ``last_layer.weight_v`` (and ``last_layer2.*``), so the
foundation's ``ibot:`` loader and the reference scripts read our checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ibot_bench.encoders.head import ProjectionHead


class WeightNormLinear(nn.Module):
    """``Linear(bias=False)`` with weight = g * v / ||v|| per output row.

    Hand-written rather than ``torch.nn.utils.weight_norm`` (deprecated) or its
    parametrization (which renames the parameters): the state-dict keys must stay
    ``weight_g`` (out, 1) and ``weight_v`` (out, in) as in official iBOT checkpoints, and
    in that order (parameter order = the reference's, so optimizer states pair up).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        # weight_g first: the reference's torch.nn.utils.weight_norm registers g before v, and
        # the optimizer state pairs tensors by this order (a reference checkpoint's Adam
        # moments must land on the same parameters, docs/protocols.md#checkpoint-format)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default init

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class IbotHead(ProjectionHead):
    """3-layer MLP (D -> hidden -> hidden -> bottleneck, GELU), L2-normalised bottleneck,
    weight-normed ``last_layer`` (CLS, ``out_dim``) and ``last_layer2`` (patches,
    ``patch_out_dim``); ``shared=True`` makes them one module, saved under both names (docs/protocols.md#reference-subtleties).
    ``norm_last_layer=True`` freezes ``weight_g`` at 1."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        patch_out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        shared: bool = True,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__([in_dim, hidden_dim, hidden_dim, bottleneck_dim], out_dim)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer2 = (
            self.last_layer if shared else WeightNormLinear(bottleneck_dim, patch_out_dim)
        )
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)
            self.last_layer2.weight_g.requires_grad_(False)

    def forward_tokens(
        self, cls: torch.Tensor, patches: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CLS logits, patch logits) of (..., D) CLS features and (..., D) patch tokens."""
        if patches is None:
            with record_function("step/head"):
                return self.last_layer(self.embed(cls)), None
        d = cls.shape[-1]
        flat = torch.cat([cls.reshape(-1, d), patches.reshape(-1, d)])
        c, p = self.forward_rows(flat, cls.numel() // d)
        return c.reshape(*cls.shape[:-1], -1), p.reshape(*patches.shape[:-1], -1)

    def forward_rows(self, rows: torch.Tensor, n_cls: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of (R, D) rows whose first ``n_cls`` are CLS features and the rest patch
        tokens: the MLP runs once over all of them (and the last layer too when shared)."""
        with record_function("step/head"):
            z = self.embed(rows)
            if self.last_layer2 is self.last_layer:
                out = self.last_layer(z)
                return out[:n_cls], out[n_cls:]
            return self.last_layer(z[:n_cls]), self.last_layer2(z[n_cls:])

    def forward_sequence(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, out_dim) CLS and (B, N, patch_out_dim) patch logits of a (B, 1 + N, D) token
        sequence, as the reference head does: no copies of the tokens."""
        with record_function("step/head"):
            z = self.embed(tokens)
            if self.last_layer2 is self.last_layer:
                out = self.last_layer(z)
                return out[:, 0], out[:, 1:]
            return self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])
