"""``threads=-1``: the pretraining's torch thread count is timed at the start, so an idle
machine uses its cores and a busy one does not make every step wait on a shared core."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from ibot_bench import runtime
from ibot_bench.errors import UserError


@pytest.mark.parametrize(
    ("speeds", "chosen"),
    [
        ({1: 1.0, 2: 1.9}, 2),  # an idle 2-core CPU
        ({1: 1.0, 2: 0.86}, 1),  # another job holds one of the two cores
        ({1: 1.0, 2: 1.25}, 1),  # less than 30% of the ideal gain
        ({1: 1.0, 2: 1.9, 4: 2.2}, 2),  # 2 -> 4 gains 16%: not worth two more threads
        ({1: 1.0, 2: 1.9, 4: 3.5, 8: 3.6}, 4),
        ({1: 1.0, 2: 1.9, 4: 3.6, 6: 4.5}, 6),  # 4 -> 6: ideal 1.5x, 1.25x is enough
        ({1: 1.0}, 1),
    ],
)
def test_more_threads_only_for_a_real_gain(speeds, chosen):
    assert runtime.pick_threads(speeds) == chosen


def test_one_cpu_needs_no_timing(monkeypatch):
    monkeypatch.setattr(torch, "randn", None)  # would fail if anything were timed
    assert runtime.fastest_threads(1) == (1, {1: 1.0})


def test_the_timing_restores_the_thread_count_and_times_each_count():
    before = torch.get_num_threads()
    chosen, speeds = runtime.fastest_threads(3)
    assert torch.get_num_threads() == before
    assert sorted(speeds) == [1, 2, 3] and speeds[1] == 1.0
    assert all(s > 0 for s in speeds.values()) and chosen in speeds


def test_automatic_threads_are_logged_and_set(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    monkeypatch.setattr(runtime, "fastest_threads", lambda cpus: (cpus, {1: 1.0, cpus: 1.9}))
    before, lines = torch.get_num_threads(), []
    try:
        assert runtime.set_threads(-1, log=lines.append) == 2
        assert torch.get_num_threads() == 2
        assert lines == [
            "threads auto -> 2 (a timed matmul, speed vs 1 thread: 1: 1.00x, 2: 1.90x)"
        ]
    finally:
        torch.set_num_threads(before)


def test_a_negative_thread_count_other_than_auto_is_refused():
    with pytest.raises(UserError, match=r"threads must be >= 0 .* or -1 \(automatic\), got -2"):
        runtime.set_threads(-2)


def test_a_busy_core_keeps_one_thread():
    """A real busy machine: a process spinning on each CPU but one; the second thread would
    wait on a core it shares, so the timing must not pick it."""
    cpus = runtime.available_cpus()
    if cpus < 2:
        pytest.skip("needs 2 CPUs to share one")
    spin = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cpus - 1)]
    try:
        time.sleep(0.5)  # the spinners have started
        chosen, speeds = runtime.fastest_threads(2)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert chosen == 1, speeds
