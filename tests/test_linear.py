"""Linear probes (downstream/linear.py; docs/protocols.md#linear-probe)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import feature_context, on_call

from ibot_bench.downstream.linear import (
    DINOV2_BASE_LRS,
    PAPER_BASE_LRS,
    LinearConfig,
    LinearPaperConfig,
    feature_batch,
    head_specs,
    linear,
    linear_paper,
    train_heads,
)
from ibot_bench.errors import ConfigError, UserError
from ibot_bench.features import FeatureSet
from ibot_bench.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
MEANS = np.random.default_rng(42).standard_normal((6, 16)) * 1.5


def blobs(n: int, seed: int, last_blocks: int = 4) -> FeatureSet:
    """6 Gaussian classes; the class signal is in cls, in the last block of cls_last_n and
    (weaker) in patch_mean."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 6
    cls = (MEANS[y] + rng.standard_normal((n, 16))).astype(np.float32)
    older = rng.standard_normal((n, 16 * (last_blocks - 1))).astype(np.float32)
    patch = (0.5 * MEANS[y] + rng.standard_normal((n, 16))).astype(np.float32)
    names = [f"class{i}" for i in range(6)]
    return FeatureSet(cls, patch, np.concatenate([older, cls], 1), y.astype(np.int64), names)


TRAIN, TEST = blobs(480, seed=0), blobs(240, seed=1)
FAST = {"epochs": 6, "batch_size": 64, "base_lrs": [0.01, 0.1, 1.0]}


def test_linear_selects_on_validation_and_reports_test():
    out = linear(feature_context(TRAIN, TEST), LinearConfig(**FAST))
    assert out.protocol == "linear"
    assert set(out.metrics) == {"top1", "top5"}
    assert out.metrics["top1"] > 85
    heads = out.extra["heads"]
    assert len(heads) == 9 and {h["feature"] for h in heads} == {"cls", "cls_last4", "cls_patch"}
    chosen = out.extra["chosen_head"]
    assert chosen["val_top1"] == max(h["val_top1"] for h in heads)
    assert chosen["lr"] == pytest.approx(chosen["base_lr"] * 64 / 256)
    assert out.extra["num_val"] == 48 and out.extra["num_train"] == 432
    again = linear(feature_context(TRAIN, TEST), LinearConfig(**FAST))
    assert again.metrics == out.metrics and again.extra == out.extra  # seeded


def test_linear_refit_and_bf16_run():
    out = linear(
        feature_context(TRAIN, TEST),
        LinearConfig(**FAST, refit=True, precision="bf16", variants=["cls"]),
    )
    assert out.extra["refit"] is True and out.metrics["top1"] > 80
    assert out.extra["precision"] == "bf16"


def test_linear_paper_is_max_over_heads_and_epochs_on_test():
    out = linear_paper(feature_context(TRAIN, TEST), LinearPaperConfig(**FAST, eval_every=2))
    assert out.protocol == "linear-paper"
    best = max(h["best_test_top1"] for h in out.extra["heads"])
    assert out.metrics["top1"] == best > 85
    assert out.extra["chosen_head"]["epoch"] in (2, 4, 6)


def test_default_grids_scale_with_batch_size():
    assert len(DINOV2_BASE_LRS) == 13 and DINOV2_BASE_LRS[0] == 1e-5 and DINOV2_BASE_LRS[-1] == 0.1
    assert len(PAPER_BASE_LRS) == 45 and PAPER_BASE_LRS[0] == 1e-4 and PAPER_BASE_LRS[-1] == 9.0
    specs = head_specs(LinearConfig(batch_size=512))
    assert len(specs) == 39
    assert all(s.lr == pytest.approx(s.base_lr * 2) for s in specs)


