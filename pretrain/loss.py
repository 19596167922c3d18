"""The iBOT loss: CLS self-distillation + masked image modelling, with centering (docs/protocols.md#loss).

    L = lambda1 * mean_{q global, v != q} CE(t_cls[q], s_cls[v])
      + lambda2 * mean_{q global} mean_b [ sum_i m_i CE(t_patch[q]_i, s_patch[q]_i) / max(1, sum_i m_i) ]

Teacher probabilities are softmax((z - c) / tau_t) with centers updated after the loss
(momentum 0.9, averaged over all ranks); student log-probabilities use ``student_temp``.
Student patch logits arrive for the masked tokens only (see :class:`IbotStudent`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ibot_bench.distributed import world


@dataclass
class LossParts:
    total: torch.Tensor
    cls: torch.Tensor
    mim: torch.Tensor


class IbotLoss(nn.Module):
    """Holds the centers ``center`` (1, out_dim) and ``center2`` (1, 1, patch_out_dim),
    saved as the checkpoint's ``ibot_loss`` entry (docs/protocols.md#checkpoint-format)."""

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))

    def forward(
        self,
        student_cls: list[torch.Tensor],
        student_patch: list[torch.Tensor],
        teacher_cls: list[torch.Tensor],
        teacher_patch: list[torch.Tensor],
        masks: list[torch.Tensor],
        teacher_temp: float,
        teacher_patch_temp: float,
    ) -> LossParts:
        """``student_cls``: per view (B, K), globals first; ``student_patch``: per global view,
        logits of its masked tokens in mask order (M_v, K2); ``teacher_*``: per global view
        (B, K) and (B, N, K2); ``masks``: per global view bool (B, H, W)."""
        t_cls = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1) for t in teacher_cls]
        s_cls = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_cls]
        cls_terms = [
            torch.sum(-tq * s_cls[v], dim=-1).mean()
            for q, tq in enumerate(t_cls)
            for v in range(len(s_cls))
            if v != q
        ]
        mim_terms = []
        for tp, sp, m in zip(teacher_patch, student_patch, masks):
            flat = m.flatten(1)
            t_masked = F.softmax((tp[flat].float() - self.center2[0]) / teacher_patch_temp, dim=-1)
            ce = torch.sum(-t_masked * F.log_softmax(sp.float() / self.student_temp, dim=-1), -1)
            image = torch.arange(flat.shape[0], device=flat.device).unsqueeze(1).expand_as(flat)
            per_image = torch.zeros(flat.shape[0], device=ce.device).index_add_(0, image[flat], ce)
            per_image = per_image / flat.sum(1).clamp(min=1)
            mim_terms.append(per_image.mean())
        zero = teacher_cls[0].new_zeros((), dtype=torch.float32)
        cls_loss = torch.stack(cls_terms).mean() if cls_terms else zero
        mim_loss = torch.stack(mim_terms).mean() if mim_terms else zero
        self.update_center(teacher_cls, teacher_patch)
        return LossParts(
            self.lambda1 * cls_loss + self.lambda2 * mim_loss, cls_loss.detach(), mim_loss.detach()
        )

    @torch.no_grad()
    def update_center(self, teacher_cls: list[torch.Tensor], teacher_patch: list[torch.Tensor]):
        """c <- m c + (1 - m) mean over images of all ranks (CLS logits; per-image mean of
        all patch logits for c2, masked or not, docs/protocols.md#reference-subtleties)."""
        # per view, without concatenating the (B, N, K) patch logits or upcasting a copy
        cls_sum = sum(t.sum(0, dtype=torch.float32) for t in teacher_cls)
        patch_sum = sum(t.mean(1, dtype=torch.float32).sum(0) for t in teacher_patch)
        sums = torch.cat([cls_sum, patch_sum])
        _, world_size = world()
        if world_size > 1:
            dist.all_reduce(sums)
        n = sum(len(t) for t in teacher_cls) * world_size
        k = teacher_cls[0].shape[1]
        cls_center, patch_center = sums[:k] / n, sums[k:] / n
        self.center.mul_(self.center_momentum).add_(cls_center, alpha=1 - self.center_momentum)
        self.center2.mul_(self.center_momentum2).add_(patch_center, alpha=1 - self.center_momentum2)
