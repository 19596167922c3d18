"""Two gloo ranks (spawned, no launcher) where something goes wrong on one of them: every rank
ends with the real error, none waits forever in a collective operation."""

from __future__ import annotations

import os
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_imagefolder

from ibot_bench import distributed
from ibot_bench.errors import DatasetError, UserError
from ibot_bench.features import FeatureConfig, extract_features

CFG = FeatureConfig(img_size=32, batch_size=4, num_workers=0, precision="fp32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(fn, args: tuple, timeout_s: float = 120) -> None:
    """Run ``fn(rank, port, *args)`` on two spawned ranks; fail (killing them) on a hang."""
    ctx = mp.start_processes(
        fn, args=(_free_port(), *args), nprocs=2, start_method="spawn", join=False
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks still ran after {timeout_s:.0f}s: a collective hangs")


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)


def _outcome(out: Path, rank: int, call) -> None:
    """Write what ``call()`` ended with (``ok`` or the error's class and message)."""
    try:
        call()
        text = "ok"
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}"
    (out / f"rank{rank}.txt").write_text(text)


def _extract(rank: int, port: int, spec: str, out: Path) -> None:
    _init(rank, port)
    cache = out / f"cache{rank}"
    _outcome(out, rank, lambda: extract_features("random:vit_tiny_patch8", spec, "val", CFG,
                                                 cache_dir=cache, progress=False))  # fmt: skip


def test_unreadable_image_in_one_shard_fails_every_rank(tmp_path):
    """The last val image (rank 1's shard) does not decode: rank 0, done with its own shard,
    raises the same error instead of waiting for rank 1 in the gather."""
    root = make_imagefolder(tmp_path / "data", classes=2, per_class=4)
    bad = sorted((root / "val").rglob("*.jpg"))[-1]
    bad.write_bytes(b"not an image")
    _join(_extract, (f"imagefolder:{root}", tmp_path))
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith(("UnreadableImageError", "DatasetError")), text
        assert bad.name in text


def test_more_ranks_than_images(tmp_path):
    """One val image on two ranks: rank 0's shard is empty, and it gathers all the same."""
    root = make_imagefolder(tmp_path / "data", classes=1, per_class=1)
    _join(_extract, (f"imagefolder:{root}", tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]
    single = extract_features(
        "random:vit_tiny_patch8", f"imagefolder:{root}", "val", CFG,
        cache_dir=tmp_path / "cache0", progress=False,
    )  # fmt: skip
    assert single.meta["cache_hit"] and single.cls.shape == (1, 192)


def _leave(rank: int, port: int, out: Path) -> None:
    from ibot_bench.suites import leave_if_alone

    _init(rank, port)
    distributed.MEET_TIMEOUT = timedelta(seconds=5)
    failure = DatasetError(f"cannot read image on rank {rank}")
    leave_if_alone(failure, "failed on every rank")  # all arrive: the suite goes on
    (out / "on_rank0_only").mkdir(exist_ok=True)  # what rank 0 sees; rank 1 (another node):
    folder = out / ("on_rank0_only" if rank == 0 else "missing")  # not there
    _outcome(out, rank, lambda: distributed.check_shared(folder))
    if rank == 0:  # still inside the task: waits for rank 1 in a collective operation
        _outcome(out, 10, lambda: dist.all_reduce(torch.zeros(1)))
    else:  # failed: leaves the run with its own error
        _outcome(out, 11, lambda: leave_if_alone(failure, "failed on rank 1 only"))


def test_a_rank_left_alone_ends_the_run_with_its_error(tmp_path):
    """After a distributed task: a failure on every rank keeps the suite going; a failure on
    one rank while the other still waits in a collective ends the run with that error. A
    folder that only some ranks see (nodes without a shared output) is refused on all."""
    _join(_leave, (tmp_path,))
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith(UserError.__name__) and "filesystem all nodes share" in text
    assert (tmp_path / "rank11.txt").read_text() == "DatasetError: cannot read image on rank 1"
    assert (tmp_path / "rank10.txt").read_text().startswith("RuntimeError")


def _pretrain(rank: int, port: int, out: Path) -> None:
    """Rank 0 alone gets SIGTERM while the first epoch's checkpoint is written."""
    from ibot_bench.config import load_config
    from ibot_bench.pretrain.config import PretrainConfig
    from ibot_bench.pretrain.train import Trainer, pretrain

    _init(rank, port)
    save = Trainer.save

    def save_then_signal(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if rank == 0 and self.state.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    Trainer.save = save_then_signal
    overrides = [f"output_dir={out / 'run'}", "optim.epochs=3", "num_workers=0"]
    overrides += ["precision=fp32", "save_every_iters=0", "monitor_knn=0"]
    cfg = load_config(PretrainConfig, "smoke", overrides, kind="pretrain")
    _outcome(out, rank, lambda: pretrain(cfg))


def test_pretraining_stops_on_every_rank_when_one_gets_the_signal(tmp_path):
    """A signal reaching one rank after the last step's stop check still stops every rank at
    the same checkpoint (rank 1 used to train on alone, into a collective rank 0 left)."""
    _join(_pretrain, (tmp_path,))
    texts = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert texts[0].startswith("TrainingInterrupted: pretraining stopped by SIGTERM"), texts[0]
    assert texts[1].startswith("TrainingInterrupted: pretraining stopped by a signal"), texts[1]
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    assert (state["epoch"], state["epoch_iter"]) == (1, 0)


def test_world_size_without_a_launcher(monkeypatch):
    """WORLD_SIZE left exported without MASTER_ADDR: the fix, not torch's rendezvous error."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR, MASTER_PORT are not: .*torchrun"):
        distributed.init_distributed()


def test_error_goes_to_torchruns_error_file(tmp_path, monkeypatch, capsys):
    """Under torchrun a rank's error is written to its elastic error file, so torchrun's
    failure summary names it (it showed ``error_file: <N/A>``)."""
    import json

    from ibot_bench.cli import main

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    missing = tmp_path / "no_such_folder"
    args = ["eval", "knn", "--encoder", "random:vit_tiny_patch8", "--data"]
    assert main([*args, f"imagefolder:{missing}", "--output", str(tmp_path / "out")]) == 2
    recorded = json.loads(error_file.read_text())["message"]["message"]
    assert str(missing) in recorded and str(missing) in capsys.readouterr().err