def test_missing_feature_variant_is_a_clear_error():
    two_blocks = blobs(60, seed=2, last_blocks=2)
    with pytest.raises(UserError, match="n_last_blocks=4"):
        linear(feature_context(two_blocks, two_blocks), LinearConfig(**FAST))
    out = linear(
        feature_context(two_blocks, two_blocks),
        LinearConfig(**{**FAST, "epochs": 1}, variants=["cls"]),
    )
    assert out.extra["chosen_head"]["feature"] == "cls"
    with pytest.raises(ConfigError, match="unknown feature"):
        linear(feature_context(TRAIN, TEST), LinearConfig(**FAST, variants=["avgpool"]))


def test_registered_with_feature_needs():
    # cls_last4 = CLS of the last min(4, depth) blocks: the default (None, resolved per
    # encoder) gives it; an explicit features.n_last_blocks must be the paper's 4
    for name, cls in [("linear", LinearConfig), ("linear-paper", LinearPaperConfig)]:
        task = TASKS.get(name)
        assert task.config_cls is cls and task.needs(cls()) == {"n_last_blocks": None}
        assert task.needs(cls(variants=["cls"])) == {}
        for explicit in (2, 4):
            with_features = SimpleNamespace(
                variants=["cls", "cls_last4"], features=SimpleNamespace(n_last_blocks=explicit)
            )
            assert task.needs(with_features) == {"n_last_blocks": 4}


def test_cls_last4_is_the_last_min_4_depth_blocks():
    shallow = blobs(120, seed=3, last_blocks=2)
    shallow.meta["layout"] = {**shallow.layout, "num_blocks": 2}
    out = linear(feature_context(shallow, shallow), LinearConfig(**{**FAST, "epochs": 1}))
    assert out.extra["variants"]["used"] == ["cls", "cls_last4", "cls_patch"]
    assert out.extra["variants"]["cls_last4_blocks"] == 2 and not out.extra["variants"]["skipped"]
    deep = blobs(120, seed=3, last_blocks=2)
    deep.meta["layout"] = {**deep.layout, "num_blocks": 12}  # 12 blocks: 4 expected
    with pytest.raises(UserError, match=r"min\(4, depth\) = 4 blocks"):
        linear(feature_context(deep, deep), LinearConfig(**FAST))


def test_variants_without_a_cls_token_are_skipped_with_a_note():
    pooled = blobs(120, seed=4, last_blocks=1)
    pooled.cls_last_n = pooled.cls_last_n[:, :0]
    no_cls = {"cls": "pooled features (no CLS token)", "cls_token": False}
    pooled.meta["layout"] = {**pooled.layout, **no_cls, "block_features": False}
    notes = []
    ctx = feature_context(pooled, pooled, log=notes.append)
    out = linear(ctx, LinearConfig(**{**FAST, "epochs": 1}))  # default variants
    record = out.extra["variants"]
    assert record["requested"] == ["cls", "cls_last4", "cls_patch"] and record["used"] == ["cls"]
    assert set(record["skipped"]) == {"cls_last4", "cls_patch"}
    assert record["cls_last4_blocks"] is None and record["cls"].startswith("pooled")
    assert {h["feature"] for h in out.extra["heads"]} == {"cls"}
    assert any("cls_last4 skipped" in n for n in notes)
    with pytest.raises(UserError, match="none of the requested feature variants"):
        linear(ctx, LinearConfig(**FAST, variants=["cls_last4"]))


def test_augment_mode_trains_on_live_augmented_features(tiny_imagefolder):
    from ibot_bench.downstream.live_features import augmented_source
    from ibot_bench.features import FeatureConfig, extract_features

    cfg = FeatureConfig(img_size=32, num_workers=0, precision="fp32", n_last_blocks=4)
    spec = f"imagefolder:{tiny_imagefolder}"
    train = extract_features("random:vit_tiny_patch8", spec, "train", cfg, progress=False)
    test = extract_features("random:vit_tiny_patch8", spec, "val", cfg, progress=False)
    ctx = feature_context(train, test, "random:vit_tiny_patch8", spec, feature_config=cfg)
    source = augmented_source(ctx, train, (0.3, 1.0), seed=0, device=torch.device("cpu"))
    rows = np.array([0, 5, 11])
    first, second = source(rows), source(rows)
    assert first["cls"].shape == (3, 192) and first["cls_last4"].shape == (3, 768)
    assert first["cls_patch"].shape == (3, 384)
    assert not torch.allclose(first["cls"], second["cls"])  # fresh crops every call
    assert not torch.allclose(first["cls"], torch.from_numpy(train.cls[rows]))
    out = linear(ctx, LinearConfig(**{**FAST, "epochs": 2, "batch_size": 4}, augment=True,
                                   val_fraction=0.25))  # fmt: skip
    assert out.protocol == "linear-aug" and 0 <= out.metrics["top1"] <= 100


