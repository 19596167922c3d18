"""torchrun-aware helpers; a single process without a launcher is world size 1."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", 1)) > 1
    ):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)


def world() -> tuple[int, int]:
    """(rank, world_size)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous shard of ``range(n)`` for ``rank``: no padding, no duplicates."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def gather_rows(local: torch.Tensor, n_total: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Concatenate every rank's contiguous shard (rank order) -> (n_total, ...) on all ranks.

    Shards differ in length by at most one row, so each is padded to the largest and
    trimmed after the all-gather; rows move in chunks so memory stays bounded.
    """
    rank, world_size = world()
    if world_size == 1:
        return local
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [len(shard_range(n_total, r, world_size)) for r in range(world_size)]
    width = max(sizes)
    out = torch.empty((n_total, *local.shape[1:]), dtype=local.dtype)
    for start in range(0, width, chunk):
        stop = min(start + chunk, width)
        piece = torch.zeros((stop - start, *local.shape[1:]), dtype=local.dtype, device=device)
        mine = local[start:stop]
        piece[: len(mine)] = mine.to(device)
        pieces = [torch.empty_like(piece) for _ in range(world_size)]
        dist.all_gather(pieces, piece)
        for r, p in enumerate(pieces):
            lo = sum(sizes[:r]) + start
            take = max(0, min(stop, sizes[r]) - start)
            out[lo : lo + take] = p[:take].cpu()
    return out
