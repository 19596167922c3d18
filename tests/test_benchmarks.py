"""The benchmark scripts run: `benchmarks/run_all.py --small` gives every row, none FAILED.

Timings are not asserted (they live in the printed ratios); this catches a benchmark that a
library change broke, which run_all would otherwise only report as a FAILED row when someone
next measures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = (
    "iBOT step MFU, quick",
    "iBOT step vs reference | not run: no --reference",
    "feature engine vs raw forward",
    "kNN k=20",
    "kNN ks 10,20,100,200",
    "linear heads, fraction of float32 matmul peak",
    "fine-tuning step",
)


def test_run_all_small_gives_every_row_and_no_failure():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--small"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert not [line for line in table if "FAILED" in line]
    for row in ROWS:
        assert any(row in line for line in table), (row, table)
    knn = [line for line in table if line.startswith("| kNN")]
    # every prediction of ours that differs from the fp32 formula's is one where the float64
    # formula agrees with ours (an fp32 near-tie of class scores)
    assert knn and all("0 of ours unlike the float64 formula" in line for line in knn), knn
