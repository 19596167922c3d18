"""iBOT training step, this project vs the reference implementation, in one process.

    python benchmarks/reference_step.py --reference /work/ref/ibot
    python benchmarks/reference_step.py --reference /work/ref/ibot --cases quick --steps 6
    python benchmarks/reference_step.py --reference /work/ref/ibot --cases quick --compile
    python benchmarks/reference_step.py --reference /work/ref/ibot --agree 20

The reference (a checkout of bytedance/ibot) is imported at run time from ``--reference``:
its ``VisionTransformer``, ``iBOTHead``, ``MultiCropWrapper``, ``iBOTLoss`` and the body of
its ``train_one_epoch`` step (lr/wd set per group, teacher, masked student on the global
crops, student on the local crops, loss, ``loss.item()``, backward, its per-tensor clipping,
last-layer cancelling, AdamW, its EMA loop), under ``torch.autocast`` for bf16 as its
``torch.cuda.amp.autocast`` does on GPUs. Nothing of it is copied here; the only shims
are stand-ins for modules it imports but this step never uses (tensorboardX, its
clustering metrics) and a one-process ``torch.distributed`` for its center update.

Both take the same batch (the project's multi-crop augmentation and block masks), the same
schedules at an epoch where every parameter trains, and the same thread count; their steps
alternate and the medians are compared, so load from other processes hits both alike.
MFU: model FLOPs of each step (``torch.utils.flop_counter``) over the matmul peak of the
same precision measured in this run.

``--agree N``: no timing; the reference starts from our weights and centers and both take
the same N batches in fp32; prints each step's two losses and exits 1 if any differ by more
than 1e-5 relative (the speed-ups must not change the maths).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import ibot_step as bs
import torch

from ibot_bench.data.classification import normalize_batch
from ibot_bench.pretrain.monitor import ClusterMonitor
from ibot_bench.pretrain.train import Trainer
from ibot_bench.runtime import autocast


def import_reference(root: Path) -> types.SimpleNamespace:
    """The reference's modules, imported from ``root`` with shims for unused imports."""
    if not (root / "main_ibot.py").is_file():
        raise SystemExit(
            f"error: {root} is not an iBOT checkout (no main_ibot.py); pass --reference"
        )
    sys.path.insert(0, str(root))
    stubs = {
        "tensorboardX": {"SummaryWriter": object},
        "evaluation.unsupervised.unsup_cls": {"eval_pred": None},
    }
    for name, attrs in stubs.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
    import main_ibot  # noqa: PLC0415 (the reference, only importable after the path insert)
    import utils  # noqa: PLC0415
    from models.head import iBOTHead  # noqa: PLC0415
    from models.vision_transformer import VisionTransformer  # noqa: PLC0415

    # one process: its center update all-reduces over a world of one
    main_ibot.dist = types.SimpleNamespace(all_reduce=lambda t: None, get_world_size=lambda: 1)
    return types.SimpleNamespace(
        VisionTransformer=VisionTransformer,
        iBOTHead=iBOTHead,
        iBOTLoss=main_ibot.iBOTLoss,
        utils=utils,
    )


