"""Suites: many (task, dataset, config) entries over several encoders, resumable.

A suite is a shipped YAML file in ``configs/suites/`` (or any path) validated against
:class:`SuiteConfig`. The runner skips every evaluation whose record already exists
(same task, encoder fingerprint, dataset fingerprint and protocol hash) before any model
is loaded, keeps going when one fails, and finishes with the leaderboard.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ibot_bench.config import load_config, save_config
from ibot_bench.data import DATASETS, parse_spec
from ibot_bench.distributed import (
    barrier,
    gather_objects,
    init_distributed,
    is_main,
    wait_for_all,
    world,
)
from ibot_bench.errors import ConfigError, NotApplicableError, UserError, user_message
from ibot_bench.evaluate import EvalPlan, execute, plan_eval, record_key
from ibot_bench.io import atomic_write_text, remove_stale_temps
from ibot_bench.records import read_records
from ibot_bench.registry import Registry
from ibot_bench.resources import resolve_config, shipped_configs
from ibot_bench.tasks import discover_tasks


@dataclass
class SuiteDataset:
    spec: str  # may use ${data_root}
    group: str = ""  # comparability group for leaderboards (default: the spec)


@dataclass
class SuiteEntry:
    task: str
    dataset: str  # a key of SuiteConfig.datasets
    config: str | None = None  # task YAML: a shipped config (tasks/NAME.yaml) or a path
    overrides: list[str] = field(default_factory=list)


@dataclass
class SuiteConfig:
    name: str = "suite"
    description: str = ""
    data_root: str = "data"
    # used when --encoder is not given; [NAME=]SPEC as for --encoder (ibot_bench.display_names)
    encoders: list[str] = field(default_factory=list)
    # configs/pretrain/<name>.yaml (or a path): with no --encoder, pretrain it, then evaluate
    # the result and its random initialisation (same architecture, same code path)
    pretrain: str | None = None
    datasets: dict[str, SuiteDataset] = field(default_factory=dict)
    entries: list[SuiteEntry] = field(default_factory=list)


@dataclass
class ProfileConfig:
    """A suite profile: overrides applied after every entry's own (``configs/profiles/``)."""

    name: str = ""
    description: str = ""
    # task name -> key=value overrides; "*" applies to every task
    overrides: dict[str, list[str]] = field(default_factory=dict)

    def for_task(self, task: str) -> list[str]:
        return [*self.overrides.get("*", []), *self.overrides.get(task, [])]


SUITES: Registry[Path] = Registry("suite")
for _name, _path in shipped_configs("suites").items():
    SUITES.add(_name, _path, OmegaConf.load(_path).get("description", ""))
PROFILES: Registry[Path] = Registry("profile")
for _name, _path in shipped_configs("profiles").items():
    PROFILES.add(_name, _path, OmegaConf.load(_path).get("description", ""))


def load_profile(name: str | None) -> ProfileConfig:
    """A shipped profile by name (``tiny``); None or "" = no profile."""
    if not name:
        return ProfileConfig()
    profile = OmegaConf.to_object(load_config(ProfileConfig, PROFILES.get(name)))
    unknown = sorted(set(profile.overrides) - {"*"} - set(discover_tasks()))
    if unknown:
        raise ConfigError(f"profile {name!r} names unknown tasks {unknown}")
    return profile


def load_suite(name_or_path: str, overrides: Sequence[str] = ()) -> SuiteConfig:
    """A registered suite name or a YAML path -> validated, interpolated config.

    Refused before any work: a suite without entries, an entry naming a task that is not
    registered or a dataset the suite does not define, a dataset spec of an unknown scheme.
    """
    path = Path(name_or_path)
    if name_or_path not in SUITES and (path.suffix in (".yaml", ".yml") or len(path.parts) > 1):
        path = resolve_config(path, "suites")  # a file: the error says if it is not one
    else:
        path = SUITES.get(name_or_path)  # unknown: the error suggests the closest name
    cfg = load_config(SuiteConfig, path, overrides)
    if not cfg.entries:
        raise ConfigError(
            f"suite {path.name} has no entries; list them under entries: "
            "(- {task: knn, dataset: NAME}), as in the shipped suites (ibot-bench list)"
        )
    tasks = discover_tasks()
    for i, entry in enumerate(cfg.entries, 1):
        where = f"suite {path.name}, entry {i} ({entry.task})"
        try:
            tasks.get(entry.task)
        except UserError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if entry.dataset not in cfg.datasets:
            raise ConfigError(
                f"{where} names dataset {entry.dataset!r}, not one of {sorted(cfg.datasets)}"
            )
    for name, ds in cfg.datasets.items():
        try:
            DATASETS.get(parse_spec(ds.spec)[0])
        except UserError as exc:
            raise ConfigError(f"suite {path.name}, dataset {name!r} ({ds.spec}): {exc}") from None
    return cfg


