"""``--launcher slurm|local``: run ``ibot-bench run`` / ``pretrain`` as one submitit job.

The job has ``nodes x gpus_per_node`` tasks, one per GPU. Each task sets the torchrun
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) from
submitit's job environment, joins the process group (:func:`ibot_bench.distributed.
init_distributed`) and runs the same command in-process, without the launcher flags and with
the output folder pinned. On a timeout or a preemption submitit calls :meth:`Command.
checkpoint`, which requeues the same command: the suite runner skips the records already
written and pretraining / fine-tuning resume from their checkpoints, so the job continues
where it stopped. submitit's files (submission script, pickles, one log pair per task) live
in ``OUTPUT/slurm/``.

``local`` runs the very same job through submitit's local executor (G tasks on this machine,
gloo on CPU) and waits for it, streaming rank 0's output; ``slurm`` submits with ``sbatch``
and returns at once. submitit is the optional extra ``ibot-bench[slurm]``, imported only
here and only when a launcher is asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ibot_bench.errors import UserError

LAUNCHERS = ("none", "local", "slurm")
DEFAULT_TIME = "24:00:00"
# a long pretraining goes through several time limits; preemptions are not counted
MAX_TIMEOUT_REQUEUES = 10
# launcher flags (dest -> option); all default to None so "given" is detectable
_FLAGS = {
    "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node",
    "partition": "--partition",
    "time": "--time",
    "cpus_per_task": "--cpus-per-task",
    "mem_gb": "--mem-gb",
    "slurm": "--slurm",
}
# submitit slurm parameters that have their own flag (or that we compute)
_RESERVED = {
    "nodes": "--nodes",
    "ntasks_per_node": "--gpus-per-node (one task per GPU)",
    "gpus_per_node": "--gpus-per-node",
    "partition": "--partition",
    "time": "--time",
    "job_name": "(set by ibot-bench)",
}
_STATUS = re.compile(r"exited with status (\d+)")


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """The launcher options of ``run`` and ``pretrain``."""
    g = parser.add_argument_group(
        "launcher",
        "run this command as one submitit job, one task per GPU, requeued and resumed\n"
        "on timeout or preemption (needs `pip install 'ibot-bench[slurm]'`)",
    )
    g.add_argument(
        "--launcher",
        default="none",
        choices=LAUNCHERS,
        help="none: in this process (or under torchrun); slurm: submit with sbatch and return; "
        "local: the same job on this machine, waited for (default: none)",
    )
    g.add_argument("--nodes", type=int, default=None, metavar="N", help="nodes (default 1)")
    g.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        metavar="G",
        help="GPUs per node = tasks per node (default 1; local without CUDA: G CPU processes)",
    )
    g.add_argument("--partition", default=None, metavar="P", help="SLURM partition")
    g.add_argument(
        "--time",
        default=None,
        metavar="HH:MM:SS",
        help=f"time limit per allocation, SLURM formats (default {DEFAULT_TIME}); the job is "
        "requeued when it runs out",
    )
    g.add_argument("--cpus-per-task", type=int, default=None, metavar="C", help="CPUs per task")
    g.add_argument("--mem-gb", type=float, default=None, metavar="GB", help="memory per node")
    g.add_argument(
        "--slurm",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="any other submitit slurm parameter (repeatable), e.g. account=proj qos=high "
        "constraint=a100 'additional_parameters={mail-type: END}'",
    )
    parser.set_defaults(_launch_parser=parser)


# ---------------------------------------------------------------- validation and parsing


def parse_time(text: str) -> int:
    """A SLURM time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) -> whole minutes (at least 1)."""
    bad = UserError(f"--time {text!r}: expected HH:MM:SS (or MM, D-HH:MM:SS), e.g. 12:00:00")
    days, _, rest = text.strip().rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        raise bad from None
    if not parts or len(parts) > 3 or any(p < 0 for p in [d, *parts]):
        raise bad
    if days:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, s = parts
    else:  # MM or MM:SS
        h, (m, s) = 0, (parts + [0])[:2]
    minutes = math.ceil((((d * 24 + h) * 60 + m) * 60 + s) / 60)
    if minutes < 1:
        raise bad
    return minutes


def _slurm_value(text: str) -> Any:
    """``--slurm`` values: YAML for lists / mappings, int, bool, else the plain string (so
    ``01:00:00`` and ``gpu`` stay strings)."""
    if text[:1] in "[{":
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"--slurm value {text!r} is not valid YAML: {exc}") from None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return text


def parse_slurm_items(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` items -> ``{"slurm_KEY": value}`` for ``update_parameters``."""
    import submitit

    valid = submitit.SlurmExecutor._valid_parameters()
    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value:
            raise UserError(f"--slurm {item!r}: expected KEY=VALUE, e.g. --slurm account=myproj")
        if key in _RESERVED:
            raise UserError(f"--slurm {key}=...: use {_RESERVED[key]} instead")
        if key not in valid:
            raise UserError(
                f"--slurm {key}=...: not a submitit slurm parameter; known: "
                f"{', '.join(sorted(valid - set(_RESERVED)))} (anything else: "
                "additional_parameters={key: value})"
            )
        params[f"slurm_{key}"] = _slurm_value(value)
    return params