class ReferenceStep:
    """The reference's networks, loss and optimizer for ``trainer``'s configuration."""

    def __init__(self, ref: types.SimpleNamespace, trainer: Trainer) -> None:
        cfg, vit, h, lc = trainer.cfg, trainer.vit, trainer.cfg.head, trainer.cfg.loss
        self.ref, self.trainer = ref, trainer
        self.ng, self.nl = cfg.crops.global_number, cfg.crops.local_number
        kw = dict(
            img_size=[vit.img_size],
            patch_size=vit.patch_size,
            embed_dim=vit.embed_dim,
            depth=vit.depth,
            num_heads=vit.num_heads,
            mlp_ratio=vit.mlp_ratio,
            qkv_bias=True,
            return_all_tokens=True,
        )
        head = dict(
            patch_out_dim=h.patch_out_dim,
            hidden_dim=h.hidden_dim,
            bottleneck_dim=h.bottleneck_dim,
        )
        torch.manual_seed(0)
        student = ref.VisionTransformer(
            **kw, drop_path_rate=cfg.model.drop_path, masked_im_modeling=True
        )
        teacher = ref.VisionTransformer(**kw)
        self.student = ref.utils.MultiCropWrapper(
            student,
            ref.iBOTHead(
                vit.embed_dim,
                h.out_dim,
                norm_last_layer=h.norm_last_layer,
                shared_head=h.shared_head,
                **head,
            ),
        ).to(trainer.device)
        self.teacher = ref.utils.MultiCropWrapper(
            teacher,
            ref.iBOTHead(vit.embed_dim, h.out_dim, shared_head=h.shared_head_teacher, **head),
        ).to(trainer.device)
        self.teacher.load_state_dict(self.student.state_dict(), strict=False)
        for p in self.teacher.parameters():
            p.requires_grad = False
        same_dim = h.shared_head or h.shared_head_teacher
        o = cfg.optim
        self.loss = ref.iBOTLoss(
            h.out_dim,
            h.out_dim if same_dim else h.patch_out_dim,
            self.ng,
            self.nl,
            lc.warmup_teacher_temp,
            lc.teacher_temp,
            lc.warmup_teacher_patch_temp,
            lc.teacher_patch_temp,
            lc.warmup_teacher_temp_epochs,
            o.epochs,
            lambda1=lc.lambda1,
            lambda2=lc.lambda2,
            mim_start_epoch=cfg.mask.pred_start_epoch,
        ).to(trainer.device)
        self.optimizer = torch.optim.AdamW(ref.utils.get_params_groups(self.student))
        names_k = {n for n, _ in self.teacher.named_parameters()}
        params_k = dict(self.teacher.named_parameters())
        pairs = [(p, params_k[n]) for n, p in self.student.named_parameters() if n in names_k]
        self.params_q, self.params_k = [q for q, _ in pairs], [k for _, k in pairs]

    def step(self, batch: tuple, it: int, epoch: int) -> float:
        """The reference's training iteration (its train_one_epoch body) on ``batch``."""
        views, masks, _ = batch
        t, dev, ng = self.trainer, self.trainer.device, self.ng
        images = [normalize_batch(v.to(dev)) for v in views]
        masks = [m.to(dev) for m in masks]
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = t.lr[it]
            if i == 0:
                group["weight_decay"] = t.wd[it]
        with autocast(dev, t.precision):
            teacher_output = self.teacher(images[:ng])
            student_output = self.student(images[:ng], mask=masks[:ng])
            self.student.backbone.masked_im_modeling = False
            local_cls = self.student(images[ng:])[0] if len(images) > ng else None
            self.student.backbone.masked_im_modeling = True
            all_loss = self.loss(student_output, teacher_output, local_cls, masks, epoch)
            loss = all_loss.pop("loss")
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"reference loss is {loss.item()}")
        pred1 = teacher_output[0].chunk(ng)[0].max(dim=1)[1]
        pred2 = student_output[0].chunk(ng)[1].max(dim=1)[1]
        (pred1 == pred2).sum() / pred1.size(0)
        self.optimizer.zero_grad()
        loss.backward()
        o = t.cfg.optim
        if o.clip_grad:
            self.ref.utils.clip_gradients(self.student, o.clip_grad)
        self.ref.utils.cancel_gradients_last_layer(epoch, self.student, o.freeze_last_layer)
        self.optimizer.step()
        with torch.no_grad():
            m = t.momentum[it]
            for param_q, param_k in zip(self.params_q, self.params_k):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return loss.item()


