"""`run --suite full --profile tiny` on a synthetic data root, single-process and under torchrun.

The mission's command end to end: every protocol (frozen probes, fine-tuning, COCO
detection, ADE20K segmentation) on the real on-disk layouts. Under ``torchrun
--nproc_per_node=2`` (gloo, CPU) each record is written exactly once, the frozen probes give
the single-process numbers, fine-tuning trains with world size 2, and a SIGKILL of the whole
run followed by a rerun finishes without redoing finished records.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_ibot_checkpoint

from ibot_bench.cli import main
from ibot_bench.errors import ConfigError
from ibot_bench.evaluate import plan_eval
from ibot_bench.suites import load_suite

ENTRIES = len(load_suite("full").entries)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A synthetic data root in the real layouts and an iBOT-layout ViT-Tiny checkpoint."""
    tmp = tmp_path_factory.mktemp("full")
    root = tmp / "data"
    args = ["data", "synth", str(root), "--classes", "4", "--size", "64", "--train", "200"]
    assert main([*args, "--val", "5"]) == 0
    ckpt = write_ibot_checkpoint(tmp / "ibot_tiny.pth", "vit_tiny_patch16", out_dim=4)
    return {"tmp": tmp, "root": root, "encoder": f"ibot:{ckpt}"}


def full_tiny(setup: dict, out: Path, cache: Path) -> list[str]:
    return ["run", "--suite", "full", "--profile", "tiny", "--data-root", str(setup["root"]),
            "--encoder", setup["encoder"], "--output", str(out), "--cache-dir", str(cache)]  # fmt: skip


def records(out: Path) -> dict[tuple[str, str], dict]:
    """Records by (task, protocol); each must exist once."""
    found: dict[tuple[str, str], dict] = {}
    for path in sorted((out / "records").glob("*.json")):
        rec = json.loads(path.read_text())
        key = (rec["task"], rec["protocol"])
        assert key not in found, f"record {key} written twice"
        found[key] = {**rec, "mtime": path.stat().st_mtime_ns}
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def torchrun(args: list[str], **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "ibot_bench.cli", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, start_new_session=True, **popen)


def test_full_tiny_single_process_then_torchrun_with_sigkill_and_resume(setup, capsys):
    single = setup["tmp"] / "single"
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: one precision=auto key, so one decision
    try:
        assert main(full_tiny(setup, single, setup["tmp"] / "cache1")) == 0, capsys.readouterr()
    finally:
        torch.set_num_threads(threads)
    single_s = time.perf_counter() - started
    one = records(single)
    assert len(one) == ENTRIES
    assert all(r["profile"] == "tiny" for r in one.values())

    multi = setup["tmp"] / "multi"
    args = full_tiny(setup, multi, setup["tmp"] / "cache2")
    log = (setup["tmp"] / "killed.log").open("w")
    proc = torchrun(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while len(list((multi / "records").glob("*.json"))) < 3 and proc.poll() is None:
        assert time.time() < deadline, "no record within 10 minutes"
        time.sleep(0.5)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the whole run: launcher and both ranks
        with contextlib.suppress(ProcessLookupError):  # (torchrun starts each in a session)
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    before = records(multi)
    assert 3 <= len(before) < ENTRIES

    started = time.perf_counter()
    rerun = torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = rerun.communicate(timeout=1200)[0]
    multi_s = time.perf_counter() - started
    assert rerun.returncode == 0, output[-4000:]
    two = records(multi)
    assert set(two) == set(one)
    for key, rec in before.items():  # finished work was skipped, not redone
        assert two[key]["mtime"] == rec["mtime"], key
    assert output.count("skipped (exists)") >= len(before)
    for key in (("knn", "knn"), ("cluster", "cluster-kmeans")):
        assert two[key]["metrics"] == one[key]["metrics"], key
    assert two[("finetune", "finetune")]["details"]["world_size"] == 2
    print(f"full --profile tiny: single process {single_s:.0f}s, torchrun x2 rerun {multi_s:.0f}s")


def test_missing_datasets_skip_only_their_entries(tmp_path, capsys):
    root = tmp_path / "root"
    assert main(["data", "synth", str(root), "--classes", "2", "--size", "32", "--train", "10",
                 "--val", "2"]) == 0  # fmt: skip
    for folder in ("coco", "ade20k"):
        shutil.rmtree(root / folder)
    args = ["run", "--suite", "full", "--profile", "tiny", "--data-root", str(root), "--tasks",
            "knn,detection,segmentation", "--encoder", "random:vit_tiny_patch16", "--output",
            str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 1  # missing data is reported as a failure of those entries only
    out = capsys.readouterr().out
    assert "1 done" in out and "3 missing data" in out
    assert f"expected a coco folder at {root}/coco" in out
    assert f"expected an ade20k folder at {root}/ade20k/ADEChallengeData2016" in out


def test_bad_run_inputs(tmp_path, capsys, monkeypatch):
    assert main(["run", "--suite", "smoke", "--profile", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'huge'" in err and "Known: tiny" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, before any process group
    with pytest.raises(ConfigError, match="batch_size=6 .global. does not split over 2"):
        plan_eval("finetune", "random:vit_tiny_patch16", "digits", overrides=["batch_size=6",
                  "accum_steps=2"])  # fmt: skip
    plan_eval("finetune", "random:vit_tiny_patch16", "digits", overrides=["batch_size=8",
              "accum_steps=2"])  # fmt: skip