def test_heads_as_one_matmul_train_like_separate_torch_heads():
    """Each column block trains as its own ``nn.Linear`` with torch's SGD and cosine schedule
    would: same init draws, same batches, its own lr (weight decay on)."""
    fs, cpu = blobs(120, 0), torch.device("cpu")
    cfg = LinearConfig(
        epochs=3,
        batch_size=32,
        base_lrs=[0.01, 0.5],
        variants=["cls", "cls_patch"],
        weight_decay=1e-3,
        device="cpu",
        precision="fp32",  # the maths, compared with fp32 torch heads
    )
    specs, rows = head_specs(cfg), np.arange(120)
    model = train_heads(fs, rows, specs, 6, cfg)
    test = feature_batch(blobs(50, 1), np.arange(50), ["cls", "cls_patch"], cpu)
    with torch.no_grad():
        ours = model(test)
    gen = torch.Generator().manual_seed(cfg.seed)
    dims = {"cls": 16, "cls_patch": 32}
    inits = [torch.normal(0.0, 0.01, (6, dims[s.feature]), generator=gen) for s in specs]
    for h, spec in enumerate(specs):
        head = torch.nn.Linear(dims[spec.feature], 6)
        with torch.no_grad():
            head.weight.copy_(inits[h])
            head.bias.zero_()
        opt = torch.optim.SGD(head.parameters(), lr=spec.lr, momentum=0.9, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * 4)
        rng = np.random.default_rng(cfg.seed)
        for _ in range(cfg.epochs):
            perm = rng.permutation(rows)
            for start in range(0, 120, 32):
                batch = perm[start : start + 32]
                x = feature_batch(fs, batch, [spec.feature], cpu)[spec.feature]
                loss = torch.nn.functional.cross_entropy(
                    head(x), torch.from_numpy(fs.labels[batch])
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            expected = head(test[spec.feature])
        assert torch.allclose(ours[h], expected, atol=1e-4, rtol=1e-4), spec


def test_linear_precision_auto_is_measured_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("IBOT_BENCH_CACHE", str(tmp_path))
    default = linear(feature_context(TRAIN, TEST), LinearConfig(**FAST, variants=["cls"]))
    assert default.extra["precision"] == "fp32"  # the reference's precision, nothing timed
    assert not (tmp_path / "precision").exists()
    auto = LinearConfig(**FAST, variants=["cls"], precision="auto")
    out = linear(feature_context(TRAIN, TEST), auto)
    assert out.extra["precision"] in ("fp32", "bf16")
    assert len(list((tmp_path / "precision").glob("*.json"))) == 1  # the decision is cached
    again = linear(feature_context(TRAIN, TEST), auto)
    assert again.extra["precision"] == out.extra["precision"]


def test_linear_precision_fp16_is_refused():
    with pytest.raises(ConfigError, match="auto, fp32 or bf16"):
        linear(feature_context(TRAIN, TEST), LinearConfig(**FAST, precision="fp16"))


def _stop_at(monkeypatch, call: int, stop) -> None:
    """Make the ``call``-th training step of the heads call ``stop()`` first."""
    import ibot_bench.downstream.linear as linear_mod

    monkeypatch.setattr(
        linear_mod, "heads_gradients", on_call(call, stop, linear_mod.heads_gradients)
    )


def test_stopped_linear_probe_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    """Ctrl-C mid-epoch saves the heads, momentum, position and the best-so-far; the rerun
    ends with the numbers of a run never stopped, and removes the saved state."""
    import os
    import signal

    from ibot_bench.interrupt import TrainingInterrupted

    cfg = LinearPaperConfig(**FAST, eval_every=2)
    whole = linear_paper(feature_context(TRAIN, TEST), cfg)
    ctx = feature_context(TRAIN, TEST, work_dir=tmp_path)
    _stop_at(
        monkeypatch, 20, lambda: os.kill(os.getpid(), signal.SIGINT)
    )  # 8 steps an epoch: in epoch 3 of 6
    with pytest.raises(TrainingInterrupted, match="epoch 3, row 256 of 480.*rerun the same"):
        linear_paper(ctx, cfg)
    assert (tmp_path / "linear_heads.pth").is_file()
    monkeypatch.undo()
    resumed = linear_paper(ctx, cfg)
    assert resumed.metrics == whole.metrics and resumed.extra == whole.extra
    assert not (tmp_path / "linear_heads.pth").exists()


def test_killed_linear_probe_resumes_from_its_last_save(tmp_path, monkeypatch):
    """A crash (or kill -9) loses only what came after the last periodic save; a damaged
    state file is moved aside and the training starts over, never trusted."""
    import ibot_bench.resume_file as resume_mod

    cfg = LinearConfig(**FAST, refit=True)
    whole = linear(feature_context(TRAIN, TEST), cfg)
    ctx = feature_context(TRAIN, TEST, work_dir=tmp_path)
    monkeypatch.setattr(resume_mod, "SAVE_EVERY_S", 0.0)  # save after every step

    def crash():
        raise RuntimeError("killed")

    _stop_at(monkeypatch, 7 * 6 + 4, crash)  # 42 steps choose the head (7 an epoch), then the refit
    with pytest.raises(RuntimeError, match="killed"):
        linear(ctx, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear_refit.pth"]
    monkeypatch.undo()
    assert linear(ctx, cfg).metrics == whole.metrics
    _stop_at(monkeypatch, 3, crash)
    monkeypatch.setattr(resume_mod, "SAVE_EVERY_S", 0.0)
    with pytest.raises(RuntimeError, match="killed"):
        linear(ctx, cfg)
    (tmp_path / "linear_heads.pth").write_bytes(b"PK\x03\x04 damaged")
    monkeypatch.undo()
    assert linear(ctx, cfg).metrics == whole.metrics
    assert [p.name for p in tmp_path.glob("linear_heads.pth.unusable-*")]


def test_stopped_augmented_probe_draws_the_same_views_after_resuming(
    tiny_imagefolder, tmp_path, monkeypatch
):
    """The paper's augmented protocol (the long one): the augmentation RNG is saved too, so
    the resumed run sees the views an unstopped one would and ends with the same heads."""
    import os
    import signal

    from ibot_bench.downstream.live_features import live_views
    from ibot_bench.features import FeatureConfig, extract_features
    from ibot_bench.interrupt import TrainingInterrupted

    enc, spec = "random:vit_tiny_patch8", f"imagefolder:{tiny_imagefolder}"
    feats = FeatureConfig(img_size=32, num_workers=0, precision="fp32", n_last_blocks=4)
    train, test = (extract_features(enc, spec, s, feats, progress=False) for s in ("train", "val"))
    ctx = feature_context(train, test, enc, spec, feature_config=feats)
    cfg = LinearPaperConfig(epochs=2, batch_size=4, base_lrs=[0.1], variants=["cls"], augment=True)
    rows, specs, ckpt = np.arange(len(train)), head_specs(cfg), tmp_path / "heads.pth"

    def train_probe():
        return train_heads(train, rows, specs, 6, cfg, views=live_views(ctx, cfg), checkpoint=ckpt)

    whole = train_probe()
    _stop_at(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingInterrupted, match="SIGTERM; saved at epoch 1, row 8 of 12"):
        train_probe()
    monkeypatch.undo()
    resumed = train_probe()
    assert torch.equal(resumed.weight["cls"], whole.weight["cls"])
    assert torch.equal(resumed.bias["cls"], whole.bias["cls"])
