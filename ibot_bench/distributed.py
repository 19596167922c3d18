"""torchrun-aware helpers; a single process without a launcher is world size 1."""

from __future__ import annotations

import functools
import os
import pickle
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ibot_bench.errors import UserError

# how long :func:`wait_for_all` waits for every rank to arrive
MEET_TIMEOUT = timedelta(minutes=5)


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
        _check_launcher_env()
        backend = "gloo"
        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % gpus)
            if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) <= gpus:
                backend = "nccl"
        dist.init_process_group(backend)


def _check_launcher_env() -> None:
    """WORLD_SIZE > 1 without the rest of what a launcher sets (a variable left exported in
    the shell): a :class:`UserError` naming the fix, not torch's rendezvous ValueError."""
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: start several processes with "
            "torchrun (it sets them all), or unset WORLD_SIZE to run one process"
        )


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


def picklable(exc: BaseException) -> BaseException:
    """``exc`` if it can cross to other ranks, else a RuntimeError with its text."""
    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (world size 1: ``[obj]``)."""
    if world()[1] == 1:
        return [obj]
    out: list[object] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def raise_any(error: Exception | None) -> None:
    """Collective: raise on every rank when any rank failed (its own error on a failed rank,
    the first failed rank's elsewhere), so no rank goes on to a collective the failed one
    never joins (world size 1: ``error``, if any)."""
    errors = gather_objects(None if error is None else picklable(error))
    if error is not None:
        raise error
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise failed  # type: ignore[misc]


@functools.cache
def _meet_group(_world: dist.ProcessGroup) -> dist.ProcessGroup:
    """A gloo group of all ranks for :func:`wait_for_all`, one per process group (``_world``):
    its own sequence of operations, so a rank that left the main group's sequence (a task
    failed on it) still meets the others here, and its timeout bounds every rank's wait."""
    return dist.new_group(backend="gloo", timeout=MEET_TIMEOUT)


def wait_for_all() -> None:
    """Barrier that raises a RuntimeError when some rank has not arrived within
    :data:`MEET_TIMEOUT` (e.g. it still waits in a collective operation of a task that failed
    on this rank): torch's ``monitored_barrier``, on a gloo group of its own."""
    if world()[1] > 1:
        dist.monitored_barrier(group=_meet_group(dist.group.WORLD), timeout=MEET_TIMEOUT)


def check_shared(path: Path) -> bool:
    """Collective: whether ``path`` exists, the same answer on every rank; a
    :class:`UserError` on every rank when some ranks see it and others do not (nodes that do
    not share the folder: they would resume from different states)."""
    seen = gather_objects(path.exists() or path.is_symlink())
    if len(set(seen)) > 1:
        have = [r for r, s in enumerate(seen) if s]
        missing = [r for r, s in enumerate(seen) if not s]
        raise UserError(
            f"{path} exists for rank(s) {have} but not for rank(s) {missing}: under torchrun on "
            "several nodes the output folder must be on a filesystem all nodes share (each "
            "rank reads the checkpoints rank 0 writes); use a shared folder for --output"
        )
    return bool(seen[0])
