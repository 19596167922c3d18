"""Run one registered task on one encoder and dataset, and write its result record.

Every task gets a :class:`~ibot_bench.tasks.TaskContext` (features from the cache, the
encoder, the splits, its folders and seed). One record is written per run (with several
``seeds`` the metrics are the mean, with ``<metric>_std`` and each seed's value).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ibot_bench.config import load_config, save_config, to_dict
from ibot_bench.data import ClassificationSplit, load_split
from ibot_bench.data.subsets import find_split_file
from ibot_bench.display_names import derive_name
from ibot_bench.distributed import (
    broadcast_object,
    init_distributed,
    is_main,
    picklable,
    world,
)
from ibot_bench.encoders import encoder_fingerprint
from ibot_bench.encoders.checkpoint import file_sha256
from ibot_bench.errors import ConfigError
from ibot_bench.features import FeatureConfig, FeatureSet, check_feature_config
from ibot_bench.io import remove_stale_temps
from ibot_bench.records import ResultRecord, config_hash, mean_std
from ibot_bench.resources import config_dir, resolve_config, shipped_configs
from ibot_bench.runtime import resolve_device
from ibot_bench.tasks import (
    TaskContext,
    TaskDef,
    TaskOutput,
    check_feature_needs,
    discover_tasks,
)


def eval_schema(task: TaskDef) -> type:
    """The task's config dataclass plus the runner's keys ``features`` and ``seeds``."""
    extra = [
        ("features", FeatureConfig, dataclasses.field(default_factory=FeatureConfig)),
        ("seeds", list[int], dataclasses.field(default_factory=lambda: [0])),
    ]
    name = f"{task.config_cls.__name__}Eval"
    return dataclasses.make_dataclass(name, extra, bases=(task.config_cls,))


def config_task(stem: str) -> str | None:
    """The task a shipped task config is for, by its name: the longest task name it starts
    with (``semi_finetune_quick`` -> ``semi-finetune``); None if it starts with none."""
    stem = stem.replace("_", "-")
    names = [n for n in discover_tasks().names() if stem == n or stem.startswith(n + "-")]
    return max(names, key=len, default=None)


def check_config_task(task: TaskDef, config_path: str | Path | None) -> None:
    """A shipped config of another task is refused with the command it belongs to (its keys
    would read as unknown ones); a user's own file is not judged by its name."""
    if config_path is None:
        return
    path = resolve_config(config_path, "tasks")
    if path.resolve().parent != (config_dir() / "tasks").resolve():
        return
    owner = config_task(path.stem)
    if owner is None or owner == task.name:
        return
    own = [stem for stem in shipped_configs("tasks") if config_task(stem) == task.name]
    raise ConfigError(
        f"the shipped config {path.stem} is for task {owner}, not {task.name}: run "
        f"`ibot-bench eval {owner} --config {path.stem} ...`; shipped configs of {task.name}: "
        f"{', '.join(own) or f'none (its defaults: ibot-bench config show {task.name})'}"
    )


def load_task_config(
    task: TaskDef,
    config_path: str | Path | None,
    overrides: Iterable[str],
    overrides_from: str = "command-line overrides",
):
    """The task's validated config (:func:`eval_schema`): defaults <- file <- overrides."""
    check_config_task(task, config_path)
    return load_config(
        eval_schema(task), config_path, overrides, kind="tasks", overrides_from=overrides_from
    )


@dataclasses.dataclass
class EvalPlan:
    """A resolved evaluation: what would run, and the key its record will carry."""

    task: TaskDef
    cfg: Any  # typed DictConfig of eval_schema(task)
    config: dict[str, Any]  # plain resolved config; its hash is the protocol hash
    encoder_spec: str
    data_spec: str
    # loaded splits of data_spec by name; plans over the same dataset share one dict, so a
    # suite scans each dataset folder once
    splits: dict[str, ClassificationSplit] = dataclasses.field(default_factory=dict)

    @property
    def protocol_hash(self) -> str:
        return config_hash(self.config)

    def split(self, name: str) -> ClassificationSplit:
        if name not in self.splits:
            self.splits[name] = load_split(self.data_spec, name)
        return self.splits[name]

    @functools.cached_property
    def encoder_fingerprint(self) -> str:
        """The encoder's fingerprint (hashes its weights file once per plan)."""
        return encoder_fingerprint(self.encoder_spec)

    def train_fingerprint(self) -> str:
        """The training split's fingerprint, with the content of the ``split_file`` a task
        reads its label subset from: a file edited in place is a new run and record."""
        train = self.split("train")
        split_file = self.config.get("split_file")
        if not split_file:
            return train.fingerprint()
        root = train.dataset_root if isinstance(train, ClassificationSplit) else ""
        listed = file_sha256(find_split_file(split_file, root or None))
        return hashlib.sha256(f"{train.fingerprint()}:{listed}".encode()).hexdigest()

    def resume_key(self) -> tuple[str, str, str, str]:
        """(task, encoder fingerprint, train-set fingerprint, protocol hash), no model loaded."""
        data_fp = self.train_fingerprint()
        return (self.task.name, self.encoder_fingerprint, data_fp, self.protocol_hash)


