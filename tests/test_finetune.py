"""Fine-tuning tasks: layer decay, weight decay, exact resume, head loading, bad input."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_imagefolder, on_call

import ibot_bench.downstream.finetune_engine as engine
from ibot_bench.config import load_config
from ibot_bench.downstream.finetune import (
    FinetuneConfig,
    FinetuneModel,
    finetune_eval,
    param_groups,
    protocol_name,
    resolve_recipe,
)
from ibot_bench.downstream.semi_finetune import (
    SemiFinetuneConfig,
    head_first_layer,
    semi_finetune_eval,
)
from ibot_bench.downstream.semi_finetune import protocol_name as semi_protocol
from ibot_bench.encoders import load_encoder
from ibot_bench.encoders.vit import ViTConfig, build_vit
from ibot_bench.errors import ConfigError, NotApplicableError, UserError
from ibot_bench.evaluate import eval_schema, run_eval
from ibot_bench.interrupt import TrainingInterrupted
from ibot_bench.tasks import TaskContext, discover_tasks

ROOT = Path(__file__).resolve().parents[1]
DIM, HIDDEN = 64, 24
# tiny but complete: 2 epochs x 3 steps of 8 images, every regulariser of the recipe on
TINY = dict(epochs=2, warmup_epochs=1, batch_size=8, eval_batch_size=32, img_size=32, drop_path=0.1)


def make_ibot_checkpoint(path: Path, with_head: bool = True) -> Path:
    """A 2-block ViT (dim 64, patch 8, 32 px) in the official full-checkpoint layout."""
    torch.manual_seed(0)
    vit = build_vit(ViTConfig(DIM, 2, 1, patch_size=8, img_size=32))
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    if with_head:
        g = torch.Generator().manual_seed(1)
        for name, shape in {
            "mlp.0": (HIDDEN, DIM),
            "mlp.2": (HIDDEN, HIDDEN),
            "mlp.4": (16, HIDDEN),
        }.items():
            teacher[f"head.{name}.weight"] = torch.randn(shape, generator=g) * 0.1
            teacher[f"head.{name}.bias"] = torch.randn(shape[0], generator=g) * 0.1
        teacher["head.last_layer.weight_g"] = torch.ones(32, 1)
        teacher["head.last_layer.weight_v"] = torch.randn(32, 16, generator=g)
    student = {f"module.{k}": v.clone() for k, v in teacher.items()}
    args = {"num_heads": 1}  # width 64 is no standard ViT width: the file names its heads
    torch.save({"teacher": teacher, "student": student, "epoch": 1, "args": args}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("ft")
    return {
        "ckpt": make_ibot_checkpoint(d / "ibot.pth"),
        "nohead": make_ibot_checkpoint(d / "nohead.pth", with_head=False),
        "data": f"imagefolder:{make_imagefolder(d / 'data', classes=3, per_class=8)}?size=32",
    }


def ctx(tiny: dict, work: Path, ckpt: str = "ckpt") -> TaskContext:
    return TaskContext(f"ibot:{tiny[ckpt]}", tiny["data"], work, log=lambda _m: None)


def test_layer_decay_scale_of_every_group_matches_the_paper_for_12_blocks():
    model = FinetuneModel(load_encoder("random:vit_tiny").model, num_classes=10)  # 12 blocks
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    seen = []
    for g in groups:
        for name in g["param_names"]:
            seen.append(name)
            sub = name.removeprefix("backbone.")
            if sub.startswith(("patch_embed", "cls_token", "pos_embed")):
                i = 0
            elif sub.startswith("blocks."):
                i = int(sub.split(".")[1]) + 1
            else:
                assert sub.startswith(("norm.", "head.")), name
                i = 13  # L + 1: final norm and head
            assert g["layer_id"] == i, name
            assert g["lr_scale"] == pytest.approx(0.75 ** (12 + 1 - i)), name
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())
    assert {g["layer_id"] for g in groups} == set(range(14))


def test_no_weight_decay_on_1d_params_pos_and_cls():
    model = FinetuneModel(load_encoder("random:vit_tiny").model, num_classes=5)
    params = dict(model.named_parameters())
    for g in param_groups(model, weight_decay=0.05, layer_decay=0.65):
        for name in g["param_names"]:
            no_decay = params[name].ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_layer_decay_outside_range_is_an_error():
    enc = load_encoder("random:vit_tiny_patch8")
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match=r"layer_decay must be in \(0, 1\]"):
            resolve_recipe(FinetuneConfig(layer_decay=bad), enc)
    assert resolve_recipe(FinetuneConfig(layer_decay=1.0), enc).layer_decay == 1.0
    for dim, expected in {
        384: (200, 0.75, 0.1),
        768: (100, 0.65, 0.2),
        1024: (50, 0.75, 0.4),
    }.items():
        enc = SimpleNamespace(embed_dim=dim, info=SimpleNamespace(arch="vit"))
        r = resolve_recipe(FinetuneConfig(), enc)
        assert (r.epochs, r.layer_decay, r.drop_path) == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ({"lr": -1.0}, "lr must be > 0"),  # was torch's "Invalid learning rate"
        ({"smoothing": 1.5}, r"smoothing must be in \[0, 1\)"),  # was timm's bare assert
        ({"crop_pct": 0.0}, r"crop_pct must be in \(0, 1\]"),  # was a ZeroDivisionError
        ({"auto_augment": "foo"}, "not a timm augmentation policy"),  # was timm's assert
        ({"auto_augment": "rand-foo"}, r"unknown section\(s\) \['foo'\]"),  # timm skipped it
        ({"auto_augment": "randaug"}, r"policy \(unknown policy\)"),  # was an empty '()'
        ({"mixup": -1.0}, "mixup must be >= 0"),  # was silently off
        ({"ema_decay": 1.5}, r"ema_decay must be in \[0, 1\)"),  # was accepted
        ({"eval_every": 0}, "eval_every must be >= 1"),  # silently meant every epoch
    ],
)
def test_recipe_numbers_out_of_range_are_config_errors(override, message):
    enc = load_encoder("random:vit_tiny_patch8")
    with pytest.raises(ConfigError, match=message):
        resolve_recipe(FinetuneConfig(**override), enc)


def _final_state(work: Path) -> dict:
    return torch.load(work / engine.CHECKPOINT, weights_only=True)


def test_interrupted_finetune_resumes_to_identical_parameters(tiny, tmp_path, monkeypatch):
    cfg = FinetuneConfig(**TINY, checkpoint_every=1, ema=True, ema_decay=0.9)
    ref_metrics, _ = finetune_eval(ctx(tiny, tmp_path / "a"), cfg)

    calls, real_seed_all = [], engine.seed_all

    def interrupt_at_step_5(seed: int) -> None:  # called once at the start of every step
        calls.append(seed)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_seed_all(seed)

    monkeypatch.setattr(engine, "seed_all", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune_eval(ctx(tiny, tmp_path / "b"), cfg)
    assert _final_state(tmp_path / "b")["state"]["global_step"] == 4  # mid-epoch 2
    monkeypatch.setattr(engine, "seed_all", real_seed_all)
    metrics, extra = finetune_eval(ctx(tiny, tmp_path / "b"), cfg)
    assert extra["resumed_at_step"] == 4

    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert metrics == ref_metrics
    assert set(metrics) >= {"top1", "last_top1", "best_top1", "best_epoch", "ema_last_top1"}

    # a finished run returns its results without training again
    monkeypatch.setattr(engine, "seed_all", lambda s: pytest.fail("trained again"))
    assert finetune_eval(ctx(tiny, tmp_path / "a"), cfg)[0] == ref_metrics


def test_resume_under_another_process_count_says_so_and_records_it(tiny, tmp_path, monkeypatch):
    """Same global batch and schedule, other per-rank draws: resumed with a notice, and the
    record lists every process count that trained the run."""
    cfg = FinetuneConfig(**TINY, checkpoint_every=1)
    real_seed_all = engine.seed_all  # called once at the start of every step

    def stop() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "seed_all", on_call(3, stop, real_seed_all))
    with pytest.raises(KeyboardInterrupt):
        finetune_eval(ctx(tiny, tmp_path), cfg)
    monkeypatch.setattr(engine, "seed_all", real_seed_all)
    path = tmp_path / engine.CHECKPOINT
    saved = torch.load(path, weights_only=True)
    assert saved["state"]["world_sizes"] == [1]
    saved["state"]["world_sizes"] = [2]  # as written by a 2-process torchrun
    torch.save(saved, path)
    lines = []
    task = TaskContext(f"ibot:{tiny['ckpt']}", tiny["data"], tmp_path, log=lines.append)
    _, extra = finetune_eval(task, cfg)
    assert any("trained by 2 process(es), this run has 1" in line for line in lines)
    assert extra["world_sizes"] == [2, 1] and extra["world_size"] == 1


def test_a_stop_signal_saves_the_step_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """SIGTERM mid-epoch with no periodic checkpoints: the step finishes, is saved, the error
    names where, and the rerun ends as a run never stopped."""
    cfg = FinetuneConfig(**TINY, checkpoint_every=0)
    ref_metrics, _ = finetune_eval(ctx(tiny, tmp_path / "a"), cfg)
    calls, real_seed_all = [], engine.seed_all

    def signal_at_step_5(seed: int) -> None:
        calls.append(seed)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        real_seed_all(seed)

    monkeypatch.setattr(engine, "seed_all", signal_at_step_5)
    with pytest.raises(TrainingInterrupted, match="SIGTERM.*rerun the same command"):
        finetune_eval(ctx(tiny, tmp_path / "b"), cfg)
    assert _final_state(tmp_path / "b")["state"]["global_step"] == 5
    monkeypatch.setattr(engine, "seed_all", real_seed_all)
    metrics, extra = finetune_eval(ctx(tiny, tmp_path / "b"), cfg)
    assert extra["resumed_at_step"] == 5 and metrics == ref_metrics


def test_head_first_layer_comes_from_an_official_ibot_checkpoint(tiny):
    raw = torch.load(tiny["ckpt"], weights_only=True)["teacher"]
    proj, width = head_first_layer(load_encoder(f"ibot:{tiny['ckpt']}"))
    assert width == HIDDEN and isinstance(proj[1], torch.nn.GELU)
    assert torch.equal(proj[0].weight, raw["head.mlp.0.weight"])
    assert torch.equal(proj[0].bias, raw["head.mlp.0.bias"])
    student, _ = head_first_layer(load_encoder(f"ibot:{tiny['ckpt']}:student"))
    assert torch.equal(student[0].weight, raw["head.mlp.0.weight"])


def test_semi_finetune_from_head_runs_on_a_label_subset(tiny, tmp_path):
    cfg = SemiFinetuneConfig(**TINY, fraction=0.5, lr=1e-4, ema_decay=0.9)
    metrics, extra = semi_finetune_eval(ctx(tiny, tmp_path), cfg)
    assert extra["subset_size"] == 12 and extra["full_train_size"] == 24
    assert 0 <= metrics["top1"] <= 100 and "ema_best_top1" in metrics
    model = torch.load(tmp_path / engine.CHECKPOINT, weights_only=True)["model"]
    assert model["proj.0.weight"].shape == (HIDDEN, DIM) and model["head.weight"].shape == (
        3,
        HIDDEN,
    )


def test_semi_finetune_without_head(tiny, tmp_path):
    cfg = SemiFinetuneConfig(**TINY, fraction=0.5)
    with pytest.raises(NotApplicableError, match="no iBOT/DINO projection head"):
        semi_finetune_eval(ctx(tiny, tmp_path / "a", "nohead"), cfg)
    no_head = dataclasses.replace(cfg, from_head=False, epochs=1, warmup_epochs=0)
    metrics, extra = semi_finetune_eval(ctx(tiny, tmp_path / "b", "nohead"), no_head)
    assert "top1" in metrics and extra["subset_size"] == 12


def test_fraction_leaving_a_class_empty_names_the_class(tiny, tmp_path):
    with pytest.raises(UserError, match="class_0"):
        semi_finetune_eval(ctx(tiny, tmp_path), SemiFinetuneConfig(**TINY, fraction=0.01))


def test_out_of_memory_suggests_the_largest_batch_and_accumulation(tiny, tmp_path, monkeypatch):
    real_forward = FinetuneModel.forward

    def small_memory(self, x):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, x)

    monkeypatch.setattr(FinetuneModel, "forward", small_memory)
    with pytest.raises(UserError, match=r"largest micro-batch that fit was 2 .*accum_steps=4"):
        finetune_eval(ctx(tiny, tmp_path), FinetuneConfig(**TINY))


def test_batch_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="even micro-batch"):
        finetune_eval(ctx(tiny, tmp_path), FinetuneConfig(**{**TINY, "batch_size": 9}))
    with pytest.raises(ConfigError, match="larger than the training set"):
        finetune_eval(ctx(tiny, tmp_path), FinetuneConfig(**{**TINY, "batch_size": 64}))


def test_protocol_names():
    assert protocol_name("finetune", FinetuneConfig()) == "finetune"
    assert protocol_name("finetune", FinetuneConfig(report="best", pool="mean")) == (
        "finetune-avgpool-best"
    )
    assert semi_protocol(SemiFinetuneConfig(fraction=0.01)) == "semi-ft-head-1pct"
    assert semi_protocol(SemiFinetuneConfig(fraction=0.1, from_head=False)) == "semi-ft-10pct"


def test_registered_and_shipped_configs_load():
    tasks = discover_tasks()
    for name, cls, prefix in [
        ("finetune", FinetuneConfig, "finetune_"),
        ("semi-finetune", SemiFinetuneConfig, "semi_finetune_"),
    ]:
        assert tasks.get(name).config_cls is cls
        for path in sorted((ROOT / "configs/tasks").glob(f"{prefix}*.yaml")):
            load_config(eval_schema(tasks.get(name)), path)


def test_quick_config_end_to_end_writes_a_record(tiny, tmp_path):
    rec = run_eval(
        "finetune",
        f"ibot:{tiny['ckpt']}",
        tiny["data"],
        config_path=ROOT / "configs/tasks/finetune_quick.yaml",
        overrides=["epochs=1", "warmup_epochs=0", "batch_size=8", "img_size=32"],
        output_dir=tmp_path,
        log=lambda _m: None,
    )
    assert rec.protocol == "finetune" and rec.task == "finetune"
    assert set(rec.metrics) >= {"top1", "last_top1", "best_top1", "best_epoch"}
    assert rec.details["recipe"]["epochs"] == 1
    assert (tmp_path / "records").is_dir()


def test_randaugment_posterize_to_zero_bits_gives_black_not_an_error():
    from PIL import Image

    tf = engine.train_transform(FinetuneConfig(), 32)
    ops = [op for t in tf.transforms for op in getattr(t, "ops", ()) if "Posterize" in op.name]
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert ops and ops[0].aug_fn(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert ops[0].aug_fn(img, 2).getpixel((0, 0)) == (192, 64, 0)


def test_crop_scale_and_flip_reach_the_training_transform_and_bad_values_are_refused():
    def crop_scale(tf):
        return next(t.scale for t in tf.transforms if hasattr(t, "ratio"))

    def flips(tf):
        return [t.p for t in tf.transforms if type(t).__name__ == "RandomHorizontalFlip"]

    paper = engine.train_transform(FinetuneConfig(), 32)
    assert crop_scale(paper) == (0.08, 1.0) and flips(paper) == [0.5]
    quick = engine.train_transform(FinetuneConfig(crop_scale=[0.4, 1.0], hflip=0.0), 32)
    assert crop_scale(quick) == (0.4, 1.0) and flips(quick) == []
    enc = load_encoder("random:vit_tiny_patch8")
    for bad in ([0.0, 1.0], [0.9, 0.5], [0.5], [0.5, 1.5]):
        with pytest.raises(ConfigError, match="crop_scale must be"):
            resolve_recipe(FinetuneConfig(crop_scale=bad), enc)
    with pytest.raises(ConfigError, match="hflip must be"):
        resolve_recipe(FinetuneConfig(hflip=2.0), enc)
