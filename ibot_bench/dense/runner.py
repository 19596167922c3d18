"""Build and run an mmengine Runner for a dense task: training, then the test evaluation.

The task modules build the model / data / evaluator parts of the config; this module adds what
both share: the layer-decay AdamW optimizer, warm-up, checkpoints for resume, launcher and
device settings. A run writes into its work folder; rerunning the same evaluation resumes
from the last checkpoint there, so a killed run loses at most one checkpoint interval (a
segmentation run stopped by Ctrl-C or SIGTERM saves first, :func:`run`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ibot_bench.dense.runtime import (
    mmengine_checkpoint_globals,
    resolve_mm_device,
    resolve_mm_precision,
    resolve_norm,
)
from ibot_bench.distributed import barrier, world
from ibot_bench.encoders import Encoder
from ibot_bench.errors import ConfigError
from ibot_bench.interrupt import StopRequests, TrainingInterrupted, ignore_interrupts

# the advice for an unreadable val file: the val split is not part of the run's key, so the
# rerun finds the same work folder and its last checkpoint
TEST_FIX = "replace it, then rerun: the run resumes from its last checkpoint, training kept"

TASK_NAMES = {"mmdet": "detection", "mmseg": "segmentation"}  # by the config's default scope
# embed_dim -> (layer_decay, drop_path): docs/protocols.md#detection (ViT-S / ViT-B);
# ViT-L takes its fine-tuning values
ARCH_DEFAULTS = {384: (0.75, 0.1), 768: (0.65, 0.2), 1024: (0.75, 0.4)}


def launcher_world_size() -> int:
    """Processes of this run as torchrun announces them (mmengine initialises the group later)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_process_batch(global_batch: int) -> int:
    """Images per process so that ``global_batch`` stays the global batch under torchrun."""
    return max(1, global_batch // launcher_world_size())


@dataclass
class DenseRuntime:
    """What a dense run resolved before building anything."""

    device: str
    precision: str
    norm: str
    layer_decay: float
    drop_path: float
    embed_dim: int
    depth: int
    patch_size: int


def resolve_runtime(
    enc: Encoder,
    *,
    device: str,
    precision: str,
    norm: str,
    layer_decay: float | None,
    drop_path: float | None,
) -> DenseRuntime:
    """Validate the device-dependent options and read the encoder's shape."""
    dev = resolve_mm_device(device)
    prec = resolve_mm_precision(precision, dev)
    bn = resolve_norm(norm, dev)
    decay, dp = ARCH_DEFAULTS.get(enc.embed_dim, ARCH_DEFAULTS[384])
    runtime = DenseRuntime(
        device=dev,
        precision=prec,
        norm=bn,
        layer_decay=decay if layer_decay is None else layer_decay,
        drop_path=dp if drop_path is None else drop_path,
        embed_dim=enc.embed_dim,
        depth=enc.num_blocks,
        patch_size=enc.patch_size,
    )
    if not 0.0 <= runtime.drop_path < 1.0:
        raise ConfigError(f"drop_path must be in [0, 1), got {runtime.drop_path}")
    return runtime


def dense_checks(cfg: Any) -> list[tuple[str, Any, bool, str]]:
    """Range rows (:func:`~ibot_bench.config.check_ranges`) of the settings both dense tasks
    share, which torch or mmengine would reject from deep inside a built run."""
    lr = getattr(cfg, "lr", None)
    return [
        ("lr", lr, lr is None or lr > 0, "> 0"),
        ("weight_decay", cfg.weight_decay, cfg.weight_decay >= 0, ">= 0"),
        ("warmup_iters", cfg.warmup_iters, cfg.warmup_iters >= 1, ">= 1"),
        ("clip_grad", cfg.clip_grad, cfg.clip_grad is None or cfg.clip_grad > 0, "> 0 or null (off)"),
        ("num_workers", cfg.num_workers, cfg.num_workers >= 0, ">= 0"),
        ("log_every", cfg.log_every, cfg.log_every >= 1, ">= 1"),
    ]  # fmt: skip


def optim_wrapper(rt: DenseRuntime, lr: float, weight_decay: float, clip_grad: float | None):
    """AdamW with layer-wise lr decay; mixed precision only on CUDA (see runtime)."""
    wrapper: dict[str, Any] = {
        "type": "OptimWrapper" if rt.precision == "fp32" else "AmpOptimWrapper",
        "optimizer": {
            "type": "AdamW",
            "lr": lr,
            "betas": (0.9, 0.999),
            "weight_decay": weight_decay,
        },
        "constructor": "LayerDecayOptimWrapperConstructor",
        "paramwise_cfg": {"layer_decay_rate": rt.layer_decay},
        "clip_grad": None if clip_grad is None else {"max_norm": clip_grad},
    }
    if rt.precision != "fp32":
        wrapper["dtype"] = "float16" if rt.precision == "fp16" else "bfloat16"
    return wrapper


def runtime_config(
    *,
    scope: str,
    device: str,
    work_dir: Path,
    seed: int,
    checkpoint_interval: int,
    by_epoch: bool,
    log_every: int,
) -> dict[str, Any]:
    """Hooks, environment, launcher and resume settings shared by detection and segmentation."""
    distributed = launcher_world_size() > 1
    # DDP: mmengine's default wrapper pins device_ids to LOCAL_RANK (GPU only); the ViT's CLS
    # token and final norm get no gradient from the dense heads (unused parameters)
    wrapper = {
        "type": "MMDistributedDataParallel",
        "broadcast_buffers": False,
        "find_unused_parameters": True,
        **({} if device == "cuda" else {"device_ids": None}),
    }
    return {
        "default_scope": scope,
        "work_dir": str(work_dir),
        "launcher": "pytorch" if distributed else "none",
        "model_wrapper_cfg": wrapper if distributed else None,
        "env_cfg": {
            "cudnn_benchmark": False,
            "mp_cfg": {"mp_start_method": "fork", "opencv_num_threads": 0},
            "dist_cfg": {"backend": "nccl" if device == "cuda" else "gloo"},
        },
        "randomness": {"seed": seed},
        "default_hooks": {
            "timer": {"type": "IterTimerHook"},
            "logger": {"type": "LoggerHook", "interval": log_every},
            "param_scheduler": {"type": "ParamSchedulerHook"},
            "checkpoint": {
                "type": "CheckpointHook",
                "interval": checkpoint_interval,
                "by_epoch": by_epoch,
                "max_keep_ckpts": 1,
            },
            "sampler_seed": {"type": "DistSamplerSeedHook"},
        },
        "log_processor": {"type": "LogProcessor", "window_size": 20, "by_epoch": by_epoch},
        "log_level": "INFO",
        "load_from": None,
        "resume": True,  # continue from work_dir/last_checkpoint when there is one
    }


def worker_init(worker_id: int, num_workers: int, rank: int, seed: int, **kwargs: Any) -> None:
    """Loader workers of a dense run: mmengine's own seeding, and stop signals left to the
    trainer (:func:`~ibot_bench.interrupt.ignore_interrupts`), which saves before it stops."""
    from mmengine.dataset import worker_init_fn

    worker_init_fn(worker_id, num_workers, rank, seed, **kwargs)
    ignore_interrupts(worker_id)


def stoppable_loader(num_workers: int, seed: int) -> dict[str, Any]:
    """Dataloader settings of an iteration-based run, whose workers leave stop signals to
    the trainer (:func:`run` saves on them)."""
    init = {"type": "IbotBenchWorkerInit", "num_workers": num_workers, "rank": world()[0]}
    return {
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "worker_init_fn": {**init, "seed": seed},
    }


def run(config: dict[str, Any]) -> dict[str, float]:
    """Train with mmengine's Runner (resuming when possible), then return the test metrics.

    An iteration-based run (segmentation) stopped by Ctrl-C or SIGTERM saves a checkpoint
    after the step, through the run's CheckpointHook (:func:`save_on_stop`), and the rerun
    resumes from it. An epoch-based run (detection) resumes from its last epoch's checkpoint:
    mmengine restarts an epoch from its first step, so a mid-epoch checkpoint would not resume
    the schedule it claims.
    """
    from mmengine.config import Config
    from mmengine.runner import Runner

    import ibot_bench.dense.register  # noqa: F401  (backbone + optimizer constructor)

    Path(config["work_dir"]).mkdir(parents=True, exist_ok=True)
    # builds the model: loads the encoder. format_python_code=False: mmengine otherwise runs
    # the config text through yapf for the log and for every checkpoint's meta, 5 s or more
    # a time on a CPU (a third of a `--profile tiny` detection run); the text stays indented
    runner = Runner.from_cfg(Config(config, format_python_code=False))
    iter_based = not config["default_hooks"]["checkpoint"]["by_epoch"]
    # entered after the encoder loader's own (non-nesting) safe_globals block has exited
    with (
        torch.serialization.safe_globals(mmengine_checkpoint_globals()),
        StopRequests(TASK_NAMES[config["default_scope"]])
        if iter_based
        else contextlib.nullcontext() as stop,
    ):
        if stop is not None:
            runner.register_hook(save_on_stop(stop), priority="VERY_LOW")
        runner.train()
        barrier()  # rank 0 writes the last checkpoint, which test() (resume) loads on every rank
        metrics = runner.test()
    return {k: float(v) for k, v in metrics.items()}


def save_on_stop(stop: StopRequests) -> Any:
    """An mmengine hook: after each step, when a stop was asked for (on any rank), save a
    checkpoint as the run's CheckpointHook does (so ``last_checkpoint`` names it and the
    rerun resumes from it), then stop with where it resumes."""
    from mmengine.hooks import CheckpointHook, Hook

    class SaveOnStop(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            if not stop.requested():
                return
            saver = next(h for h in runner.hooks if isinstance(h, CheckpointHook))
            step = runner.iter + 1
            if not (saver.last_ckpt or "").endswith(saver.filename_tmpl.format(step)):
                saver._save_checkpoint(runner)  # not just saved at its interval
            raise TrainingInterrupted(
                f"{stop.what} stopped by {stop.signal_name or 'a signal to another rank'}; "
                f"checkpoint saved at iteration {step} in {runner.work_dir}: rerun the same "
                "command to resume"
            )

    return SaveOnStop()