def plan_eval(
    task_name: str,
    encoder_spec: str,
    data_spec: str,
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    splits: dict[str, ClassificationSplit] | None = None,
    overrides_from: str = "command-line overrides",
) -> EvalPlan:
    """Resolve the task and its config (validated) without touching model or data;
    ``overrides_from`` names the overrides' origin in error messages."""
    task = discover_tasks().get(task_name)
    cfg = load_task_config(task, config_path, overrides, overrides_from)
    features = FeatureConfig(**to_dict(cfg.features))
    check_feature_config(features)
    check_feature_needs(task, cfg, features)
    if not cfg.seeds:
        raise ConfigError("seeds must list at least one seed, e.g. seeds=[0]")
    check_seed(task, cfg)
    check_batch_split(task, cfg)
    splits = {} if splits is None else splits
    return EvalPlan(task, cfg, to_dict(cfg), encoder_spec, data_spec, splits)


def check_seed(task: TaskDef, cfg: Any) -> None:
    """Refuse a task ``seed`` that the runner would replace: each run's seed comes from
    ``seeds`` (:func:`task_config`), so ``seed=1`` alone would silently run seed 0."""
    defaults = {f.name: f.default for f in dataclasses.fields(task.config_cls)}
    if "seed" not in defaults or cfg.get("seed") == defaults["seed"]:
        return
    if list(cfg.seeds) != [cfg.seed]:
        raise ConfigError(
            f"{task.name}: seed={cfg.seed} is not used: each run's seed comes from "
            f"seeds={list(cfg.seeds)}; set seeds=[{cfg.seed}] instead (several, e.g. "
            f"seeds=[0,1,2], report their mean and spread)"
        )


def check_batch_split(task: TaskDef, cfg: Any) -> None:
    """A task training on every process splits its global ``batch_size`` over them (and its
    ``accum_steps``): refuse one that doesn't divide, before any work."""
    processes = int(os.environ.get("WORLD_SIZE", 1))  # the launcher's, known before init
    if not task.distributed or "batch_size" not in cfg:
        return
    parts = processes * int(cfg.get("accum_steps", 1))
    if cfg.batch_size % parts:
        raise ConfigError(
            f"{task.name}: batch_size={cfg.batch_size} (global) does not split over {processes} "
            f"process(es) x accum_steps={cfg.get('accum_steps', 1)}; use a multiple of {parts}, "
            f"e.g. batch_size={parts * max(1, round(cfg.batch_size / parts))}"
        )