def pretrain_specs(name: str, output_dir: str | Path) -> list[str]:
    """The encoder specs :func:`pretrain_encoders` returns, known before it trains (so names
    and ``--baseline`` are checked before minutes of pretraining)."""
    out = Path(output_dir) / "pretrain" / resolve_config(name, "pretrain").stem
    return [f"ibot:{out}/checkpoint.pth", f"ibot:{out}/checkpoint_init.pth"]


def pretrain_encoders(name: str, output_dir: str | Path, log: Callable[[str], None] = print):
    """Pretrain iBOT with config ``name`` into ``output_dir/pretrain/<name>`` (resuming a
    partial run, returning at once for a finished one); returns the encoder specs of the
    final teacher and of its random initialisation, the baseline of the same architecture.
    """
    from ibot_bench.pretrain.config import PretrainConfig
    from ibot_bench.pretrain.train import pretrain

    path = resolve_config(name, "pretrain")
    out = Path(output_dir) / "pretrain" / path.stem
    cfg = load_config(PretrainConfig, path, [f"output_dir={out}", "save_init=true"])
    log(f"pretraining {path.name} into {out} (resumes if interrupted)")
    summary = pretrain(cfg)
    if summary["stopped_early"]:
        log(f"pretraining stopped at its time limit after epoch {summary['epochs_done']}; "
            "run again to continue it")  # fmt: skip
    return pretrain_specs(name, output_dir)


def config_path(entry: SuiteEntry) -> Path | None:
    return None if entry.config is None else resolve_config(entry.config, "tasks")


def missing_data(spec: str) -> str | None:
    """Why a dataset spec's files are absent (expected path), or None if it looks present."""
    scheme, _, body = spec.partition(":")
    body = body.partition("?")[0]
    if scheme in ("imagefolder", "coco", "ade20k") and not Path(body).is_dir():
        return f"{spec}: expected {'an' if scheme[0] in 'aeiou' else 'a'} {scheme} folder at {body}"
    return None


@dataclass
class Outcome:
    encoder: str
    task: str
    dataset: str
    status: str  # done | skipped (exists) | failed | n/a | missing data
    message: str = ""
    seconds: float = 0.0


def check_tasks(cfg: SuiteConfig, tasks: Sequence[str] | None) -> None:
    """``tasks`` (``--tasks``) must be tasks of the suite's entries."""
    known = sorted({e.task for e in cfg.entries})
    unknown = sorted(set(tasks or ()) - set(known))
    if unknown:
        raise UserError(f"suite {cfg.name!r} has no task {unknown}; its tasks: {', '.join(known)}")


def _plan_entry(
    cfg: SuiteConfig,
    entry: SuiteEntry,
    encoder: str,
    profile: ProfileConfig,
    splits: dict | None = None,
) -> EvalPlan:
    """The entry's plan: its task config from its file, its overrides and the profile's; a
    config mistake names the entry."""
    origin = f"the overrides of suite entry {entry.task} on {entry.dataset}"
    return plan_eval(
        entry.task,
        encoder,
        cfg.datasets[entry.dataset].spec,
        config_path(entry),
        [*entry.overrides, *profile.for_task(entry.task)],
        splits,
        origin + (" or of the profile" if profile.for_task(entry.task) else ""),
    )


def check_entry_configs(
    cfg: SuiteConfig, tasks: Sequence[str] | None, profile: ProfileConfig | None = None
) -> None:
    """Every entry's task config (its file, overrides and the profile's) must validate: a
    mistake in the suite file is refused before pretraining or any evaluation, not after."""
    for entry in cfg.entries:
        if not tasks or entry.task in tasks:
            _plan_entry(cfg, entry, "", profile or ProfileConfig())


def plan_suite(
    cfg: SuiteConfig,
    encoders: Sequence[str],
    tasks: Sequence[str] | None = None,
    profile: ProfileConfig | None = None,
) -> list[tuple[EvalPlan | None, SuiteEntry, str, str]]:
    """(plan or None if invalid, entry, encoder, error) for every encoder x entry."""
    profile = profile or ProfileConfig()
    check_tasks(cfg, tasks)
    plans = []
    splits: dict[str, dict] = {}  # one scan of each dataset for the whole suite
    for encoder in encoders:
        for entry in cfg.entries:
            if tasks and entry.task not in tasks:
                continue
            spec = cfg.datasets[entry.dataset].spec
            try:
                plan = _plan_entry(cfg, entry, encoder, profile, splits.setdefault(spec, {}))
                plans.append((plan, entry, encoder, ""))
            except UserError as exc:
                plans.append((None, entry, encoder, str(exc)))
    return plans


