"""The one task interface: what a TaskContext serves, and how the runner uses it."""

from __future__ import annotations

import pytest
from conftest import write_ibot_checkpoint

import ibot_bench.tasks as tasks_mod
from ibot_bench.cli import main
from ibot_bench.encoders import load_encoder
from ibot_bench.errors import CheckpointError, UserError
from ibot_bench.evaluate import plan_eval, run_eval
from ibot_bench.features import FeatureConfig
from ibot_bench.records import read_records
from ibot_bench.tasks import TaskContext, discover_tasks

CFG = FeatureConfig(img_size=32, num_workers=0, precision="fp32")


@pytest.fixture
def counted_loads(monkeypatch) -> list[str]:
    """Every encoder the task contexts build, by spec."""
    loads: list[str] = []

    def counting(spec: str, *, allow_partial: bool = False):
        loads.append(spec)
        return load_encoder(spec, allow_partial=allow_partial)

    monkeypatch.setattr(tasks_mod, "load_encoder", counting)
    return loads


def ibot_checkpoint(tmp_path, drop: str | None = None):
    return write_ibot_checkpoint(tmp_path / "ckpt.pth", drop=drop)


def test_encoder_is_built_once_and_features_reuse_it(tiny_imagefolder, tmp_path, counted_loads):
    spec, data = f"ibot:{ibot_checkpoint(tmp_path)}", f"imagefolder:{tiny_imagefolder}"
    ctx = TaskContext(spec, data, feature_config=CFG, cache_dir=tmp_path / "cache")
    head = ctx.encoder().head_state
    train, val = ctx.features("train"), ctx.features("val")
    assert ctx.encoder().head_state is head and ctx.features("val") is val
    assert counted_loads == [spec]  # the cache misses used the encoder already built
    assert ctx.arch() == "vit_tiny_patch8" and ctx.size("train") == len(train) == 12

    again = TaskContext(spec, data, feature_config=CFG, cache_dir=tmp_path / "cache")
    assert again.features("val").meta["cache_hit"] and counted_loads == [spec]  # no model
    assert again.arch() == "vit_tiny_patch8"


def test_encoder_honours_allow_partial(tiny_imagefolder, tmp_path):
    spec = f"ibot:{ibot_checkpoint(tmp_path, drop='blocks.0.attn.qkv.weight')}"
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight"):
        TaskContext(spec, f"imagefolder:{tiny_imagefolder}").encoder()
    partial = TaskContext(spec, f"imagefolder:{tiny_imagefolder}", allow_partial=True).encoder()
    assert partial.info.extra["partial"]


def test_cluster_head_loads_the_encoder_once_through_the_runner(
    tiny_imagefolder, tmp_path, counted_loads
):
    spec = f"ibot:{ibot_checkpoint(tmp_path)}"
    overrides = ["features.img_size=32", "features.num_workers=0", "features.precision=fp32"]
    record = run_eval(
        "cluster-head",
        spec,
        f"imagefolder:{tiny_imagefolder}",
        overrides=overrides,
        output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        log=lambda _m: None,
    )
    assert record.protocol == "cluster-head" and record.encoder["arch"] == "vit_tiny_patch8"
    assert counted_loads == [spec]


def test_the_runner_asks_the_task_for_its_features(tiny_imagefolder):
    data = f"imagefolder:{tiny_imagefolder}"
    plan = plan_eval("linear", "random:vit_tiny_patch8", data, overrides=["variants=[cls]"])
    assert plan.config["features"]["n_last_blocks"] is None  # the user's (default) setting stands
    plan_eval("linear", "random:vit_tiny_patch8", data, overrides=["variants=[cls]",
              "features.n_last_blocks=2"])  # fmt: skip
    with pytest.raises(UserError, match="needs features.n_last_blocks=4"):
        plan_eval("linear", "random:vit_tiny_patch8", data, overrides=["features.n_last_blocks=2"])
    with pytest.raises(UserError, match="needs features.n_last_blocks=4"):
        plan_eval("semi", "random:vit_tiny_patch8", data, overrides=["features.n_last_blocks=1"])
    plan_eval("semi", "random:vit_tiny_patch8", data,
              overrides=["features.n_last_blocks=1", "methods=[knn,logreg]"])  # fmt: skip


def test_every_task_takes_one_context():
    for name in discover_tasks():
        task = discover_tasks().get(name)
        params = list(task.fn.__code__.co_varnames[: task.fn.__code__.co_argcount])
        assert params == ["ctx", "cfg"], (name, params)


def test_cli_features_takes_feature_overrides_only(tiny_imagefolder, capsys):
    base = ["features", "--encoder", "random:vit_tiny_patch8", "--data",
            f"imagefolder:{tiny_imagefolder}", "--split", "val"]  # fmt: skip
    assert main([*base, "img_size=32"]) == 2
    assert "features.KEY=VALUE" in capsys.readouterr().err
    assert main([*base, "features.img_sise=32"]) == 2
    assert "Did you mean 'img_size'" in capsys.readouterr().err
    assert main([*base, "features.img_size=32", "features.precision=fp32"]) == 0
    assert "cls         (12, 192)" in capsys.readouterr().out


def test_pretrain_output_flag(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--config", "smoke", "--output", str(out), "optim.epochs=1", "threads=1"]
    assert main(args) == 0
    assert (out / "checkpoint.pth").is_file()
    assert "output_dir: " + str(out) in (out / "config.yaml").read_text()


def test_partial_load_is_recorded_and_marked_on_the_leaderboard(tiny_imagefolder, tmp_path):
    """--allow-partial leaves a trace: the record says which keys did not match (also when
    the features come from the cache), and the leaderboard legend marks the row."""
    spec = f"ibot:{ibot_checkpoint(tmp_path, drop='blocks.0.attn.qkv.weight')}"
    data, out = f"imagefolder:{tiny_imagefolder}", tmp_path / "out"
    args = ["eval", "knn", "--encoder", spec, "--data", data, "--output", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--allow-partial", "features.img_size=32",
            "features.num_workers=0", "features.precision=fp32", "ks=[1]"]  # fmt: skip
    for again in (False, True):  # the second run is a feature-cache hit: no model built
        assert main([*args, *(["seeds=[1]"] if again else [])]) == 0
    records = read_records(out)[0]
    assert len(records) == 2
    for record in records:
        assert record.encoder["partial"] is True
        assert record.encoder["partial_keys"]["missing"] == ["blocks.0.attn.qkv.weight"]
    assert main(["report", str(out), "--format", "md"]) == 0
    assert "(partial load: 1 missing key(s))" in (out / "leaderboard.md").read_text()
    # without the flag the cached features of the partial load are not used: the load refuses
    strict = [a for a in args if a != "--allow-partial"]
    assert main([*strict, "--output", str(tmp_path / "strict")]) == 2