def _check(args: argparse.Namespace) -> None:
    if args.launcher == "none":
        given = [opt for dest, opt in _FLAGS.items() if getattr(args, dest, None) is not None]
        if given:
            raise UserError(
                f"{given[0]} sets up a submitit job; add --launcher slurm (or local), or drop it"
            )
        return
    for dest in ("nodes", "gpus_per_node", "cpus_per_task"):
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise UserError(f"{_FLAGS[dest]} must be at least 1, got {value}")
    if args.mem_gb is not None and args.mem_gb <= 0:
        raise UserError(f"--mem-gb must be positive, got {args.mem_gb}")
    if args.launcher == "local" and (args.nodes or 1) > 1:
        raise UserError("--launcher local runs on this machine only: use --nodes 1 (or slurm)")
    parse_time(args.time or DEFAULT_TIME)
    for item in args.slurm or ():  # the format first; the keys once submitit is importable
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value:
            raise UserError(f"--slurm {item!r}: expected KEY=VALUE, e.g. --slurm account=myproj")


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(
            "--launcher needs submitit: pip install 'ibot-bench[slurm]' (or pip install submitit)"
        ) from None
    return submitit


# ---------------------------------------------------------------- the job's command line


def job_argv(args: argparse.Namespace, output_dir: str | Path) -> list[str]:
    """The command the job runs: ``args`` as a command line (options as ``--opt=value``,
    one token each), without the launcher flags, with ``--output`` pinned to an absolute
    path so every requeue writes to the same folder."""
    parser: argparse.ArgumentParser = args._launch_parser
    skip = {"help", "launcher", "output", *_FLAGS}
    options: list[str] = []
    positionals: list[str] = []
    for action in parser._actions:
        if action.dest in skip or action.dest == argparse.SUPPRESS:
            continue
        value = getattr(args, action.dest, None)
        if not action.option_strings:  # positional (the key=value overrides)
            if value is not None:
                positionals += [str(v) for v in (value if isinstance(value, list) else [value])]
            continue
        opt = next(
            (o for o in action.option_strings if o.startswith("--")), action.option_strings[0]
        )
        if value == action.default or value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            options.append(opt if value else "--no-" + opt[2:])
        elif isinstance(action, argparse._CountAction):
            options += [opt] * int(value)
        elif action.nargs == 0:  # store_true / store_false / store_const
            options.append(opt)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                options += [opt, *map(str, item)] if isinstance(item, list) else [f"{opt}={item}"]
        elif isinstance(value, list):
            options += [opt, *map(str, value)]
        else:
            options.append(f"{opt}={value}")
    command = parser.prog.split()[-1]
    return [command, *options, f"--output={os.path.abspath(output_dir)}", *positionals]


def _requeue_argv(argv: list[str], output_dir: str) -> list[str]:
    """The command a requeue reruns: never ``--force`` (that would redo finished records),
    and no ``--resume PATH`` once the output folder holds its own checkpoint."""
    out = [a for a in argv if a != "--force"]
    if argv[0] == "pretrain" and (Path(output_dir) / "checkpoint.pth").exists():
        out = [a for a in out if not a.startswith("--resume=")]
    return out


