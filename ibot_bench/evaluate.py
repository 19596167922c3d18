"""Run one registered task on one encoder and dataset, and write its result record.

Frozen tasks get the train and val features from the cached engine; training tasks get
a :class:`~ibot_bench.tasks.TaskContext`. One record is written per run (with several
``seeds`` the metrics are the mean, with ``<metric>_std`` and each seed's value).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ibot_bench.config import load_config, save_config, to_dict
from ibot_bench.data import ClassificationSplit, load_split
from ibot_bench.distributed import is_main
from ibot_bench.encoders import encoder_fingerprint
from ibot_bench.features import FeatureConfig, extract_features, resolve_device
from ibot_bench.records import ResultRecord, config_hash, mean_std
from ibot_bench.tasks import TaskContext, TaskDef, discover_tasks


def eval_schema(task: TaskDef) -> type:
    """The task's config dataclass plus the runner's keys ``features`` and ``seeds``."""
    extra = [
        ("features", FeatureConfig, dataclasses.field(default_factory=FeatureConfig)),
        ("seeds", list[int], dataclasses.field(default_factory=lambda: [0])),
    ]
    name = f"{task.config_cls.__name__}Eval"
    return dataclasses.make_dataclass(name, extra, bases=(task.config_cls,))


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

    def resume_key(self) -> tuple[str, str, str, str]:
        """(task, encoder fingerprint, train-set fingerprint, protocol hash), no model loaded."""
        data_fp = self.split("train").fingerprint()
        return (self.task.name, encoder_fingerprint(self.encoder_spec), data_fp, self.protocol_hash)


def plan_eval(
    task_name: str,
    encoder_spec: str,
    data_spec: str,
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    splits: dict[str, ClassificationSplit] | None = None,
) -> EvalPlan:
    """Resolve the task and its config (validated) without touching model or data."""
    task = discover_tasks().get(task_name)
    cfg = load_config(eval_schema(task), config_path, overrides)
    splits = {} if splits is None else splits
    return EvalPlan(task, cfg, to_dict(cfg), encoder_spec, data_spec, splits)


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


def execute(
    plan: EvalPlan,
    *,
    output_dir: str | Path = "results/eval",
    refresh_features: bool = False,
    cache_dir: str | Path | None = None,
    allow_partial: bool = False,
    dataset_group: str | None = None,
    log: Callable[[str], None] = print,
) -> ResultRecord:
    """Run ``plan`` and write its record under ``output_dir/records`` (rank 0 only)."""
    task, cfg, plain = plan.task, plan.cfg, plan.config
    enc_spec, data_spec = plan.encoder_spec, plan.data_spec
    feat_cfg = FeatureConfig(**to_dict(cfg.features))
    if "n_last_blocks" in task.needs:
        feat_cfg.n_last_blocks = task.needs["n_last_blocks"]
    started = time.perf_counter()
    details: dict[str, Any] = {}
    if task.frozen:
        kwargs = {"cfg": feat_cfg, "cache_dir": cache_dir, "refresh": refresh_features, "log": log}
        kwargs["allow_partial"] = allow_partial
        train = extract_features(enc_spec, data_spec, "train", data=plan.split("train"), **kwargs)
        test = extract_features(enc_spec, data_spec, "val", data=plan.split("val"), **kwargs)
        enc_fp, arch = train.meta["encoder"]["fingerprint"], train.meta["encoder"]["arch"]
        data_fps = (train.meta["key"]["dataset"], test.meta["key"]["dataset"])
        sizes = (len(train), len(test))
        details["features"] = {"key": train.meta["key"], "skipped": train.meta["skipped"]}
    else:
        enc_fp, arch = encoder_fingerprint(enc_spec), ""
        train_split, test_split = plan.split("train"), plan.split("val")
        data_fps = (train_split.fingerprint(), test_split.fingerprint())
        sizes = (len(train_split), len(test_split))

    task_fields = {f.name for f in dataclasses.fields(task.config_cls)}
    outputs = []
    for seed in cfg.seeds:
        merged = OmegaConf.merge(
            OmegaConf.structured(task.config_cls),
            {k: v for k, v in plain.items() if k in task_fields},
        )
        if "seed" in task_fields:
            merged.seed = seed
        task_cfg = OmegaConf.to_object(merged)  # the task gets its own dataclass instance
        torch.manual_seed(seed)
        if task.frozen:
            outputs.append(task.fn(train, test, task_cfg))
        else:
            run_id = f"{task.name}__{enc_fp[:12]}__{data_fps[0][:12]}__{plan.protocol_hash}"
            work = Path(output_dir) / "work" / f"{run_id}__seed{seed}"
            outputs.append(
                task.fn(
                    TaskContext(enc_spec, data_spec, work, allow_partial, log, plan.splits),
                    task_cfg,
                )
            )

    metrics = dict(outputs[0].metrics)
    if len(outputs) > 1:
        for name in outputs[0].metrics:
            values = [o.metrics[name] for o in outputs]
            metrics[name], metrics[f"{name}_std"] = mean_std(values)
            metrics.update({f"{name}_seed{s}": v for s, v in zip(cfg.seeds, values)})
    details.update(
        {"per_seed": [o.extra for o in outputs]} if len(outputs) > 1 else outputs[0].extra
    )
    dataset = {
        "spec": data_spec,
        "group": dataset_group or data_spec,
        "fingerprint": data_fps[0],
        "test_fingerprint": data_fps[1],
        "split": "train->val",
        "num_train": sizes[0],
        "num_test": sizes[1],
    }
    record = ResultRecord(
        task=task.name,
        protocol=outputs[0].protocol,
        encoder={"spec": enc_spec, "fingerprint": enc_fp, "arch": arch},
        dataset=dataset,
        metrics=metrics,
        config=plain,
        details=details,
        seed=int(cfg.seeds[0]),
        device=device_name(resolve_device(feat_cfg.device)),
        wall_time_s=time.perf_counter() - started,
    )
    if is_main():  # under torchrun every rank computed the same record; one writes it
        path = record.write(output_dir)
        save_config(cfg, Path(output_dir) / "configs", f"{record.key()}.yaml")
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
