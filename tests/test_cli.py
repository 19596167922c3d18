"""The command line as a user meets it: help with examples, real runs, one-line errors."""

from __future__ import annotations

import fractions
import json
import os
from pathlib import Path

import pytest
import torch

from ibot_bench.cli import main
from ibot_bench.encoders import load_encoder
from ibot_bench.records import read_records


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", ["list", "data", "features", "eval", "version"])
def test_every_subcommand_help_shows_an_example(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "Example:" in capsys.readouterr().out


def test_list_and_version(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in ("ibot", "timm", "random", "imagefolder", "synthetic", "digits", "knn", "linear"):
        assert name in out
    code, out, _ = run(capsys, "version")
    assert code == 0 and "torch" in out and "ibot_bench" in out


def test_data_synth_then_features_and_eval(capsys, tmp_path):
    out_dir = tmp_path / "synth"
    code, out, _ = run(capsys, "data", "synth", str(out_dir), "--classes", "3", "--size", "32",
                       "--train", "4", "--val", "2")  # fmt: skip
    assert code == 0 and f"imagefolder:{out_dir}/imagenet" in out
    data = f"imagefolder:{out_dir}/imagenet?size=32"
    code, out, _ = run(capsys, "features", "--encoder", "random:vit_tiny_patch8", "--data", data,
                       "--split", "val", "features.precision=fp32")  # fmt: skip
    assert code == 0 and "cls         (6, 192)" in out and "img/s" in out
    code, out, _ = run(capsys, "features", "--encoder", "random:vit_tiny_patch8", "--data", data,
                       "--split", "val", "features.precision=fp32")  # fmt: skip
    assert "throughput  cached" in out
    results = tmp_path / "results"
    code, out, _ = run(capsys, "eval", "knn", "--encoder", "random:vit_tiny_patch8", "--data", data,
                       "--output", str(results), "ks=[1,3]", "features.precision=fp32",
                       "seeds=[0,1]")  # fmt: skip
    assert code == 0, out
    records, errors = read_records(results)
    assert not errors and len(records) == 1
    rec = records[0]
    assert rec.task == "knn" and rec.protocol == "knn" and "top1_k3" in rec.metrics
    assert "top1_std" in rec.metrics and rec.config["ks"] == [1, 3]
    assert (results / "configs").is_dir()
    # a corrupt record is reported by readers, not fatal
    (results / "records" / "broken.json").write_text("{not json")
    records, errors = read_records(results)
    assert len(records) == 1 and errors and "broken.json" in str(errors[0][0])


def _errors(tmp_path, tiny_imagefolder):
    """(argv, expected message fragment) for each bad input of the foundation issue."""
    data = f"imagefolder:{tiny_imagefolder}"
    not_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_dict)
    truncated = tmp_path / "trunc.pth"
    torch.save(load_encoder("random:vit_tiny").model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    other_arch = tmp_path / "small.pth"
    torch.save({"state_dict": load_encoder("random:vit_small").model.state_dict()}, other_arch)
    pickled = tmp_path / "code.pth"
    torch.save({"state_dict": {}, "extra": fractions.Fraction(1, 3)}, pickled)
    empty_class = tmp_path / "emptyclass"
    (empty_class / "val" / "a").mkdir(parents=True)
    corrupt = tmp_path / "corrupt"
    (corrupt / "val" / "a").mkdir(parents=True)
    (corrupt / "val" / "a" / "x.jpg").write_bytes(b"\xff\xd8 broken")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    feats = ["features", "--split", "val", "features.precision=fp32"]
    return [
        (feats + ["--encoder", "foo:bar", "--data", data], "unknown encoder scheme 'foo'"),
        (feats + ["--encoder", f"ibot:{tmp_path}/none.pth", "--data", data], "not found"),
        (feats + ["--encoder", f"ibot:{not_dict}", "--data", data], "state dict"),
        (feats + ["--encoder", f"ibot:{truncated}", "--data", data], "trunc.pth"),
        (
            feats + ["--encoder", f"timm:vit_tiny_patch16_224:{other_arch}", "--data", data],
            "vit_tiny_patch16_224",
        ),  # fmt: skip
        (feats + ["--encoder", f"ibot:{pickled}", "--data", data], "code.pth"),
        (
            feats + ["--encoder", "random:vit_tiny", "--data", f"imagefolder:{tmp_path}/nope"],
            "does not exist",
        ),  # fmt: skip
        (
            feats + ["--encoder", "random:vit_tiny", "--data", f"imagefolder:{empty_class}"],
            "has no images",
        ),  # fmt: skip
        (feats + ["--encoder", "random:vit_tiny", "--data", f"imagefolder:{corrupt}"], "x.jpg"),
        (
            feats + ["--encoder", "random:vit_tiny", "--data", data, "--cache-dir", f"{blocked}/c"],
            "not writable",
        ),  # fmt: skip
        (
            ["eval", "knn", "--encoder", "random:vit_tiny", "--data", data, "kss=[1]"],
            "unknown config key 'kss' in command-line overrides. Did you mean 'ks'?",
        ),  # fmt: skip
        (
            ["eval", "knn", "--encoder", "random:vit_tiny", "--data", data, "temperature=hot"],
            "temperature",
        ),  # fmt: skip
        (
            ["eval", "knn", "--encoder", "random:vit_tiny", "--data", data, "features.img_sz=3"],
            "Did you mean 'features.img_size'",
        ),  # fmt: skip
        (["eval", "knm", "--encoder", "random:vit_tiny", "--data", data], "Did you mean 'knn'"),
        (  # a space instead of ':' once blamed the path as a malformed override
            ["eval", "knn", "--encoder", "ibot", "/x.pth", "--data", data],
            "encoder spec 'ibot' must look like SCHEME:...",
        ),  # fmt: skip
        (
            ["eval", "knn", "--encoder", "random:a", "--encoder", "random:b", "--data", data],
            "--encoder given 2 times (random:a, random:b); eval takes one. To "
            "evaluate several encoders or datasets use a suite: ibot-bench run",
        ),
        (
            ["features", "--encoder", "random:vit_tiny", "--data", data, "--data", "digits"],
            f"--data given 2 times ({data}, digits); features takes one",
        ),
    ]


def test_bad_inputs_give_one_clear_message(capsys, tmp_path, tiny_imagefolder):
    for argv, fragment in _errors(tmp_path, tiny_imagefolder):
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert "Traceback" not in err, err
        (message,) = [line for line in err.splitlines() if "ibot-bench: error:" in line]
        assert fragment in message, (fragment, err)


def test_record_json_is_valid_and_complete(capsys, tmp_path, tiny_imagefolder):
    results = tmp_path / "r"
    code, out, err = run(capsys, "eval", "cluster", "--encoder", "random:vit_tiny_patch8",
                         "--data", f"imagefolder:{tiny_imagefolder}?size=32", "--output",
                         str(results), "features.precision=fp32")  # fmt: skip
    assert code == 0, err
    (path,) = (results / "records").glob("*.json")
    rec = json.loads(path.read_text())
    for key in ("task", "protocol", "encoder", "dataset", "metrics", "config", "seed",
                "versions", "device", "wall_time_s", "timestamp"):  # fmt: skip
        assert key in rec
    assert rec["protocol"] == "cluster-kmeans" and set(rec["metrics"]) >= {"nmi", "ari", "acc"}
    assert len(rec["encoder"]["fingerprint"]) == 64 and rec["dataset"]["fingerprint"]


@pytest.mark.parametrize("command", ["eval", "run"])
def test_output_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, monkeypatch, command):
    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr("ibot_bench.evaluate.run_eval", no_work)
    monkeypatch.setattr("ibot_bench.suites.run_suite", no_work)
    taken = tmp_path / "notes.txt"
    taken.write_text("")
    args = ["knn", "--data", "synthetic:shapes"] if command == "eval" else ["--suite", "smoke"]
    for output in (taken, taken / "sub"):
        code, _, err = run(capsys, command, *args, "--encoder", "random:vit_tiny_patch8",
                           "--output", str(output))  # fmt: skip
        assert code == 2 and f"{taken} is a file, not a folder" in err


@pytest.mark.parametrize("command", ["eval", "run", "report"])
def test_output_that_cannot_be_written_is_refused_before_any_work(
    capsys, tmp_path, monkeypatch, command
):
    """An --output folder this user may not write failed only when the first record was
    written (for eval: after the whole evaluation)."""

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    for target in ("evaluate.run_eval", "suites.run_suite", "leaderboard.write_reports"):
        monkeypatch.setattr(f"ibot_bench.{target}", no_work)
    locked = tmp_path / "locked"
    (locked / "records").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    args = {
        "eval": ["knn", "--data", "digits", "--encoder", "random:vit_tiny_patch8"],
        "run": ["--suite", "smoke", "--encoder", "random:vit_tiny_patch8"],
        "report": [str(locked)],
    }[command]
    for output in (locked, locked / "new"):
        code, _, err = run(capsys, command, *args, "--output", str(output))
        assert code == 2 and f"cannot write in {locked} (permission denied)" in err


def test_report_of_a_file_or_into_a_file_says_so(capsys, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("")
    code, _, err = run(capsys, "report", str(taken))
    assert code == 2 and f"{taken} is a file, not a results folder" in err
    (tmp_path / "res" / "records").mkdir(parents=True)
    code, _, err = run(capsys, "report", str(tmp_path / "res"), "--output", str(taken))
    assert code == 2 and f"{taken} is a file, not a folder" in err


def test_interrupted_run_says_how_to_continue(capsys, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ibot_bench.suites.run_suite", interrupted)
    code, _, err = run(capsys, "run", "--suite", "smoke", "--output", str(tmp_path / "o"))
    assert code == 130 and len(err.splitlines()) == 1
    assert "interrupted; finished results and caches are kept; run the same command" in err
