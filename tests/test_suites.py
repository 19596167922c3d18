"""Suites end to end: every shipped suite validates, smoke runs, resume survives SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ibot_bench.cli import main
from ibot_bench.leaderboard import board, long_frame, reference_frame
from ibot_bench.records import ResultRecord, read_records
from ibot_bench.suites import SUITES, load_suite, plan_suite

SMOKE_RECORDS = 10  # 5 tasks x 2 encoders; cluster-head is n/a for random encoders


@pytest.mark.parametrize("name", SUITES.names())
def test_shipped_suite_validates(name):
    suite = load_suite(name, ["data_root=/nonexistent"])
    assert suite.entries
    for plan, entry, _, error in plan_suite(suite, ["random:vit_tiny_patch8"]):
        assert plan is not None, f"{name}: {entry.task}: {error}"


def _no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]
    assert not leftovers, leftovers


def test_smoke_suite_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "smoke"
    start = time.perf_counter()
    assert main(["run", "--suite", "smoke", "--output", str(out)]) == 0
    assert time.perf_counter() - start < 120
    printed = capsys.readouterr().out
    assert "knn top1" in printed and "10 done, 2 n/a" in printed
    records, errors = read_records(out)
    assert len(records) == SMOKE_RECORDS and not errors
    for name in (
        "suite.yaml",
        "records.csv",
        "leaderboard.csv",
        "leaderboard.md",
        "leaderboard.png",
    ):
        assert (out / name).is_file(), name
    assert "Generated" in (out / "leaderboard.md").read_text()
    long = pd.read_csv(out / "records.csv")
    assert {"encoder", "task", "protocol", "metric", "value", "protocol_hash"} <= set(long.columns)
    # second run: everything recorded is skipped before any model loads
    assert main(["run", "--suite", "smoke", "--output", str(out), "--tasks", "knn"]) == 0
    assert "2 skipped (exists)" in capsys.readouterr().out
    _no_temp_files(out)


def test_sigkill_then_rerun_finishes_without_redoing(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ibot_bench.cli", "run", "--suite", "smoke", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and len(list((out / "records").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}
    assert 2 <= len(finished) < SMOKE_RECORDS
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(finished)} skipped (exists)" in rerun.stdout
    records, errors = read_records(out)
    assert len(records) == SMOKE_RECORDS and not errors
    for name, mtime in finished.items():  # finished records untouched
        assert (out / "records" / name).stat().st_mtime_ns == mtime
    _no_temp_files(out)
    _no_temp_files(Path(os.environ["IBOT_BENCH_CACHE"]))


def _record(encoder: str, group: str, protocol: str, value: float) -> ResultRecord:
    return ResultRecord(
        task=protocol,
        protocol=protocol,
        encoder={"spec": encoder, "fingerprint": encoder * 4},
        dataset={"spec": f"imagefolder:/{group}", "group": group, "fingerprint": group},
        metrics={"top1": value},
        config={"seeds": [0]},
    )


def test_reference_rows_join_only_their_group():
    records = [
        _record("mine", "imagenet-1k", "knn", 70.0),
        _record("mine", "synthetic-shapes-64px", "knn", 40.0),
    ]
    table = board(long_frame(records), reference_frame())
    assert table.loc["iBOT ViT-S/16 (paper)", ("imagenet-1k", "knn top1")] == 75.2
    assert table.loc["mine", ("synthetic-shapes-64px", "knn top1")] == 40.0
    synthetic = table["synthetic-shapes-64px"].dropna(how="all")
    assert list(synthetic.index) == ["mine"]  # no paper row next to synthetic numbers
    assert ("imagenet-1k", "linear-paper top1") not in table.columns  # nothing measured there


def test_report_merges_folders_and_ignores_corrupt_records(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _record("enc-a", "imagenet-1k", "knn", 70.0).write(a)
    _record("enc-b", "imagenet-1k", "knn", 72.0).write(b)
    (b / "records" / "bad.json").write_text('{"task": ')
    assert main(["report", str(a), str(b), "--reference", "--output", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "enc-a" in captured.out and "enc-b" in captured.out and "(paper)" in captured.out
    assert "bad.json" in captured.err
    assert main(["report", str(a), "--format", "html", "--output", str(tmp_path / "h")]) == 0
    assert (tmp_path / "h" / "leaderboard.html").is_file()
    assert "(paper)" not in capsys.readouterr().out


def test_bad_suite_inputs(tmp_path, capsys):
    assert main(["run", "--suite", "smok"]) == 2
    assert "Did you mean 'smoke'" in capsys.readouterr().err
    assert main(["run", "--suite", "smoke", "--tasks", "knm", "--output", str(tmp_path)]) == 2
    assert "its tasks: cluster, cluster-head, knn" in capsys.readouterr().err
    # a broken encoder fails its own rows; the others still run; exit code non-zero
    code = main(["run", "--suite", "smoke", "--tasks", "knn", "--output", str(tmp_path / "x"),
                 "--encoder", f"ibot:{tmp_path}/missing.pth", "--encoder", "random:vit_tiny_patch8"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and "1 failed" in out and "1 done" in out and "missing.pth" in out
    # a data root without the dataset: entries reported with the expected path
    code = main(["run", "--suite", "full", "--tasks", "knn", "--data-root", str(tmp_path / "none"),
                 "--encoder", "random:vit_tiny", "--output", str(tmp_path / "f")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and f"expected an imagefolder folder at {tmp_path / 'none'}/imagenet" in out
    shutil.rmtree(tmp_path / "f")
    json.dumps({})  # keep json import used for readability of failures


SUITE = """\
name: mine
encoders: [random:vit_tiny_patch8]
datasets:
  d: {spec: DATA}
