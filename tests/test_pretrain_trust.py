"""Pretraining numbers you can trust: no NaN checkpoint, resume signature, reference-layout
resume with correctly paired optimizer state, bad files in the output folder."""

from __future__ import annotations

import argparse
import os
import resource
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_imagefolder

import ibot_bench.pretrain.train as train_module
from ibot_bench.cli import main
from ibot_bench.config import load_config
from ibot_bench.errors import CheckpointError
from ibot_bench.pretrain.checkpoint import RUNTIME_KEYS
from ibot_bench.pretrain.config import PretrainConfig
from ibot_bench.pretrain.train import Trainer, TrainingDiverged

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "smoke.yaml"


def smoke(out: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, SMOKE, [f"output_dir={out}", "threads=1", *overrides])


def cli(out: Path, *args: str) -> int:
    return main(["pretrain", "--config", str(SMOKE), f"output_dir={out}", "threads=1", *args])


def tensors(obj, where=""):
    """Every tensor of a (nested) checkpoint, with where it sits."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{where}[{i}]")


def assert_finite(path: Path) -> dict:
    ck = torch.load(path, weights_only=True)
    bad = [w for w, t in tensors(ck) if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, (path, bad[:5])
    return ck


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- 1. NaN never overwrites a good checkpoint
def test_huge_lr_stops_truthfully_and_the_named_checkpoint_resumes(tmp_path, capsys):
    out = tmp_path / "huge"
    assert cli(out, "optim.lr=1e6") == 2
    line = error_line(capsys)
    assert "training diverged" in line and "optim.lr" in line and "--force-resume" in line
    for path in out.glob("*.pth"):  # checkpoint.pth, _prev, _init: every tensor finite
        assert_finite(path)
    # the weights of checkpoint.pth are finite but gave the NaN loss: the message says so and
    # names the one before, which must be the state whose loss was still finite
    current = torch.load(out / "checkpoint.pth", weights_only=True)
    previous = torch.load(out / "checkpoint_prev.pth", weights_only=True)
    assert f"iteration={current['iteration']}) is intact and finite, but holds exactly" in line
    assert (
        f"checkpoint_prev.pth (epoch={previous['epoch']}, iteration={previous['iteration']})"
        in line
    )
    assert previous["iteration"] < current["iteration"]
    # the advice works: lower the lr, resume the named checkpoint with --force-resume
    prev = str(out / "checkpoint_prev.pth")
    assert cli(out, "optim.lr=5e-4", "--resume", prev, "--force-resume") == 0
    final = assert_finite(out / "checkpoint.pth")
    assert final["epoch"] == 2
    history = yaml.safe_load((out / "config_history.yaml").read_text())
    assert history[-1]["event"] == "forced-resume"
    assert history[-1]["changed"]["optim.lr"] == {"checkpoint": 1e6, "config": 5e-4}


def test_nonfinite_weights_are_never_written(tmp_path, monkeypatch):
    out = tmp_path / "nanweights"
    original, calls = train_module.ema_update, {"n": 0}

    def poisoned(teacher, student, momentum):
        original(teacher, student, momentum)
        calls["n"] += 1
        if calls["n"] == 2:  # the teacher goes NaN in iteration 1; its loss is still finite
            teacher[0].fill_(float("nan"))

    monkeypatch.setattr(train_module, "ema_update", poisoned)
    with pytest.raises(TrainingDiverged) as err:
        Trainer(smoke(out)).fit()
    msg = str(err.value)
    assert "non-finite values in teacher backbone.cls_token" in msg
    assert "nothing non-finite was written" in msg
    assert "checkpoint.pth (epoch=0, iteration=1); it is intact" in msg
    assert "lower optim.lr" in msg and "optim.warmup_epochs" in msg and "--force-resume" in msg
    ck = assert_finite(out / "checkpoint.pth")
    assert ck["iteration"] == 1
    assert not (out / "teacher_backbone.safetensors").exists()  # epoch-end export skipped too


# ---------------------------------------------------------------- 2. resume signature
def test_resume_signature_refuses_names_keys_and_keeps_config(tmp_path, capsys):
    out = tmp_path / "sig"
    Trainer(smoke(out, "optim.epochs=3", "max_iters=2")).fit()
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError) as err:
        Trainer(smoke(out, "optim.epochs=3", "seed=1", "optim.batch_size=4"))
    msg = str(err.value)
    assert "seed: checkpoint 0 vs config 1" in msg
    assert "optim.batch_size: checkpoint 8 vs config 4" in msg
    assert "--force-resume" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match=r"optim.epochs: checkpoint 3 vs config 4"):
        Trainer(smoke(out, "optim.epochs=4"))  # the schedule
    with pytest.raises(CheckpointError, match=r"loss.teacher_temp: checkpoint 0.04 vs config"):
        Trainer(smoke(out, "optim.epochs=3", "loss.teacher_temp=0.07"))
    with pytest.raises(CheckpointError, match=r"data: checkpoint .* data_fingerprint"):
        Trainer(smoke(out, "optim.epochs=3", "data=synthetic:shapes?classes=4&size=32&train=5"))
    assert cli(out, "optim.epochs=3", "crops.local_number=1") == 2
    assert "crops.local_number: checkpoint 2 vs config 1" in error_line(capsys)
    assert (out / "config.yaml").read_text() == config_before  # never overwritten on refusal
    assert len(yaml.safe_load((out / "config_history.yaml").read_text())) == 1

    # identical settings resume; runtime-only keys may differ
    runtime = ["num_workers=0", "threads=2", "progress=false", "log_every=5", "save_every_iters=0"]
    resumed = Trainer(smoke(out, "optim.epochs=3", *runtime))
    assert resumed.resumed_from == out / "checkpoint.pth" and resumed.state.epoch == 1
    resumed.fit()
    history = yaml.safe_load((out / "config_history.yaml").read_text())
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["config_yaml_changed"]["log_every"] == {"before": 1, "now": 5}
    assert "changed" not in history[1]


def test_force_resume_continues_and_records_the_change(tmp_path):
    out = tmp_path / "force"
    Trainer(smoke(out, "max_iters=1")).fit()
    Trainer(smoke(out, "seed=3", "optim.lr=1e-4"), force_resume=True).fit()
    history = yaml.safe_load((out / "config_history.yaml").read_text())
    assert [h["event"] for h in history] == ["start", "forced-resume"]
    assert history[1]["changed"] == {
        "seed": {"checkpoint": 0, "config": 3},
        "optim.lr": {"checkpoint": 0.0005, "config": 0.0001},
    }
    assert history[1]["iteration"] == 1
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ck["epoch"] == 2
    assert [h["event"] for h in ck["args"]["config_history"]] == ["start", "forced-resume"]
    assert ck["resume_signature"]["seed"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    # the architecture can't be forced: the weights would not fit
    with pytest.raises(CheckpointError, match="not even with --force-resume"):
        Trainer(smoke(out, "seed=3", "optim.lr=1e-4", "model.depth=3"), force_resume=True)


def test_resume_refuses_changed_dataset_files(tmp_path):
    root = make_imagefolder(tmp_path / "data", classes=3, per_class=4)
    out = tmp_path / "files"
    cfg = ["optim.epochs=2", f"data=imagefolder:{root}?size=32", "optim.batch_size=4"]
    Trainer(smoke(out, *cfg, "max_iters=1")).fit()
    extra = root / "train" / "class_0" / "extra.jpg"
    extra.write_bytes((root / "train" / "class_0" / "train_0_0.jpg").read_bytes())
    with pytest.raises(CheckpointError) as err:
        Trainer(smoke(out, *cfg))
    assert "data_fingerprint: checkpoint" in str(err.value)
    assert "data:" not in str(err.value)  # same spec: only the content changed
    extra.unlink()
    assert Trainer(smoke(out, *cfg)).resumed_from is not None


def test_runtime_keys_are_documented_config_keys():
    flat = set(PretrainConfig.__dataclass_fields__)
    assert set(RUNTIME_KEYS) <= flat
    assert not {"seed", "data", "precision", "optim", "crops", "mask", "loss"} & set(RUNTIME_KEYS)


# ---------------------------------------------------------------- 3. reference-layout checkpoint
def reference_names(student: torch.nn.Module) -> list[str]:
    """The reference model's named_parameters order: ours, with every weight-normed layer's
    ``weight_g`` placed before its ``weight_v`` (torch.nn.utils.weight_norm registers g
    first), whatever our own registration order is."""
    names = [n for n, _ in student.named_parameters()]
    for layer in {n.rsplit(".", 1)[0] for n in names if n.endswith(".weight_g")}:
        i, j = names.index(f"{layer}.weight_g"), names.index(f"{layer}.weight_v")
        lo, hi = min(i, j), max(i, j)
        names[lo], names[hi] = f"{layer}.weight_g", f"{layer}.weight_v"
    return names


def write_reference_checkpoint(trainer: Trainer, path: Path, args, legacy: bool = False) -> dict:
    """The trainer's state in the reference iBOT layout: student ``module.*``, teacher plain,
    optimizer slots in the reference order (regularised group then not, each in
    named_parameters order); no signature, names, rng or epoch_iter. ``legacy``: the old
    ibot-bench order (weight_v first). Returns the per-name Adam state of the source."""
    params = dict(trainer.student.named_parameters())
    order = reference_names(trainer.student)
    if legacy:
        for k, n in enumerate(order[:-1]):
            if n.endswith(".weight_g") and order[k + 1] == n[:-1] + "v":
                order[k], order[k + 1] = order[k + 1], n
    trainable = [n for n in order if params[n].requires_grad]
    plain = [n for n in trainable if n.endswith(".bias") or params[n].ndim == 1]
    regularised = [n for n in trainable if n not in plain]
    flat = regularised + plain
    source = {
        n: {k: v.clone() for k, v in trainer.optimizer.state[params[n]].items()} for n in flat
    }
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    state = {
        "student": {f"module.{k}": v for k, v in trainer.student.state_dict().items()},
        "teacher": trainer.teacher.state_dict(),
        "optimizer": {
            "state": {i: source[n] for i, n in enumerate(flat)},
            "param_groups": [
                {**hyper[0], "params": list(range(len(regularised)))},
                {**hyper[1], "params": list(range(len(regularised), len(flat)))},
            ],
        },
        "epoch": trainer.state.epoch,
        "ibot_loss": trainer.loss.state_dict(),
    }
    if args is not None:
        state["args"] = args
    torch.save(state, path)
    return source


@pytest.mark.parametrize(
    ("shared", "args", "legacy"),
    [
        (True, None, False),
        (False, argparse.Namespace(arch="vit_small", patch_size=8, out_dim=64), False),
        (False, None, True),
    ],
    ids=["shared-no-args", "separate-namespace-args", "legacy-order"],
)
def test_resume_reference_layout_pairs_adam_state_by_parameter(tmp_path, shared, args, legacy):
    head = [
        f"head.shared_head={str(shared).lower()}",
        "head.norm_last_layer=false",  # weight_g trained: it has Adam moments
        "optim.freeze_last_layer=0",
    ]
    src = Trainer(smoke(tmp_path / "src", *head, "max_iters=2"))
    src.fit()  # one epoch
    names = [n for n, _ in src.student.named_parameters()]
    assert names.index("head.last_layer.weight_g") < names.index("head.last_layer.weight_v")
    ref = tmp_path / "ref_checkpoint.pth"
    source = write_reference_checkpoint(src, ref, args, legacy)
    assert any(n.endswith("weight_g") for n in source)

    dst = Trainer(smoke(tmp_path / "dst", *head), resume=str(ref))
    assert dst.resumed_from == ref and dst.state.epoch == 1
    params = dict(dst.student.named_parameters())
    for name, expected in source.items():
        got = dst.optimizer.state[params[name]]
        assert got["exp_avg"].shape == params[name].shape, name
        assert torch.equal(got["exp_avg"], expected["exp_avg"]), name
        assert torch.equal(got["exp_avg_sq"], expected["exp_avg_sq"]), name
    src_params = dict(src.student.named_parameters())
    assert all(torch.equal(p, src_params[n]) for n, p in params.items())
    dst.fit()  # continues training
    ck = assert_finite(tmp_path / "dst" / "checkpoint.pth")
    assert ck["epoch"] == 2
    history = yaml.safe_load((tmp_path / "dst" / "config_history.yaml").read_text())
    assert history[0]["event"] == "resume-unverified"


def test_weight_norm_parameter_order_and_loading_by_name():
    from ibot_bench.pretrain.head import WeightNormLinear

    layer = WeightNormLinear(4, 3)
    assert [n for n, _ in layer.named_parameters()] == ["weight_g", "weight_v"]
    old_order = {"weight_v": torch.randn(3, 4), "weight_g": torch.rand(3, 1)}  # older files
    layer.load_state_dict(old_order)
    assert torch.equal(layer.weight_v, old_order["weight_v"])
    assert torch.equal(layer.weight_g, old_order["weight_g"])


# ---------------------------------------------------------------- 4. bad files in the output folder
def test_directory_named_checkpoint_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "dir"
    (out / "checkpoint.pth").mkdir(parents=True)
    assert cli(out) == 2
    line = error_line(capsys)
    assert "checkpoint.pth is a directory" in line and "move or delete it" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth"]  # nothing trained
    (out / "checkpoint.pth").rmdir()
    (out / "config.yaml").mkdir()
    with pytest.raises(CheckpointError, match="config.yaml is a directory"):
        Trainer(smoke(out))


def test_checkpoint_missing_keys_is_refused(tmp_path, capsys):
    out = tmp_path / "keys"
    out.mkdir()
    torch.save({"student": {}, "epoch": 1}, out / "checkpoint.pth")
    assert cli(out) == 2
    line = error_line(capsys)
    assert "checkpoint.pth is not a full training checkpoint" in line
    assert "missing teacher, optimizer, ibot_loss" in line
    assert not (out / "log.jsonl").exists()


def test_truncated_checkpoint_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "cut"
    Trainer(smoke(out, "max_iters=1")).fit()
    path = out / "checkpoint.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert cli(out) == 2
    line = error_line(capsys)
    assert "cannot read checkpoint" in line and "truncated" in line and "--resume" in line
    assert path.stat().st_size == len(data) // 2


@pytest.mark.parametrize("part", ["student", "optimizer", "rng"])
def test_checkpoint_claiming_huge_tensors_allocates_nothing(tmp_path, part):
    out = tmp_path / f"huge_{part}"
    Trainer(smoke(out, "max_iters=1")).fit()
    path = out / "checkpoint.pth"
    ck = torch.load(path, weights_only=True)
    huge = torch.zeros(1).expand(1 << 20, 1 << 18)  # claims 2^38 floats (1 TiB), stores one
    if part == "student":
        ck["student"]["module.backbone.pos_embed"] = huge
    elif part == "optimizer":
        ck["optimizer"]["state"][0]["exp_avg"] = huge
    else:
        ck["rng"]["rank0"]["torch"] = huge
    torch.save(ck, path)
    assert path.stat().st_size < 10 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as err:
        Trainer(smoke(out))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500
    msg = str(err.value)
    assert "[1048576, 262144]" in msg and "\n" not in msg
    if part == "student":
        assert "backbone.pos_embed: checkpoint [1048576, 262144] vs model" in msg


def test_older_checkpoints_are_compared_by_their_recorded_config(tmp_path):
    out = tmp_path / "older"
    Trainer(smoke(out, "max_iters=1")).fit()
    path = out / "checkpoint.pth"
    ck = torch.load(path, weights_only=True)
    del ck["resume_signature"], ck["optimizer_param_names"]  # as ibot-bench wrote them before
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="seed: checkpoint 0 vs config 5"):
        Trainer(smoke(out, "seed=5"))
    trainer = Trainer(smoke(out))
    assert trainer.resumed_from == path
    assert trainer.history_entry["note"].startswith("older checkpoint")


def test_half_written_files_of_a_killed_run_are_removed(tmp_path):
    """A SIGKILL during a save leaves the temp file (a checkpoint's can be GBs): pretraining's
    output folder and an evaluation's work folder drop those of dead writers on the rerun."""
    import socket
    import subprocess
    import sys

    from ibot_bench.io import temp_prefix
    from ibot_bench.pretrain.checkpoint import check_output_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = f".checkpoint.pth.~{socket.gethostname()}-{os.getpid()}~x.tmp"  # this process
    out = tmp_path / "pretrain"
    out.mkdir()
    stale = out / f".checkpoint.pth.~{socket.gethostname()}-{dead.pid}~x.tmp"
    for path in (stale, out / alive):
        path.write_bytes(b"half")
    check_output_dir(out)
    assert not stale.exists() and (out / alive).exists()
    assert temp_prefix(out / "checkpoint.pth").startswith(".checkpoint.pth.~")

    results = tmp_path / "eval"
    args = ["eval", "knn", "--encoder", "random:vit_tiny_patch8", "--data", "digits"]
    args += ["--output", str(results), "--cache-dir", str(tmp_path / "cache"), "ks=[5]"]
    assert main(args) == 0
    (config,) = (results / "configs").glob("knn__*.yaml")  # TASK__PROTOCOL__RUN-KEY.yaml
    task, _protocol, key = config.stem.split("__", 2)
    work = results / "work" / f"{task}__{key}__seed0"
    work.mkdir(parents=True)
    planted = work / f".linear_heads.pth.~{socket.gethostname()}-{dead.pid}~y.tmp"
    planted.write_bytes(b"half")
    assert main(args) == 0
    assert not planted.exists()
