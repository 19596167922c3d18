"""torchrun-aware helpers; a single process without a launcher is world size 1."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise.

    Each process takes GPU ``LOCAL_RANK`` (modulo the GPUs there are) and the group uses
    nccl; with fewer GPUs than processes on a node (nccl refuses two ranks on one GPU), or
    none, it uses gloo.
    """
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", 1)) > 1
    ):
        backend = "gloo"
        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % gpus)
            if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) <= gpus:
                backend = "nccl"
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


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (picklable objects; world size 1: ``obj``)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (world size 1: ``flag``)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (world size 1: ``[obj]``)."""
    if world()[1] == 1:
        return [obj]
    out: list[object] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out
