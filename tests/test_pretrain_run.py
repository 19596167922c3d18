"""End-to-end pretraining on seconds-long runs: checkpoints, exact resume, NaN stop, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import make_imagefolder

from ibot_bench.cli import main
from ibot_bench.config import load_config
from ibot_bench.encoders import load_encoder
from ibot_bench.errors import CheckpointError, ConfigError, DatasetError
from ibot_bench.interrupt import TrainingInterrupted
from ibot_bench.pretrain.config import PretrainConfig, validate
from ibot_bench.pretrain.loss import IbotLoss
from ibot_bench.pretrain.train import Trainer, TrainingDiverged, pretrain

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "smoke.yaml"


def smoke(out: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, SMOKE, [f"output_dir={out}", "threads=1", *overrides])


def test_cli_run_writes_official_layout_readable_by_ibot_loader(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(SMOKE), f"output_dir={out}", "optim.epochs=1"]) == 0
    assert "checkpoint" in capsys.readouterr().out
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert {"student", "teacher", "optimizer", "epoch", "args", "ibot_loss"} <= set(ck)
    assert ck["epoch"] == 1
    assert "module.backbone.masked_embed" in ck["student"]
    assert "backbone.masked_embed" not in ck["teacher"]
    for key in ("head.mlp.4.weight", "head.last_layer.weight_g", "head.last_layer2.weight_v"):
        assert key in ck["teacher"] and f"module.{key}" in ck["student"]
    assert (
        len(ck["student"]) == len(ck["teacher"]) + 1
    )  # docs/protocols.md#reference-subtleties: masked_embed only in student
    assert set(ck["ibot_loss"]) == {"center", "center2"}

    teacher = load_encoder(f"ibot:{out}/checkpoint.pth")
    assert teacher.head_state is not None and teacher.model.blocks[0].attn.num_heads == 2
    w = ck["teacher"]["backbone.blocks.1.attn.qkv.weight"]
    assert torch.equal(teacher.model.blocks[1].attn.qkv.weight, w)
    student = load_encoder(f"ibot:{out}/checkpoint.pth:student")
    assert student.info.extra["ignored_keys"] == ["masked_embed"]
    exported = load_encoder(f"ibot:{out}/teacher_backbone.safetensors")
    assert exported.model.blocks[0].attn.num_heads == 2  # named in its metadata
    assert torch.equal(exported.model.blocks[1].attn.qkv.weight, w)
    assert (out / "checkpoint_init.pth").is_file() and (out / "config.yaml").is_file()

    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["type"] == "train"]
    assert len(train) == 2
    for key in ("loss", "cls", "mim", "lr", "wd", "momentum", "teacher_temp", "img_per_s"):
        assert key in train[0]
    epoch = [r for r in lines if r["type"] == "epoch"][0]
    assert {"nmi", "ari", "fmi", "agreement"} <= set(epoch)


def _params(out: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    flat = {f"s.{k}": v for k, v in ck["student"].items()}
    flat |= {f"t.{k}": v for k, v in ck["teacher"].items()}
    flat |= {f"c.{k}": v for k, v in ck["ibot_loss"].items()}
    for i, state in ck["optimizer"]["state"].items():
        flat |= {f"o.{i}.{k}": v for k, v in state.items()}
    return flat


def test_resume_after_hard_stop_gives_identical_parameters(tmp_path):
    straight = tmp_path / "straight"
    Trainer(smoke(straight, "optim.epochs=2")).fit()  # 4 iterations
    resumed = tmp_path / "resumed"
    summary = Trainer(smoke(resumed, "optim.epochs=2", "max_iters=3")).fit()
    assert summary["stopped_early"] and summary["epoch_iter"] == 1  # mid-epoch stop
    Trainer(smoke(resumed, "optim.epochs=2")).fit()  # auto-resume from checkpoint.pth
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_the_step_and_resumes_exactly(tmp_path, monkeypatch, signum):
    """Ctrl-C or SIGTERM mid-epoch: the step finishes, checkpoint.pth holds it, the error says
    where, and a rerun ends with the same parameters as a run never stopped."""
    straight = tmp_path / "straight"
    Trainer(smoke(straight, "optim.epochs=2")).fit()  # 4 iterations
    out = tmp_path / "stopped"
    original, calls = Trainer._step, {"n": 0}

    def signalled(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-way through epoch 1
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", signalled)
    with pytest.raises(TrainingInterrupted, match="epoch 1, batch 1 .*rerun the same command"):
        Trainer(smoke(out, "optim.epochs=2")).fit()
    assert signal.getsignal(signum) is not None and calls["n"] == 3  # handler restored
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 3
    monkeypatch.setattr(Trainer, "_step", original)
    Trainer(smoke(out, "optim.epochs=2")).fit()
    a, b = _params(straight), _params(out)
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_resuming_another_file_keeps_the_output_folders_own_run(tmp_path):
    """--resume FILE into a folder with its own checkpoint.pth: another run's is refused, an
    unreadable one is moved aside (never rotated into checkpoint_prev.pth)."""
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(smoke(a, "seed=5", "max_iters=1")).fit()
    Trainer(smoke(b, "max_iters=1")).fit()
    before = (a / "checkpoint.pth").read_bytes()
    with pytest.raises(CheckpointError, match="holds another run .*seed"):
        Trainer(smoke(a), resume=str(b / "checkpoint.pth"))
    assert (a / "checkpoint.pth").read_bytes() == before
    Trainer(smoke(b, "max_iters=2")).fit()  # checkpoint_prev.pth: iteration 1
    good = (b / "checkpoint_prev.pth").read_bytes()
    (b / "checkpoint.pth").write_bytes((b / "checkpoint.pth").read_bytes()[:5000])
    Trainer(smoke(b), resume=str(b / "checkpoint_prev.pth")).fit()
    assert len(list(b.glob("checkpoint.pth.unreadable-*"))) == 1
    assert torch.load(b / "checkpoint.pth", weights_only=True)["iteration"] > 1
    prev = torch.load(b / "checkpoint_prev.pth", weights_only=True)  # readable, not the bad one
    assert prev["iteration"] >= 1 and len(good) > 5000


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "nan"
    original, calls = IbotLoss.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        parts = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(IbotLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="intact"):
        Trainer(smoke(out)).fit()
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ck["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in ck["student"].values())


def test_bad_input_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="global_size has 3 values for 2 crops"):
        validate(smoke(tmp_path, "crops.global_size=[32,32,32]"))
    with pytest.raises(ConfigError, match="not divisible by model.patch_size"):
        validate(smoke(tmp_path, "crops.local_size=[12]"))
    with pytest.raises(ConfigError, match="world size 3"):
        validate(smoke(tmp_path), world_size=3)
    with pytest.raises(
        ConfigError, match=r"optim.batch_size must be >= 1 \(the global batch\), got 0"
    ):
        validate(smoke(tmp_path, "optim.batch_size=0"))
    for override, message in [  # each once a traceback from deep inside, or silently wrong
        ("model.patch_size=0", "model.patch_size must be >= 1"),
        ("crops.color_jitter=[0.4,0.4,0.2]", "crops.color_jitter must be"),
        ("model.drop_path=2", r"model.drop_path must be in \[0, 1\)"),
        ("mask.pred_start_epoch=-5", "mask.pred_start_epoch must be >= 0"),
        ("loss.student_temp=0", "loss.student_temp must be > 0"),
        ("head.hidden_dim=0", "head.hidden_dim must be >= 1"),
        ("optim.momentum_teacher=2", r"optim.momentum_teacher must be in \[0, 1\]"),
        ("crops.global_scale=[0.5,2.0]", "crops.global_scale must be <= 1"),
        ("crops.blur_sigma=[0.1,1e9]", "crops.blur_sigma must be <= 100"),
        ("save_every_iters=-1", "save_every_iters must be >= 0"),
        ("monitor_knn=-1", "monitor_knn must be >= 0"),  # was silently off
        ("threads=-2", r"threads must be >= 0 \(0: torch's default\) or -1 \(automatic\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(smoke(tmp_path, override))
    with pytest.raises(DatasetError, match="fewer than one batch"):
        Trainer(smoke(tmp_path, "optim.batch_size=64"))
    empty = tmp_path / "empty" / "train" / "a"
    empty.mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        Trainer(smoke(tmp_path, f"data=imagefolder:{tmp_path / 'empty'}"))


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_one_line_with_pretrainings_own_advice(tmp_path, capsys, workers):
    """Also from a loader worker (whose traceback torch wraps into the message): one line, the
    file, and advice pretraining can follow (it has no skip option)."""
    root = make_imagefolder(tmp_path / "data", classes=2, per_class=8)
    bad = next((root / "train" / "class_0").iterdir())
    bad.write_bytes(bad.read_bytes()[:300])
    args = [f"data=imagefolder:{root}", f"num_workers={workers}", "augment=per-image"]
    args.append("monitor_knn=0")  # the kNN monitor reads in this process: the loader first
    assert main(["pretrain", "--config", str(SMOKE), f"output_dir={tmp_path / 'o'}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ibot-bench: error: cannot read image {bad}")
    assert "does not skip images" in err and "--force-resume" in err
    assert "skip_corrupt" not in err and "Traceback" not in err


def test_refuses_to_resume_into_another_architecture(tmp_path):
    out = tmp_path / "arch"
    Trainer(smoke(out, "optim.epochs=1")).fit()
    with pytest.raises(CheckpointError, match="embed_dim: checkpoint 32 vs config 64"):
        Trainer(smoke(out, "model.embed_dim=64"))


@pytest.mark.parametrize("path", sorted(SMOKE.parent.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path):
    cfg = load_config(PretrainConfig, path)
    validate(cfg, world_size=1)


def test_batched_augmentation_trains_and_ignores_the_worker_count(tmp_path):
    losses = {}
    for mode, workers in (("batched", 0), ("batched", 1), ("per-image", 0)):
        trainer = Trainer(
            smoke(tmp_path / f"{mode}{workers}", f"augment={mode}", f"num_workers={workers}")
        )
        assert trainer.augment == mode
        last = trainer.fit()["last"]
        assert math.isfinite(last["loss"]), mode
        losses[mode, workers] = last["loss"]
    assert losses["batched", 0] == losses["batched", 1]  # crops seeded per batch
    assert losses["batched", 0] != losses["per-image", 0]


def test_compile_wraps_the_blocks_the_networks_call(tmp_path):
    """compile=true must reach the code that runs: the networks call
    backbone.forward_tokens (not backbone.forward), which runs the blocks through __call__."""
    cfg = load_config(PretrainConfig, SMOKE, [f"output_dir={tmp_path}", "compile=true"])
    trainer = Trainer(cfg)
    for network in (trainer.student, trainer.teacher):
        blocks = list(network.backbone.blocks)
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
        assert not any("_orig_mod" in k for k in network.state_dict())  # checkpoint keys as usual
    # each block (its own drop-path rate) and crop size is a graph: none may fall back to eager
    depth = len(trainer.student.backbone.blocks)
    assert torch._dynamo.config.recompile_limit >= 4 * depth + 8


def test_the_runs_thread_count_ends_with_the_run(tmp_path):
    """A suite evaluates in the pretraining's process: ``threads=1`` must not outlive it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pretrain(smoke(tmp_path / "run", "optim.epochs=1", "max_iters=2", "save_every_iters=0"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
