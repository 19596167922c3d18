"""DDP fine-tuning under two gloo ranks (no launcher) equals one process with the same batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_imagefolder
from test_finetune import make_ibot_checkpoint

from ibot_bench.downstream.finetune import FinetuneConfig, finetune_eval
from ibot_bench.downstream.finetune_engine import CHECKPOINT
from ibot_bench.tasks import TaskContext

# no drop-path / mixup: their per-rank draws differ by design; augmentation does not
CFG = dict(epochs=1, warmup_epochs=0, batch_size=8, img_size=32, drop_path=0.0)
CFG |= dict(mixup=0.0, cutmix=0.0, precision="fp32", num_workers=0)


def _worker(rank: int, port: int, enc: str, data: str, work: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = FinetuneConfig(**CFG, accum_steps=2)  # 4 images per rank in 2 micro-batches
    metrics, _ = finetune_eval(TaskContext(enc, data, Path(work), log=lambda _m: None), cfg)
    torch.save(metrics, Path(work) / f"metrics_{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_accumulation_match_one_process(tmp_path):
    enc = f"ibot:{make_ibot_checkpoint(tmp_path / 'ibot.pth')}"
    data = f"imagefolder:{make_imagefolder(tmp_path / 'data', classes=3, per_class=8)}?size=32"
    work = tmp_path / "ddp"
    mp.start_processes(
        _worker, args=(_free_port(), enc, data, str(work)), nprocs=2, start_method="spawn"
    )
    ctx = TaskContext(enc, data, tmp_path / "single", log=lambda _m: None)
    single_metrics, extra = finetune_eval(ctx, FinetuneConfig(**CFG))
    assert extra["world_size"] == 1
    ddp = torch.load(work / CHECKPOINT, weights_only=True)["model"]
    single = torch.load(tmp_path / "single" / CHECKPOINT, weights_only=True)["model"]
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, atol=2e-5, rtol=1e-4, msg=k)
    for rank in range(2):
        assert torch.load(work / f"metrics_{rank}.pt")["top1"] == single_metrics["top1"]
