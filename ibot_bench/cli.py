"""The ``ibot-bench`` command line: thin argparse front-ends over library functions.

User errors (:class:`~ibot_bench.errors.UserError`) print one message and exit with
status 2; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ibot_bench.errors import UserError, user_message
from ibot_bench.io import atomic_write_text
from ibot_bench.launch import add_launcher_args, maybe_submit

EXAMPLES = {
    "list": "ibot-bench list",
    "data": "ibot-bench data synth ./synth --classes 10 --size 64",
    "features": "ibot-bench features --encoder random:vit_tiny_patch8 --data synthetic:shapes "
    "--split val features.precision=auto features.batch_size=128",
    "eval": "ibot-bench eval knn --encoder ibot:out/checkpoint.pth --data imagefolder:/data/imagenet ks=[10,20]\n"
    "  ibot-bench eval detection --encoder ibot:out/checkpoint.pth --data coco:/data/coco --output results/det",
    "version": "ibot-bench version",
    "run": "ibot-bench run --suite quick --encoder ours=ibot:out/checkpoint.pth --encoder random:vit_small\n"
    "  ibot-bench run --suite full --profile tiny --data-root ROOT --encoder ibot:ckpt.pth\n"
    "  ibot-bench run --suite full --data-root /data --encoder ibot:ckpt.pth --launcher slurm "
    "--nodes 2 --gpus-per-node 8",
    "report": "ibot-bench report results/quick results/cluster-run --format md --reference\n"
    "  ibot-bench report results/quick --detail --baseline quick-init",
    "pretrain": "ibot-bench pretrain --config quick --output out/quick optim.epochs=4",
    "config": "ibot-bench config show linear epochs=10 features.img_size=64\n"
    "  ibot-bench config show finetune --config tasks/finetune_vit_small.yaml lr=1e-3",
    "setup-dense": "ibot-bench setup-dense",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ibot-bench",
        description="Evaluate pretrained vision encoders (kNN, linear, ...) and pretrain iBOT.",
        epilog="Example: " + EXAMPLES["features"],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"Example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    add("list", "list registered encoder schemes, datasets, tasks and suites")
    add("version", "print the version of ibot-bench and its main dependencies")

    def add_action(
        parent: argparse.ArgumentParser, name: str, help: str
    ) -> argparse.ArgumentParser:
        """``ibot-bench PARENT NAME``: a command's single action, with its parent's example."""
        actions = parent.add_subparsers(dest=f"{parent.prog.split()[-1]}_command", required=True,
                                        metavar="ACTION")  # fmt: skip
        return actions.add_parser(
            name,
            help=help,
            epilog=parent.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    synth = add_action(
        add("data", "dataset utilities"),
        "synth",
        "write the synthetic shapes dataset to OUT in the real ImageNet (with SimCLRv2's "
        "1percent.txt / 10percent.txt), COCO 2017 and ADEChallengeData2016 layouts, so that "
        "`ibot-bench run --suite full --data-root OUT` runs on it",
    )
    synth.add_argument(
        "out", help="output folder: new or empty, or one written by data synth (--overwrite)"
    )
    synth.add_argument("--classes", type=int, default=10, help="number of shape classes (<= 12)")
    synth.add_argument("--size", type=int, default=64, help="image size in pixels")
    synth.add_argument(
        "--train",
        type=int,
        default=200,
        help="training images per class (default 200: 1percent.txt then lists exactly 1%% of "
        "them, 2 per class, the fewest with which semi can hold some out; >= 80 passes "
        "semi's 1.25x share check)",
    )
    synth.add_argument("--val", type=int, default=25, help="validation images per class")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a synthetic set written to OUT before: only what data synth wrote there "
        "(listed in OUT/synthetic.json) is replaced; it refuses if those folders hold other files",
    )

    feats = add("features", "extract and cache frozen features; print shape, speed, cache path")
    _add_encoder_data(feats)
    feats.add_argument("--split", default="train", choices=["train", "val"])
    feats.add_argument("--refresh", action="store_true", help="recompute even if cached")
    feats.add_argument(
        "--cache-dir", default=None, help="feature cache (default: $IBOT_BENCH_CACHE)"
    )
    feats.add_argument(
        "overrides",
        nargs="*",
        help="features.KEY=VALUE settings, as for eval: img_size, crop_pct, interpolation, "
        "n_last_blocks, batch_size, num_workers, precision, channels_last, skip_corrupt, device",
    )

    run = add("run", "run a suite of evaluations over encoders, resumable, with a leaderboard")
    run.add_argument("--suite", default="quick", help="suite name (see `ibot-bench list`) or YAML")
    run.add_argument(
        "--encoder",
        action="append",
        default=[],
        help="[NAME=]SPEC, repeatable; NAME (no ':', '/', '\\', '?') is the leaderboard's "
        "display name, derived from SPEC when omitted",
    )
    run.add_argument(
        "--baseline",
        default=None,
        help="display name of the encoder leaderboard.png colours against "
        "(default: the first random/init encoder)",
    )
    run.add_argument("--data-root", default=None, help="root of real datasets (suite `full`)")
    run.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    run.add_argument("--output", default=None, help="results folder (default: results/<suite>)")
    run.add_argument(
        "--force",
        action="store_true",
        help="rerun evaluations already recorded (a training task whose finished checkpoint is in "
        "OUTPUT/work/ returns its results: delete that folder to train again)",
    )
    run.add_argument(
        "--profile",
        default=None,
        help="shrink every entry (`tiny`: CPU seconds, for checking a suite end to end; its "
        "records form leaderboard groups of their own)",
    )
    run.add_argument(
        "--pretrain", default=None, help="pretrain config used when no --encoder (quick, demo)"
    )
    run.add_argument("--cache-dir", default=None, help="feature cache (default: $IBOT_BENCH_CACHE)")
    add_launcher_args(run)

    rep = add("report", "merge result folders into one leaderboard (CSV, Markdown, heatmap)")
    rep.add_argument("dirs", nargs="+", help="result folders holding records/")
    rep.add_argument("--format", default="md", choices=["md", "csv", "html"], help="printed format")
    rep.add_argument("--reference", action="store_true", help="add the paper's published rows")
    rep.add_argument("--output", default=None, help="where to write files (default: first DIR)")
    rep.add_argument(
        "--detail", action="store_true", help="print every metric, not one per protocol"
    )
    rep.add_argument(
        "--baseline",
        default=None,
        help="display name of the encoder leaderboard.png colours against "
        "(default: the first random/init encoder)",
    )

    ev = add("eval", "run one evaluation task and write its result record")
    ev.add_argument("task", help="task name (see `ibot-bench list`)")
    _add_encoder_data(ev)
    ev.add_argument(
        "--config", default=None, help="task config: a YAML path or a shipped name (finetune_quick)"
    )
    ev.add_argument("--output", default="results/eval", help="folder for records/ and configs/")
    ev.add_argument("--refresh", action="store_true", help="recompute cached features")
    ev.add_argument("--cache-dir", default=None, help="feature cache (default: $IBOT_BENCH_CACHE)")
    ev.add_argument(
        "overrides",
        nargs="*",
        help="key=value config overrides, e.g. features.img_size=64 seeds=[0,1,2]",
    )

    pre = add("pretrain", "pretrain iBOT (single process, or DDP under torchrun)")
    pre.add_argument(
        "--config", required=True, help="run config: a YAML path or a shipped name (quick, demo)"
    )
    pre.add_argument("--output", default=None, help="output folder (same as output_dir=DIR)")
    pre.add_argument(
        "--resume", default=None, help="checkpoint to resume (default: OUTPUT/checkpoint.pth)"
    )
    pre.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even though settings (data, batch size, seed, schedule, ...) differ from "
        "the checkpoint's; the change is recorded in OUTPUT/config_history.yaml",
    )
    pre.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=10")
    add_launcher_args(pre)

    show = add_action(
        add("config", "show configs: a task's full effective config as YAML"),
        "show",
        "print TASK's effective config (defaults <- --config file <- overrides) as YAML",
    )
    show.add_argument("task", help="task name (see `ibot-bench list`)")
    show.add_argument("--config", default=None, help="task config: a YAML path or a shipped name")
    show.add_argument("overrides", nargs="*", help="key=value overrides, as for eval")
    dense = add(
        "setup-dense",
        "install mmdet/mmseg and build mmcv 2.1.0 with ops for this torch (cached, reused)",
    )
    dense.add_argument("--rebuild", action="store_true", help="ignore the cached mmcv wheel")
    dense.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    return parser


def _add_encoder_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encoder",
        required=True,
        action="append",  # given twice is an error (_only_one), not silently the last
        help="[NAME=]SPEC, SPEC: random:ARCH | timm:NAME[:PATH[:NET]] | ibot:PATH[:NET] | dino:PATH[:NET]; "
        "NAME (no ':', '/', '\\', '?') is the display name on leaderboards",
    )
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="imagefolder:ROOT | synthetic:shapes | digits | coco:ROOT | ade20k:ROOT",
    )
    p.add_argument(
        "--allow-partial", action="store_true", help="load checkpoints with missing keys"
    )


def _only_one(args: argparse.Namespace) -> None:
    """``args.encoder`` and ``args.data`` as single values: ``eval`` and ``features`` take one
    of each, so a repeated flag is an error (argparse would keep the last one silently)."""
    for flag in ("encoder", "data"):
        values = getattr(args, flag)
        if len(values) > 1:
            raise UserError(
                f"--{flag} given {len(values)} times ({', '.join(values)}); {args.command} takes "
                f"one. To evaluate several encoders or datasets use a suite: ibot-bench run "
                f"--suite NAME --encoder A --encoder B (see ibot-bench list)"
            )
        setattr(args, flag, values[0])
    from ibot_bench.display_names import split_named
    from ibot_bench.encoders import check_spec

    # checked before the overrides: `--encoder ibot x.pth` once blamed x.pth as an override
    check_spec(split_named(args.encoder)[1])


def _cmd_list(args: argparse.Namespace) -> None:
    from ibot_bench.data import DATASETS
    from ibot_bench.encoders import ENCODERS
    from ibot_bench.tasks import discover_tasks

    tasks = discover_tasks()
    for title, registry in (
        ("encoder schemes", ENCODERS),
        ("datasets", DATASETS),
        ("tasks", tasks),
    ):
        print(f"{title}:")
        for name in registry:
            print(f"  {name:14s} {registry.help(name)}")
    from ibot_bench.suites import PROFILES, SUITES

    for title, registry in (("suites", SUITES), ("suite profiles (run --profile)", PROFILES)):
        print(f"{title}:")
        for name in registry:
            print(f"  {name:14s} {registry.help(name)}")


def _cmd_version(args: argparse.Namespace) -> None:
    from ibot_bench.records import software_versions

    for name, version in software_versions().items():
        print(f"{name:12s} {version}")


def _cmd_data(args: argparse.Namespace) -> None:
    from ibot_bench.data.synthetic import ADE20K_DIR, write_synthetic

    meta = write_synthetic(
        args.out,
        num_classes=args.classes,
        train_per_class=args.train,
        val_per_class=args.val,
        image_size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    counts = meta["counts"]
    print(
        f"wrote {args.out}: {len(meta['classes'])} classes, {args.size}px, "
        f"{counts['train']} train / {counts['val']} val images"
    )
    for spec, layout in (("imagefolder", "imagenet"), ("coco", "coco"), ("ade20k", ADE20K_DIR)):
        print(f"  {spec}:{args.out}/{layout}")
    for name, info in meta["split_files"].items():
        share = f"{100 * info['share']:.3g}% of train"
        print(f"  {args.out}/{info['path']}: {info['images']} images ({share})")
        if not info["accepted"]:
            print(
                f"  warning: with {args.train} training images per class {name} cannot list "
                f"{100 * info['fraction']:g}% (within 1.25x) and at least one image per class, "
                f"so semi with fraction={info['fraction']:g} will reject it; --train 200 "
                "(the default) gives exactly 1% and 10%.",
                file=sys.stderr,
            )
        elif info["per_class"][0] < 2:
            print(
                f"  note: {name} lists one image for some classes, too few for the semi task "
                "to hold some out for choosing its hyperparameters; --train 200 (the default) "
                "gives 2 per class in 1percent.txt.",
                file=sys.stderr,
            )
    print(f"  ibot-bench run --suite full --data-root {args.out}")


def _cmd_features(args: argparse.Namespace) -> None:
    from ibot_bench.config import load_config, to_dict
    from ibot_bench.display_names import split_named
    from ibot_bench.distributed import is_main
    from ibot_bench.features import FeatureConfig, extract_features

    _only_one(args)
    bad = [o for o in args.overrides if not o.startswith("features.")]
    if bad:
        raise UserError(
            f"features takes feature settings only, as features.KEY=VALUE; got {bad[0]!r}"
        )
    overrides = [o.removeprefix("features.") for o in args.overrides]
    cfg = FeatureConfig(**to_dict(load_config(FeatureConfig, overrides=overrides)))
    feats = extract_features(
        split_named(args.encoder)[1],
        args.data,
        args.split,
        cfg,
        cache_dir=args.cache_dir,
        refresh=args.refresh,
        allow_partial=args.allow_partial,
    )
    if not is_main():  # under torchrun every rank has the features; rank 0 reports
        return
    meta = feats.meta
    print(f"images      {len(feats)} ({feats.num_classes} classes, split {args.split})")
    print(f"cls         {tuple(feats.cls.shape)}")
    print(f"patch_mean  {tuple(feats.patch_mean.shape)}")
    print(f"cls_last_n  {tuple(feats.cls_last_n.shape)}")
    speed = "cached" if meta["cache_hit"] else f"{meta['images_per_s']:.1f} img/s"
    print(f"throughput  {speed}")
    print(f"cache       {meta['cache_path']}")


def _check_output(output: str) -> None:
    """``--output`` must be a folder or a path one can be made at: a file there (or above it)
    or a folder this user cannot write is refused before any work, not when the record is
    written."""
    path = Path(output).expanduser()
    taken = next((p for p in (path, *path.parents) if p.exists()), None)
    if taken is not None and not taken.is_dir():
        raise UserError(
            f"--output {output}: {taken} is a file, not a folder; give a new or existing folder"
        )
    if taken is not None and not os.access(taken, os.W_OK | os.X_OK):
        raise UserError(
            f"--output {output}: cannot write in {taken} (permission denied); give a folder "
            "you can write"
        )


def _cmd_eval(args: argparse.Namespace) -> None:
    from ibot_bench.display_names import split_named
    from ibot_bench.evaluate import run_eval

    _only_one(args)
    _check_output(args.output)
    name, spec = split_named(args.encoder)
    record = run_eval(
        args.task,
        spec,
        args.data,
        config_path=args.config,
        overrides=args.overrides,
        output_dir=args.output,
        refresh_features=args.refresh,
        cache_dir=args.cache_dir,
        allow_partial=args.allow_partial,
        encoder_name=name or "",
    )
    print(f"{record.task} [{record.protocol}] {args.encoder} on {args.data}")
    for name, value in record.metrics.items():
        print(f"  {name:16s} {value:.4f}")


def _print_board(boards, title: str) -> None:
    """The leaderboard on the terminal: per group one table (encoders x headline metrics,
    ``*`` and bold on the best per column) and its legend.

    Names go in as rich ``Text`` (never markup or emoji codes), control characters made
    visible (:func:`ibot_bench.leaderboard.printable`): they show exactly as recorded.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ibot_bench.leaderboard import legend_lines, printable

    def text(name: object) -> Text:
        return Text(printable(name))

    # a log file or pipe gets the whole table (rich would squeeze it into 80 columns)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if not boards:
        console.print("no results to show")
        return
    for b in boards:
        best = b.best()
        t = Table(title=text(f"{title}: {b.group}"), caption="* best per column")
        longest = max((len(printable(n)) for n in b.table.index), default=7) + len(" (baseline)")
        t.add_column("encoder", min_width=min(longest, 24))
        for column in b.table.columns:  # room for "100.00*"; long headers wrap
            t.add_column(text(column), justify="right", min_width=7)
        for name, row in b.table.iterrows():
            label = text(name + (" (baseline)" if name == b.baseline else ""))
            cells = [
                Text("-") if v != v else
                Text(f"{v:.2f}*", style="bold") if best.at[name, c] else Text(f"{v:.2f} ")
                for c, v in row.items()
            ]  # fmt: skip
            t.add_row(label, *cells)
        console.print(t)
        for line in legend_lines(b, printable):
            console.print(Text(f"  {line}"))