def compare(
    ref: types.SimpleNamespace,
    case: str,
    precision: str,
    steps: int,
    out: Path,
    compile_ours: bool = False,
    device: str = "cpu",
    batch_size: int = 0,
) -> dict[str, Any]:
    """Alternating ours/reference steps; medians, ratio (reference time / ours) and MFUs.
    ``compile_ours``: our transformer blocks under ``torch.compile`` (``compile=true``); the first
    step's time, compilation included, is reported as ``first_s``. ``batch_size`` 0 keeps the
    case's batch."""
    extra = ["compile=true"] if compile_ours else []
    if batch_size:
        extra.append(f"optim.batch_size={batch_size}")
    trainer = bs.make_trainer(case, precision, out, device, extra)
    reference = ReferenceStep(ref, trainer)
    epoch = bs.training_epoch(trainer)
    it = epoch * trainer.iters_per_epoch
    batch = bs.augmented(trainer, bs.real_batch(trainer, epoch))
    ours = bs.stepper(trainer, batch, epoch)

    def theirs() -> float:
        return reference.step(batch, it, epoch)

    start = time.perf_counter()
    ours()  # warm-up (compiles when compile_ours)
    first = time.perf_counter() - start
    ours()
    theirs()
    flops_ours, flops_ref = bs.count_flops(ours), bs.count_flops(theirs)
    t_ours, t_ref = [], []
    for _ in range(steps):
        t_ref.append(bs.timed(theirs, trainer.device))
        t_ours.append(bs.timed(ours, trainer.device))
    peak = bs.matmul_peak(bs.DTYPES[precision], trainer.device)
    med_ours, med_ref = sorted(t_ours)[len(t_ours) // 2], sorted(t_ref)[len(t_ref) // 2]
    row = {
        "case": f"{case} ({bs.case_label(trainer)})",
        "precision": precision,
        "ours_s": med_ours,
        "ref_s": med_ref,
        "ratio": med_ref / med_ours,
        "mfu_ours": flops_ours / med_ours / peak,
        "mfu_ref": flops_ref / med_ref / peak,
        "gflop_ours": flops_ours / 1e9,
        "gflop_ref": flops_ref / 1e9,
        "peak_gflops": peak / 1e9,
        "first_s": first,
    }
    bs.check_mfu(row["mfu_ours"], f"{case} {precision} (ours)")
    bs.check_mfu(row["mfu_ref"], f"{case} {precision} (reference)")
    return row


def agree(
    ref: types.SimpleNamespace, case: str, steps: int, out: Path, device: str = "cpu"
) -> float:
    """Largest relative loss difference over ``steps`` fp32 steps of ours and the reference,
    both from our initial weights and centers, on the same consecutive batches. Without
    stochastic depth: the two draw it from different random streams."""
    trainer = bs.make_trainer(case, "fp32", out, device, extra=["model.drop_path=0.0"])
    reference = ReferenceStep(ref, trainer)
    reference.student.load_state_dict(trainer.student.state_dict())
    reference.teacher.load_state_dict(trainer.teacher.state_dict(), strict=False)
    reference.loss.center.copy_(trainer.loss.center)
    reference.loss.center2.copy_(trainer.loss.center2)
    epoch = bs.training_epoch(trainer)
    trainer.dataset.epoch = epoch
    monitor = ClusterMonitor()
    augment = trainer.device_augment
    worst = 0.0
    for step in range(steps):
        first = step * trainer.batch
        items = [trainer.dataset[(first + i) % len(trainer.dataset)] for i in range(trainer.batch)]
        trainer.device_augment = augment
        batch = bs.augmented(trainer, trainer.loader.collate_fn(items))
        it = epoch * trainer.iters_per_epoch + step
        ours = trainer._step(batch, it, epoch, monitor)["loss"]
        theirs = reference.step(batch, it, epoch)
        worst = max(worst, abs(ours - theirs) / abs(theirs))
        print(f"step {step}: ours {ours:.9f}, reference {theirs:.9f}", flush=True)
    return worst


TARGETS = {("vit_small", "bf16"): 1.5, ("vit_small", "fp32"): 1.4, ("quick", "bf16"): 1.2}


def rows(small: bool, reference: str | None = None) -> list[dict]:
    """run_all.py rows: step time ours vs the reference (needs ``reference``)."""
    if not reference:
        return []
    ref = import_reference(Path(reference))
    cases = [("quick", "bf16"), ("vit_small", "bf16")] if small else list(TARGETS)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, precision in cases:
            r = compare(ref, case, precision, 3 if small else 7, Path(tmp) / f"{case}_{precision}")
            out.append(
                {
                    "name": f"iBOT step vs reference, {r['case']}, {precision}",
                    "ours_s": r["ours_s"],
                    "baseline_s": r["ref_s"],
                    "ratio": r["ratio"],
                    "target": TARGETS[(case, precision)],
                    "note": f"MFU ours {100 * r['mfu_ours']:.0f}% / reference "
                    f"{100 * r['mfu_ref']:.0f}% of the {precision} matmul peak",
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="checkout of bytedance/ibot")
    parser.add_argument("--cases", nargs="+", default=list(bs.CASES), choices=list(bs.CASES))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each, alternating")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--agree",
        type=int,
        default=0,
        metavar="STEPS",
        help="check the losses agree over STEPS fp32 steps from identical weights (no timing)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="our transformer blocks under torch.compile (compile=true)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the case's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = import_reference(Path(args.reference))
    if args.agree:
        with tempfile.TemporaryDirectory() as tmp:
            for case in args.cases:
                worst = agree(ref, case, args.agree, Path(tmp) / case, args.device)
                verdict = "agree" if worst <= 1e-5 else "DISAGREE"
                print(f"{case}: largest relative loss difference {worst:.1e}: {verdict}")
                if worst > 1e-5:
                    raise SystemExit(1)
        return
    print(f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        "| case | precision | ours s/step | reference s/step | ratio | MFU ours | MFU reference "
        "| GFLOP ours / reference |\n|---|---|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            for precision in args.precisions:
                start = time.perf_counter()
                r = compare(
                    ref,
                    case,
                    precision,
                    args.steps,
                    Path(tmp) / f"{case}_{precision}",
                    args.compile,
                    args.device,
                    args.batch,
                )
                print(
                    f"| {r['case']} | {precision} | {r['ours_s']:.3f} | {r['ref_s']:.3f} | "
                    f"{r['ratio']:.2f}x | {100 * r['mfu_ours']:.1f}% | {100 * r['mfu_ref']:.1f}% | "
                    f"{r['gflop_ours']:.0f} / {r['gflop_ref']:.0f} |",
                    flush=True,
                )
                print(
                    f"  ({time.perf_counter() - start:.0f}s; our first step {r['first_s']:.1f}s)",
                    file=sys.stderr,
                )


if __name__ == "__main__":
    main()
