"""Fault injection: SIGKILL at random points, 10 times, then finish; the results must equal an
uninterrupted run's and nothing half-written may be left behind."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

TEMP = re.compile(r"\.tmp$|\.~.*~")


def run(args: list[str], cache: Path, kill_after: float | None = None) -> float:
    """``ibot-bench ARGS`` in a subprocess; SIGKILLed after ``kill_after`` s if given."""
    env = {**os.environ, "IBOT_BENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ibot_bench.cli", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if kill_after is None:
        out = proc.communicate(timeout=900)[0].decode()
        assert proc.returncode == 0, out[-3000:]
    else:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no cleanup, no atexit
        proc.communicate()
    return time.perf_counter() - start


def leftovers(*folders: Path) -> list[str]:
    return [str(p) for f in folders for p in f.rglob("*") if TEMP.search(p.name)]


def records(out: Path) -> dict[tuple[str, str, str], dict]:
    """Metrics by (task, protocol, encoder); each evaluation recorded once."""
    found = {}
    for path in (out / "records").glob("*.json"):
        rec = json.loads(path.read_text())
        key = (rec["task"], rec["protocol"], rec["encoder"]["spec"])
        assert key not in found, f"{key} recorded twice"
        found[key] = rec["metrics"]
    return found


def test_suite_survives_ten_sigkills(tmp_path):
    args = ["run", "--suite", "smoke"]
    ref_s = run([*args, "--output", str(tmp_path / "ref")], tmp_path / "cache_ref")
    rng = random.Random(0)
    out, cache = tmp_path / "killed", tmp_path / "cache_killed"
    # the same machine's precision=auto decisions, if any entry timed one (two fresh caches
    # could differ); the features are not shared, so the killed run computes everything itself
    decisions = tmp_path / "cache_ref" / "precision"
    if decisions.exists():
        shutil.copytree(decisions, cache / "precision")
    for _ in range(10):
        run([*args, "--output", str(out)], cache, kill_after=rng.uniform(1.0, ref_s))
    run([*args, "--output", str(out)], cache)
    assert records(out) == records(tmp_path / "ref")
    assert len(records(out)) == 10
    assert not leftovers(out, cache)


def test_pretraining_survives_ten_sigkills(tmp_path):
    args = ["pretrain", "--config", "smoke", "threads=1", "optim.epochs=3"]
    ref_s = run([*args, "--output", str(tmp_path / "ref")], tmp_path / "cache")
    rng = random.Random(1)
    out = tmp_path / "killed"
    for _ in range(10):
        run([*args, "--output", str(out)], tmp_path / "cache", kill_after=rng.uniform(1.0, ref_s))
    run([*args, "--output", str(out)], tmp_path / "cache")
    ref = torch.load(tmp_path / "ref" / "checkpoint.pth", weights_only=True)
    got = torch.load(out / "checkpoint.pth", weights_only=True)
    assert got["epoch"] == ref["epoch"] == 3
    for net in ("student", "teacher"):
        assert ref[net].keys() == got[net].keys()
        for key in ref[net]:
            assert torch.equal(ref[net][key], got[net][key]), (net, key)
    assert not leftovers(out)