def _cmd_run(args: argparse.Namespace) -> int:
    from ibot_bench.display_names import name_encoders
    from ibot_bench.distributed import is_main
    from ibot_bench.leaderboard import write_reports
    from ibot_bench.suites import (
        check_entry_configs,
        check_tasks,
        load_profile,
        load_suite,
        pretrain_encoders,
        pretrain_specs,
        run_suite,
    )

    overrides = [f"data_root={args.data_root}"] if args.data_root else []
    suite = load_suite(args.suite, overrides)
    profile = load_profile(args.profile)
    output = args.output or f"results/{suite.name}"
    _check_output(output)
    if args.pretrain and args.encoder:
        raise UserError(
            "--pretrain evaluates the network it pretrains and its initialisation in place of "
            "--encoder; give one of them (or run the suite twice)"
        )
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    check_tasks(suite, tasks)
    check_entry_configs(suite, tasks, profile)
    # every check before any work: pretraining takes minutes, a cluster job hours
    pretrain_name = None if args.encoder else args.pretrain or suite.pretrain
    if args.encoder:
        encoders = args.encoder
    elif pretrain_name:
        encoders = pretrain_specs(pretrain_name, output)
    else:
        encoders = list(suite.encoders)
    if not encoders:
        raise UserError(f"suite {suite.name!r} names no encoder; pass --encoder SPEC (repeatable)")
    names = name_encoders(encoders)  # two encoders given one name: refused here
    _check_baseline(args.baseline, names, output)
    if (launched := maybe_submit(args, output)) is not None:  # --launcher slurm|local
        return launched
    if pretrain_name:
        pretrain_encoders(pretrain_name, output)
    outcomes = run_suite(
        suite,
        list(names),
        output,
        tasks=tasks,
        force=args.force,
        cache_dir=args.cache_dir,
        profile=profile,
        names=names,
    )
    failed = [o for o in outcomes if o.status in ("failed", "missing data")]
    if not is_main():  # under torchrun rank 0 reports for all
        return 1 if failed else 0
    boards, _, errors, stale = write_reports([output], output, baseline=args.baseline, names=names)
    _warn(errors, stale)
    _print_board(boards, suite.name)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    print(", ".join(f"{n} {status}" for status, n in counts.items()) + f"; results in {output}/")
    for o in failed:
        print(f"  {o.status}: {o.task} on {o.dataset} with {o.encoder}: {o.message}")
    return 1 if failed else 0


