"""Sharded extraction under two ranks (gloo, no launcher needed) equals one process."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from ibot_bench.distributed import shard_range
from ibot_bench.features import FeatureConfig, extract_features

CFG = FeatureConfig(img_size=32, batch_size=4, num_workers=0, precision="fp32")


def _worker(rank: int, world_size: int, port: int, spec: str, cache: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    feats = extract_features(
        "random:vit_tiny_patch8", spec, "val", CFG, cache_dir=cache, progress=False
    )
    np.save(f"{out}/cls_{rank}.npy", feats.cls)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shards_cover_everything_once():
    for n in (0, 1, 7, 12):
        for w in (1, 2, 3, 5):
            rows = [i for r in range(w) for i in shard_range(n, r, w)]
            assert rows == list(range(n))


def test_two_ranks_match_single_process(tiny_imagefolder, tmp_path):
    spec = f"imagefolder:{tiny_imagefolder}"
    # 12 val images over 2 ranks with batch 4 -> uneven batches, no padding duplicates
    mp.start_processes(
        _worker,
        args=(2, _free_port(), spec, str(tmp_path / "dist_cache"), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    single = extract_features(
        "random:vit_tiny_patch8", spec, "val", CFG, cache_dir=tmp_path / "single", progress=False
    )
    for rank in range(2):
        gathered = np.load(tmp_path / f"cls_{rank}.npy")
        assert gathered.shape == single.cls.shape
        np.testing.assert_allclose(gathered, single.cls, atol=1e-5)
    cached = extract_features(
        "random:vit_tiny_patch8",
        spec,
        "val",
        CFG,
        cache_dir=tmp_path / "dist_cache",
        progress=False,
    )
    assert cached.meta["cache_hit"] and cached.meta["world_size"] == 2