entries: ENTRIES
"""


@pytest.mark.parametrize(
    "data, entries, expected",
    [
        ("digits", "[]", "suite mine.yaml has no entries"),
        ("digits", "[{task: knnn, dataset: d}]", "entry 1 (knnn): unknown task 'knnn'. Did you "
         "mean 'knn'?"),
        ("digitz", "[{task: knn, dataset: d}]", "dataset 'd' (digitz): unknown dataset 'digitz'. "
         "Did you mean 'digits'?"),
        ("digits", "[{task: knn, dataset: e}]", "entry 1 (knn) names dataset 'e', not one of"),
        ("digits", "[{task: knn, dataset: d, overrides: ['k=[1,3]']}]", "unknown config key 'k' "
         "in the overrides of suite entry knn on d. Did you mean 'ks'?"),
    ],
)  # fmt: skip
def test_suite_mistakes_are_refused_before_any_work(tmp_path, capsys, data, entries, expected):
    """An unknown task or dataset scheme used to fail its entries at run time after the
    others ran (exit 1); an empty suite 'succeeded' with nothing run (exit 0)."""
    path = tmp_path / "mine.yaml"
    path.write_text(SUITE.replace("DATA", data).replace("ENTRIES", entries))
    out = tmp_path / "out"
    assert main(["run", "--suite", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing ran, nothing written


def test_suite_file_that_does_not_exist_is_named(tmp_path, capsys):
    for path in (tmp_path / "nope.yaml", tmp_path):
        assert main(["run", "--suite", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"config file {path} " in err and "unknown suite" not in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--baseline", "typo"], "--baseline 'typo' is not one of the encoders' display names: "
         "'quick', 'quick-init'"),
        (["--tasks", "knm"], "suite 'quick' has no task ['knm']"),
        (["--pretrain", "demo", "--encoder", "random:vit_tiny_patch8"], "give one of them"),
    ],
)  # fmt: skip
def test_run_mistakes_are_refused_before_pretraining(tmp_path, capsys, monkeypatch, args, expected):
    """A wrong --baseline or --tasks with the quick suite was found after its 8 minutes of
    pretraining; --pretrain next to --encoder was silently ignored."""

    def no_pretraining(*a, **k):
        raise AssertionError("pretraining started")

    monkeypatch.setattr("ibot_bench.pretrain.train.pretrain", no_pretraining)
    out = tmp_path / "out"
    assert main(["run", "--suite", "quick", "--output", str(out), *args]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()
