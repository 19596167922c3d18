"""``precision=auto`` for pretraining: time the iBOT step's model work in each precision.

The timed step is the teacher forward on the global crops, the student forward on the
masked global and the local crops, and the student backward, at the run's crop sizes on a
small batch (:func:`ibot_bench.precision.probe_batch`); the loss, optimizer and EMA are
precision-independent and left out. On GPUs fp16 is a candidate too (the run's GradScaler
covers it); it is picked only where it beats bf16 by the margin, i.e. on GPUs without bf16.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ibot_bench.config import to_dict
from ibot_bench.precision import choose_precision, probe_step, scratch
from ibot_bench.pretrain.config import PretrainConfig, crop_sizes
from ibot_bench.pretrain.model import IbotStudent, IbotTeacher


def pretrain_precision(
    cfg: PretrainConfig,
    student: IbotStudent,
    teacher: IbotTeacher,
    device: torch.device,
    batch: int,
    log: Callable[[str], None],
) -> str:
    """``cfg.precision``; for ``auto`` the fastest for this model, crops and per-rank batch
    (timed once per machine, eager mode; the same decision on every rank)."""
    g_sizes, l_sizes = crop_sizes(cfg)
    vit = student.backbone
    key = {
        "work": "pretrain",
        "arch": cfg.model.arch,
        "vit": [vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, cfg.model.patch_size],
        "params": sum(p.numel() for p in student.parameters()),
        "head": to_dict(cfg.head),
        "global": g_sizes,
        "local": l_sizes,
        "batch": batch,
    }
    p = cfg.model.patch_size

    @functools.cache
    def inputs(n: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        gen = torch.Generator(device=device).manual_seed(0)

        def crops(size: int) -> torch.Tensor:
            return torch.randn(n, 3, size, size, device=device, generator=gen)

        masks = [torch.rand(n, s // p, s // p, device=device, generator=gen) < 0.3 for s in g_sizes]
        return [crops(s) for s in g_sizes], masks, [crops(s) for s in l_sizes]

    def run(n: int) -> None:
        globals_, masks, locals_ = inputs(n)
        with scratch(student):
            with torch.no_grad():
                teacher(globals_)
            out = student(globals_, masks, locals_)
            loss = sum(c.float().mean() for c in out.cls) + sum(x.float().mean() for x in out.patch)
            loss.backward()

    step = probe_step(device, batch, run)
    return choose_precision(device, cfg.precision, key, step, log=log)
