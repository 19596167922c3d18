"""``precision=auto`` by measurement: timed once, cached, reused, overridable, never trusting
a damaged or foreign cache file, the same on every rank, and traceless for the model."""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ibot_bench import precision, runtime
from ibot_bench.errors import UserError

CPU = torch.device("cpu")
KEY = {"work": "test", "arch": "toy", "batch": 4}


@pytest.fixture(autouse=True)
def _bf16_here(monkeypatch):
    """Both candidates on every CPU, so the tests do not depend on the machine's bf16."""
    monkeypatch.setattr(precision, "available_precisions", lambda _d: ("fp32", "bf16"))


def fake_step(fast: str, calls: Counter):
    """A step where ``fast`` takes 2 ms and the other precision 8 ms; counts its calls."""

    def step(p: str) -> None:
        calls[p] += 1
        time.sleep(0.002 if p == fast else 0.008)

    return step


def choose(tmp_path: Path, step, requested: str = "auto", key: dict = KEY) -> tuple[str, list]:
    logs: list[str] = []
    got = precision.choose_precision(CPU, requested, key, step, log=logs.append, cache_dir=tmp_path)
    return got, logs


def test_auto_is_measured_once_then_cached(tmp_path):
    calls = Counter()
    got, logs = choose(tmp_path, fake_step("bf16", calls))
    assert got == "bf16" and calls["bf16"] >= 2 and calls["fp32"] >= 2  # warm-up + timed
    assert "; measured" in logs[0] and "bf16" in logs[0] and "x the speed of fp32" in logs[0]
    (path,) = tmp_path.glob("*.json")
    entry = json.loads(path.read_text())
    assert entry["choice"] == "bf16" and entry["seconds"]["bf16"] < entry["seconds"]["fp32"]

    again = Counter()
    got, logs = choose(tmp_path, fake_step("fp32", again))  # would pick fp32 if it timed
    assert got == "bf16" and not again
    assert f"cached in {path}" in logs[0] and "; measured" not in logs[0]


def test_implausible_timings_are_measured_again_and_never_cached(tmp_path, monkeypatch):
    """A busy machine can stall one precision's samples (bf16 "69x" fp32 was seen under a
    load of 4 on 2 cores): measured twice, then fp32 this time, and nothing cached."""
    timings = [{"fp32": 1.0, "bf16": 0.01}, {"fp32": 0.7, "bf16": 0.02}]
    monkeypatch.setattr(precision, "measure", lambda *a: timings.pop(0))
    got, logs = choose(tmp_path, fake_step("bf16", Counter()))
    assert got == "fp32" and not timings and not list(tmp_path.glob("*.json"))
    assert "implausible timings" in logs[-1] and "not caching" in logs[-1]
    timings[:] = [{"fp32": 1.0, "bf16": 0.01}, {"fp32": 1.0, "bf16": 0.3}]  # then calm again
    assert choose(tmp_path, fake_step("bf16", Counter()))[0] == "bf16"
    (path,) = tmp_path.glob("*.json")
    entry = json.loads(path.read_text())  # an implausible entry (an older version's) is
    path.write_text(json.dumps({**entry, "seconds": {"fp32": 1.0, "bf16": 0.01}}))  # re-timed
    timings[:] = [{"fp32": 1.0, "bf16": 1.5}]
    assert choose(tmp_path, fake_step("bf16", Counter()))[0] == "fp32" and not timings


def test_forced_precision_overrides_the_cache(tmp_path):
    choose(tmp_path, fake_step("bf16", Counter()))
    calls = Counter()
    assert choose(tmp_path, fake_step("bf16", calls), "fp32")[0] == "fp32"
    assert not calls