def prepare(
    plan: EvalPlan | None, error: str, spec: str, done_keys: set, force: bool
) -> tuple[str, str]:
    """What to do with one evaluation: ``("run", "")`` or its final (status, message).

    Never raises: under torchrun a rank must not leave the others waiting.
    """
    try:
        if plan is None:
            return "failed", error
        if missing := missing_data(spec):
            return "missing data", missing
        if not force and plan.resume_key() in done_keys:
            return "skipped (exists)", ""
        return "run", ""
    except NotApplicableError as exc:
        return "n/a", str(exc)
    except UserError as exc:
        return "failed", str(exc)
    except Exception as exc:
        return "failed", f"{type(exc).__name__}: {exc}"


def agree(decision: tuple[str, str]) -> tuple[str, str]:
    """One decision for all ranks (they must take the same branch): a failure anywhere fails
    the evaluation everywhere; otherwise rank 0's."""
    decisions = gather_objects(decision)
    return next((d for d in decisions if d[0] == "failed"), decisions[0])  # type: ignore[return-value]


def leave_if_alone(error: BaseException | None, outcome: str) -> None:
    """After a task that runs on every rank (fine-tuning, dense): ``error`` (this rank's, or
    None) is re-raised, ending the run, when the other ranks do not all arrive within
    :data:`~ibot_bench.distributed.MEET_TIMEOUT`: they are stuck in the task's collective
    operations. A failure on every rank (a bad config) leaves them in step and the suite goes
    on. ``outcome`` is the line a failed rank other than rank 0 (whose log is silent) prints
    at once."""
    rank = world()[0]
    if error is not None and rank:
        print(f"[rank {rank}] {outcome}", file=sys.stderr)
    try:
        wait_for_all()
    except RuntimeError:
        if error is None:
            raise
        raise error from None


def run_suite(
    cfg: SuiteConfig,
    encoders: Sequence[str],
    output_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    force: bool = False,
    cache_dir: str | Path | None = None,
    profile: ProfileConfig | None = None,
    names: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run every (encoder, entry) not already recorded; one failure never stops the rest.

    ``names`` maps an encoder spec to its display name (default: derived from the spec).

    Under torchrun every rank runs this loop in step (the same plans, skips and outcomes);
    each evaluation decides how to use the ranks (:func:`ibot_bench.evaluate.run_task`) and
    rank 0 alone writes records, outcomes and messages.
    """
    init_distributed()
    main_rank = is_main()
    log = log if main_rank else (lambda _msg: None)
    output_dir = Path(output_dir)
    profile = profile or ProfileConfig()
    if main_rank:
        for folder in (output_dir, output_dir / "records", output_dir / "configs"):
            remove_stale_temps(folder)  # what a killed run left half-written
        save_config(cfg, output_dir, "suite.yaml")
    done_keys = {record_key(r) for r in read_records(output_dir)[0]}
    barrier()  # no rank reads the records while rank 0 may be writing one
    outcomes: list[Outcome] = []
    planned = plan_suite(cfg, encoders, tasks, profile)
    for i, (plan, entry, encoder, error) in enumerate(planned, 1):
        ds = cfg.datasets[entry.dataset]
        prefix = f"[{i}/{len(planned)}] {entry.task} on {entry.dataset} with {encoder}"
        start = time.perf_counter()
        status, message = agree(prepare(plan, error, ds.spec, done_keys, force))
        outcome = Outcome(encoder, entry.task, entry.dataset, status, message)
        if status == "run":
            log(f"{prefix}: running")
            error: BaseException | None = None
            try:
                record = execute(
                    plan,
                    output_dir=output_dir,
                    cache_dir=cache_dir,
                    dataset_group=ds.group,
                    profile=profile.name,
                    encoder_name=(names or {}).get(encoder, ""),
                    log=log,
                )
                done_keys.add(record_key(record))
                outcome.status = "done"
            except NotApplicableError as exc:
                outcome.status, outcome.message, error = "n/a", str(exc), exc
            except UserError as exc:
                outcome.status, outcome.message, error = "failed", user_message(exc), exc
            except Exception as exc:  # one broken evaluation must not lose the others
                outcome.status, outcome.message = "failed", f"{type(exc).__name__}: {exc}"
                error = exc
                if main_rank:
                    name = f"{entry.task}__{entry.dataset}__{i}.txt"
                    atomic_write_text(output_dir / "errors" / name, traceback.format_exc())
            if plan.task.distributed:
                leave_if_alone(error, f"{prefix}: {outcome.status} - {outcome.message}")
        outcome.seconds = time.perf_counter() - start
        log(f"{prefix}: {outcome.status}{' - ' + outcome.message if outcome.message else ''}")
        outcomes.append(outcome)
    if main_rank:
        text = json.dumps([dataclasses.asdict(o) for o in outcomes], indent=2)
        atomic_write_text(output_dir / "outcomes.json", text)
    barrier()
    return outcomes