def _port_for(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JobFailed(RuntimeError):
    """The command ran and returned a non-zero status (the job is marked failed)."""


class Command:
    """The picklable job function: one task (= one rank) of ``ibot-bench ARGV``."""

    def __init__(self, argv: list[str], output_dir: str, master_port: int | None = None):
        self.argv = list(argv)
        self.output_dir = str(output_dir)
        self.master_port = master_port  # None: derived from the job id (SLURM)

    def __call__(self) -> int:
        import submitit

        from ibot_bench import cli
        from ibot_bench.distributed import init_distributed

        env = submitit.JobEnvironment()
        per_node = max(1, env.num_tasks // max(1, env.num_nodes))
        local_rank = env.local_rank
        try:  # a cluster that gives each task its own GPU: that GPU is cuda:0
            import torch

            if 0 < torch.cuda.device_count() < per_node:
                local_rank = 0
        except Exception:  # pragma: no cover - torch is a dependency
            pass
        os.environ.update(
            RANK=str(env.global_rank),
            WORLD_SIZE=str(env.num_tasks),
            LOCAL_RANK=str(local_rank),
            LOCAL_WORLD_SIZE=str(per_node),
            NODE_RANK=str(env.node),
            MASTER_ADDR="127.0.0.1" if env.num_nodes == 1 else env.hostnames[0],
            MASTER_PORT=str(self.master_port or _port_for(str(env.job_id))),
        )
        print(f"[launch] {env}: ibot-bench {shlex.join(self.argv)}", flush=True)
        init_distributed()
        rc = cli.main(self.argv)
        sys.stdout.flush()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if rc:
            raise JobFailed(f"ibot-bench {self.argv[0]} exited with status {rc}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Timeout or preemption: requeue the same command (it resumes)."""
        import submitit

        argv = _requeue_argv(self.argv, self.output_dir)
        return submitit.helpers.DelayedSubmission(Command(argv, self.output_dir, self.master_port))


# ---------------------------------------------------------------- submission


def maybe_submit(args: argparse.Namespace, output_dir: str | Path) -> int | None:
    """Submit this command when ``--launcher`` asks for it (its exit status), else None
    (after refusing launcher flags given without a launcher)."""
    _check(args)
    if args.launcher == "none":
        return None
    return submit(args, output_dir)


def submit(args: argparse.Namespace, output_dir: str | Path) -> int:
    """Submit ``args``' command as one job writing to ``output_dir``; print how to follow
    it. ``slurm`` returns 0 once submitted; ``local`` waits and returns the job's status."""
    _check(args)
    submitit = _import_submitit()
    if args.launcher == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "--launcher slurm: no `sbatch` on the PATH (not a SLURM login node?); "
            "--launcher local runs the same job on this machine"
        )
    local = args.launcher == "local"
    nodes = args.nodes or 1
    gpus = args.gpus_per_node or 1
    minutes = parse_time(args.time or DEFAULT_TIME)
    slurm_params = parse_slurm_items(args.slurm)
    output = Path(output_dir).absolute()
    folder = output / "slurm"
    argv = job_argv(args, output)
    params: dict[str, Any] = dict(
        name=f"ibot-bench-{argv[0]}",
        nodes=nodes,
        tasks_per_node=gpus,
        gpus_per_node=gpus,
        timeout_min=minutes,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        slurm_partition=args.partition,
        **slurm_params,
    )
    master_port = None
    if local:
        import torch

        if torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            ids = [int(v) for v in visible.split(",") if v.strip().isdigit()]
            have = len(ids) if ids else torch.cuda.device_count()
            if gpus > have:
                raise UserError(f"--gpus-per-node {gpus}: this machine shows {have} GPU(s)")
            if ids:
                params["local_visible_gpus"] = tuple(ids)
        else:
            params["gpus_per_node"] = 0  # G CPU processes (gloo)
        master_port = _free_port()
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster="local" if local else "slurm",
        slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES,
        local_max_num_timeout=MAX_TIMEOUT_REQUEUES,
    )
    try:
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    except (NameError, ValueError, AssertionError, TypeError) as exc:
        raise UserError(f"submitit refused the job's parameters: {exc}") from None
    try:  # submitit echoes sbatch's stderr on failure; the error below says it once
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(Command(argv, str(output), master_port))
    except Exception as exc:
        if local:
            raise
        lines = str(exc).strip().splitlines() or [repr(exc)]
        raise UserError(f"sbatch refused the job: {lines[-1]}") from None

    paths = submitit.core.utils.JobPaths(folder, job.job_id, 0)
    where = "this machine" if local else f"{nodes} node(s)"
    print(f"submitted {args.launcher} job {job.job_id}: {nodes * gpus} task(s) on {where}, "
          f"{gpus} per node; time limit {minutes} min, requeued on timeout/preemption")  # fmt: skip
    print(f"  command  ibot-bench {shlex.join(argv)}")
    print(f"  output   {output}/")
    print(f"  logs     {folder}/{job.job_id}_<rank>_log.out and .err (rank 0: {paths.stdout})")
    if not local:
        print(f"  status   squeue -j {job.job_id}")
        print(f"  follow   tail -f {paths.stdout}")
        print(f"  cancel   scancel {job.job_id}")
        return 0
    sys.stdout.flush()
    try:
        _follow(job, paths.stdout)
    except KeyboardInterrupt:
        job.cancel(check=False)
        raise
    return _local_status(job, paths)


def _follow(job, log: Path, poll_s: float = 0.5) -> None:
    """Print rank 0's stdout while the local job runs."""
    pos = 0
    while True:
        finished = job.done()
        if log.exists():
            with open(log, encoding="utf-8", errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
        if finished:
            return
        time.sleep(poll_s)


def _local_status(job, paths) -> int:
    exc = job.exception()
    if exc is None:
        print(f"local job {job.job_id} finished")
        return 0
    match = _STATUS.search(str(exc))
    print(
        f"local job {job.job_id} failed; see {paths.stderr.parent}/{job.job_id}_<rank>_log.err",
        file=sys.stderr,
    )
    return int(match.group(1)) if match else 1