def _warn(errors: Sequence[tuple[object, str]], stale: Sequence[str]) -> None:
    """The leaderboard's warnings on stderr: corrupt records, records of earlier weights."""
    for path, err in errors:
        print(f"warning: ignored corrupt record {path}: {err}", file=sys.stderr)
    for line in stale:
        print(f"warning: {line}", file=sys.stderr)


def _check_baseline(baseline: str | None, names: dict[str, str], output: str) -> None:
    """``run --baseline NAME`` must name an encoder of this run or of ``output``'s records
    (checked before any work, as the leaderboard would refuse it at the end)."""
    from ibot_bench.records import read_records

    if baseline is None or baseline in names.values():
        return
    known = [*names.values(), *(r.display_name for r in read_records(output)[0])]
    if baseline not in known:
        listed = ", ".join(map(repr, dict.fromkeys(known)))
        raise UserError(
            f"--baseline {baseline!r} is not one of the encoders' display names: {listed}"
        )


def _check_results_folder(folder: str) -> None:
    """``folder`` must be a results folder (one with ``records/``), else an error saying
    which folder to pass: its parent for a records/ folder, results folders found inside."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError(
            f"{folder} is a file, not a results folder; pass the folder holding records/"
        )
    if not path.is_dir():
        raise UserError(f"results folder {folder} does not exist")
    if (path / "records").is_dir():
        return
    inside = sorted(str(p.parent) for p in path.glob("*/records") if p.is_dir())
    if path.name == "records":
        hint = f"it holds the records themselves: pass its parent, {path.parent}"
    elif inside:
        hint = f"these folders inside it are: {' '.join(inside)} (report takes several)"
    else:
        hint = "pass the --output folder of an `ibot-bench run` or `eval`"
    raise UserError(f"{folder} is not a results folder (it has no records/ folder); {hint}")


def _cmd_report(args: argparse.Namespace) -> None:
    from ibot_bench.leaderboard import (
        detail_html,
        detail_markdown,
        headline_csv_table,
        spreadsheet_safe,
        to_html,
        to_markdown,
        write_reports,
    )

    for d in args.dirs:
        _check_results_folder(d)
    output = args.output or args.dirs[0]
    _check_output(output)
    boards, detail, errors, stale = write_reports(
        args.dirs, output, reference=args.reference, baseline=args.baseline
    )
    _warn(errors, stale)
    if args.format == "md":
        print(detail_markdown(detail, boards) if args.detail else to_markdown(boards))
    elif args.format == "csv":  # pandas quotes names holding commas, quotes or newlines
        print(spreadsheet_safe(detail if args.detail else headline_csv_table(boards)).to_csv())
    else:
        html = detail_html(detail, boards) if args.detail else to_html(boards)
        name = "leaderboard_detail.html" if args.detail else "leaderboard.html"
        atomic_write_text(os.path.join(output, name), html)
        print(html)


def _cmd_pretrain(args: argparse.Namespace) -> int | None:
    from ibot_bench.config import load_config
    from ibot_bench.pretrain.config import PretrainConfig
    from ibot_bench.pretrain.train import pretrain

    overrides = list(args.overrides)
    if args.output is not None:
        overrides.append(f"output_dir={args.output}")
    cfg = load_config(PretrainConfig, args.config, overrides, kind="pretrain")
    if (launched := maybe_submit(args, cfg.output_dir)) is not None:  # --launcher slurm|local
        return launched
    summary = pretrain(cfg, resume=args.resume, force_resume=args.force_resume)
    if not summary["is_main"]:
        return
    state = "stopped early" if summary["stopped_early"] else "done"
    print(f"pretrain {state}: {summary['epochs_done']} epoch(s) in {summary['wall_s']:.0f}s")
    checkpoint = Path(summary["output_dir"]) / "checkpoint.pth"
    if not checkpoint.is_file() and args.resume:  # resumed a finished run: nothing to write
        print(f"  nothing to train: {args.resume} had already finished every epoch")
        checkpoint = Path(args.resume)
    print(f"  checkpoint  {checkpoint}")
    print(f"  evaluate    ibot-bench eval knn --encoder ibot:{checkpoint} --data ...")


def _cmd_config(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from ibot_bench.evaluate import load_task_config
    from ibot_bench.tasks import discover_tasks

    task = discover_tasks().get(args.task)
    cfg = load_task_config(task, args.config, args.overrides)
    print(f"# {task.name}: defaults <- {args.config or 'no file'} <- overrides")
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")


def _cmd_setup_dense(args: argparse.Namespace) -> None:
    from ibot_bench.dense_setup import setup_dense

    setup_dense(rebuild=args.rebuild, jobs=args.jobs)


COMMANDS = {
    "setup-dense": _cmd_setup_dense,
    "run": _cmd_run,
    "report": _cmd_report,
    "list": _cmd_list,
    "version": _cmd_version,
    "data": _cmd_data,
    "features": _cmd_features,
    "eval": _cmd_eval,
    "pretrain": _cmd_pretrain,
    "config": _cmd_config,
}


def _record_for_torchrun(exc: Exception) -> None:
    """Under torchrun, write ``exc`` to this rank's error file (torch elastic's), so the
    failure summary torchrun prints at the end names the error instead of
    ``error_file: <N/A>`` under a pile of other ranks' lost-connection tracebacks."""
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options (argparse stops at the first); a
    # word that is not an option goes to them too, whose check says what is wrong with it
    options = [e for e in extra if e.startswith("-")]
    if args.command not in ("eval", "pretrain", "features", "config") or options:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(options or extra)}")
    else:
        args.overrides = args.overrides + extra
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ibot_bench").setLevel(logging.INFO)  # our progress notes, not libraries'
    try:
        return COMMANDS[args.command](args) or 0
    except UserError as exc:
        print(f"ibot-bench: error: {user_message(exc)}", file=sys.stderr)
        _record_for_torchrun(exc)
        return 2
    except Exception as exc:
        _record_for_torchrun(exc)
        raise
    except KeyboardInterrupt as exc:
        detail = str(exc) or "finished results and caches are kept"
        if args.command == "run" and not str(exc):  # what was recorded is skipped next time
            where = args.output or "results/SUITE"
            detail += (
                "; run the same command again to continue (finished evaluations are skipped; "
                f"`ibot-bench report {where}` shows them now)"
            )
        print(f"ibot-bench: interrupted; {detail}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