def test_ties_keep_the_more_exact_precision(tmp_path):
    assert precision.decide({"fp32": 1.0, "bf16": 0.97}) == "fp32"  # within the margin
    assert precision.decide({"fp32": 1.0, "bf16": 0.88}) == "fp32"  # 1.14x: still a near tie
    assert precision.decide({"fp32": 1.0, "bf16": 0.5, "fp16": 0.49}) == "bf16"
    assert precision.decide({"fp32": 1.0, "bf16": 0.5, "fp16": 0.4}) == "fp16"


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: "{not json",
        lambda e: json.dumps(e)[: len(json.dumps(e)) // 2],  # truncated
        lambda e: "\x00\xff" * 10,  # binary garbage
        lambda e: json.dumps([e]),
        lambda e: json.dumps({**e, "schema": "someone-else/1"}),
        lambda e: json.dumps({**e, "key": {**e["key"], "work": {"arch": "other"}}}),
        lambda e: json.dumps({**e, "choice": "fp32"}),  # disagrees with its own timings
        lambda e: json.dumps({**e, "choice": "fp16", "seconds": {"fp32": 1.0, "fp16": 0.1}}),
        lambda e: json.dumps({**e, "seconds": {"fp32": 1.0, "bf16": -0.5}}),
        lambda e: json.dumps({**e, "seconds": {"fp32": 1.0, "bf16": "0.5"}}),
    ],
)
def test_damaged_or_foreign_cache_is_ignored_and_rewritten(tmp_path, damage):
    choose(tmp_path, fake_step("bf16", Counter()))
    (path,) = tmp_path.glob("*.json")
    path.write_text(damage(json.loads(path.read_text())))
    calls = Counter()
    got, logs = choose(tmp_path, fake_step("fp32", calls))
    assert got == "fp32" and calls["fp32"] >= 2  # measured again, not trusted
    assert "ignoring the damaged or foreign cache file" in logs[0]
    assert json.loads(path.read_text())["choice"] == "fp32"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_unavailable_precisions_name_the_available_ones(monkeypatch, tmp_path):
    with pytest.raises(
        UserError, match=r"fp16 is not available on this CPU.*available here: auto, fp32"
    ):
        choose(tmp_path, fake_step("bf16", Counter()), "fp16")
    monkeypatch.setattr(runtime, "available_precisions", lambda _d: ("fp32",))
    with pytest.raises(
        UserError, match=r"bf16 is not available on this CPU.*available here: auto, fp32$"
    ):
        choose(tmp_path, fake_step("bf16", Counter()), "bf16")
    with pytest.raises(UserError, match="unknown"):
        choose(tmp_path, fake_step("bf16", Counter()), "int8")


def test_one_precision_needs_no_timing(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "available_precisions", lambda _d: ("fp32",))
    calls = Counter()
    assert choose(tmp_path, fake_step("bf16", calls))[0] == "fp32" and not calls


def test_real_training_step_keys_by_shape_and_leaves_no_trace(monkeypatch, tmp_path):
    from ibot_bench.downstream.finetune_engine import train_precision  # (spawned ranks: light)

    monkeypatch.setenv("IBOT_BENCH_CACHE", str(tmp_path))
    model = torch.nn.Sequential(  # BatchNorm statistics and dropout draws: state to keep
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Dropout(0.5),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    ).eval()  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    logs: list[str] = []
    got = train_precision(model, CPU, "auto", 8, 32, logs.append)
    assert got in ("fp32", "bf16") and "; measured" in logs[-1]
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded run draws the same numbers
    for k, v in model.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(v, before[k]), k
    assert train_precision(model, CPU, "auto", 8, 32, logs.append) == got
    assert "cached" in logs[-1] and "; measured" not in logs[-1]
    train_precision(model, CPU, "auto", 8, 48, logs.append)  # another input size: timed anew
    assert "; measured" in logs[-1]
    assert len(list((tmp_path / "precision").glob("*.json"))) == 2


def _rank(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    dist.init_process_group("gloo", rank=rank, world_size=2)
    precision.available_precisions = lambda _d: ("fp32", "bf16")
    calls = Counter()  # each rank's own timing would disagree: rank 0 bf16, rank 1 fp32
    step = fake_step("bf16" if rank == 0 else "fp32", calls)
    cache = Path(root) / f"cache{rank}"
    got = precision.choose_precision(CPU, "auto", KEY, step, log=lambda _m: None, cache_dir=cache)
    Path(root, f"rank{rank}.json").write_text(json.dumps([got, sum(calls.values())]))
    dist.destroy_process_group()


def test_ranks_use_rank_zeros_decision(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero[0] == one[0] == "bf16"
    assert zero[1] > 0 and one[1] == 0  # only rank 0 timed