def record_key(record: ResultRecord) -> tuple[str, str, str, str]:
    """The resume key of a written record (see :meth:`EvalPlan.resume_key`)."""
    return (
        record.task,
        record.encoder.get("fingerprint", ""),
        record.dataset.get("fingerprint", ""),
        record.protocol_hash,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def task_config(plan: EvalPlan, seed: int) -> Any:
    """The task's own config dataclass instance for one seed (``seed`` set where it has one)."""
    fields = {f.name for f in dataclasses.fields(plan.task.config_cls)}
    merged = OmegaConf.merge(
        OmegaConf.structured(plan.task.config_cls),
        {k: v for k, v in plan.config.items() if k in fields},
    )
    if "seed" in fields:
        merged.seed = seed
    return OmegaConf.to_object(merged)


def combine_seeds(outputs: list[TaskOutput], seeds: list[int]) -> tuple[dict[str, float], dict]:
    """One run's metrics and details; with several seeds the mean, ``_std`` and each seed's."""
    metrics = dict(outputs[0].metrics)
    if len(outputs) == 1:
        return metrics, dict(outputs[0].extra)
    for name in outputs[0].metrics:
        values = [o.metrics[name] for o in outputs]
        metrics[name], metrics[f"{name}_std"] = mean_std(values)
        metrics.update({f"{name}_seed{s}": v for s, v in zip(seeds, values)})
    return metrics, {"per_seed": [o.extra for o in outputs]}


def run_task(task: TaskDef, ctx: TaskContext, cfg: Any) -> TaskOutput:
    """Run ``task`` once, whatever the number of processes.

    Single process, or a ``distributed`` task (DDP fine-tuning, mmengine): the function runs
    on every rank. Any other task runs on rank 0 only, while the other ranks serve it: each
    time it asks for features not extracted yet, rank 0 announces the split and every rank
    joins the sharded extraction; at the end rank 0 sends its output (or its error) to all,
    so every rank returns (or raises) the same and the suite goes on in step.
    """
    rank, world_size = world()
    if world_size == 1 or task.distributed:
        return task.fn(ctx, cfg)
    if rank == 0:
        ctx.announce = lambda split: broadcast_object(("features", split))
        try:
            result: tuple[str, Any] = ("ok", task.fn(ctx, cfg))
        except BaseException as exc:
            broadcast_object(("done", ("error", picklable(exc))))
            raise
        broadcast_object(("done", result))
        return result[1]
    while True:
        kind, value = broadcast_object(None)  # type: ignore[misc]
        if kind == "features":
            with contextlib.suppress(Exception):  # rank 0 meets it too and sends it as "done"
                ctx.features(value)
            continue
        status, out = value
        if status == "error":
            raise out
        return out


def partial_load(info: dict) -> dict:
    """What a record keeps of a partial load (``--allow-partial``): ``partial`` and the keys
    that did not match; {} for a complete load."""
    extra = info.get("extra", {})
    if not extra.get("partial"):
        return {}
    return {"partial": True, "partial_keys": extra.get("partial_keys", {})}


def execute(
    plan: EvalPlan,
    *,
    output_dir: str | Path = "results/eval",
    refresh_features: bool = False,
    cache_dir: str | Path | None = None,
    allow_partial: bool = False,
    dataset_group: str | None = None,
    profile: str = "",
    encoder_name: str = "",
    log: Callable[[str], None] = print,
) -> ResultRecord:
    """Run ``plan`` once per seed and write its record under ``output_dir/records`` (rank 0).

    ``encoder_name`` is the encoder's display name on leaderboards (default: derived from
    the spec, :func:`ibot_bench.display_names.derive_name`).

    Under torchrun every rank calls this with the same plan (see :func:`run_task`).
    """
    init_distributed()
    task, cfg = plan.task, plan.cfg
    output_dir = Path(output_dir)
    feature_config = FeatureConfig(**to_dict(cfg.features))
    enc_fp, data_fp = plan.encoder_fingerprint, plan.train_fingerprint()
    run_id = f"{task.name}__{enc_fp[:12]}__{data_fp[:12]}__{plan.protocol_hash}"
    feature_sets: dict[str, FeatureSet] = {}  # extracted once, shared by every seed
    started = time.perf_counter()
    outputs, contexts = [], []
    for seed in cfg.seeds:
        work_dir = output_dir / "work" / f"{run_id}__seed{seed}"
        remove_stale_temps(work_dir)  # a killed run's half-written checkpoint (can be GBs)
        ctx = TaskContext(
            plan.encoder_spec,
            plan.data_spec,
            work_dir=work_dir,
            allow_partial=allow_partial,
            log=log,
            seed=seed,
            output_dir=output_dir,
            feature_config=feature_config,
            cache_dir=cache_dir,
            refresh_features=refresh_features,
            splits=plan.splits,
            feature_sets=feature_sets,
            fingerprint=enc_fp,
        )
        torch.manual_seed(seed)
        outputs.append(run_task(task, ctx, task_config(plan, seed)))
        contexts.append(ctx)

    metrics, details = combine_seeds(outputs, list(cfg.seeds))
    if "train" in feature_sets:
        train = feature_sets["train"]
        details["features"] = {"key": train.meta["key"], "skipped": train.meta["skipped"]}
        if "val" in feature_sets:  # test images skipped: the metrics cover the others only
            details["features"]["skipped_val"] = feature_sets["val"].meta.get("skipped", [])
    ctx = contexts[0]
    dataset = {
        "spec": plan.data_spec,
        "group": dataset_group or plan.data_spec,
        "fingerprint": data_fp,
        "test_fingerprint": plan.split("val").fingerprint(),
        "split": "train->val",
        "num_train": ctx.size("train"),
        "num_test": ctx.size("val"),
    }
    record = ResultRecord(
        task=task.name,
        protocol=outputs[0].protocol,
        encoder={
            "spec": plan.encoder_spec,
            "fingerprint": enc_fp,
            "arch": ctx.arch(),
            "name": encoder_name or derive_name(plan.encoder_spec),
            **partial_load(ctx.encoder_info()),
        },
        dataset=dataset,
        metrics=metrics,
        config=plan.config,
        details=details,
        seed=int(cfg.seeds[0]),
        device=device_name(resolve_device(feature_config.device)),
        wall_time_s=time.perf_counter() - started,
        profile=profile,
    )
    if is_main():  # under torchrun every rank computed the same record; one writes it
        path = record.write(output_dir)
        save_config(cfg, output_dir / "configs", f"{record.key()}.yaml")
        log(f"record: {path}")
    return record


def run_eval(
    task_name: str,
    encoder_spec: str,
    data_spec: str,
    *,
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    **kwargs: Any,
) -> ResultRecord:
    """Evaluate ``encoder_spec`` on ``data_spec`` with task ``task_name``; returns the record.

    Keyword arguments are those of :func:`execute` (output_dir, cache_dir, ...).
    """
    return execute(plan_eval(task_name, encoder_spec, data_spec, config_path, overrides), **kwargs)
