"""`--launcher local|slurm`: one submitit job per command, one task per GPU (ibot_bench.launch).

The local launcher runs the real job (2 CPU tasks on gloo); SLURM is checked with stand-in
`sbatch`/`srun` scripts (the submission script, the printed follow-up commands) and with a
simulated SLURM task environment (the torchrun variables each rank gets)."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from ibot_bench import launch
from ibot_bench.cli import main

SMOKE_KNN = ["run", "--suite", "smoke", "--tasks", "knn"]


def _job_id(out: str) -> str:
    match = re.search(r"submitted (?:local|slurm) job (\S+):", out)
    assert match, out
    return match.group(1)


def test_local_run_two_tasks(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    # two CPU processes on gloo on any machine (submit() then hides the GPUs from the tasks)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "run"
    argv = [*SMOKE_KNN, "--launcher", "local", "--gpus-per-node", "2", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    job = _job_id(printed)
    assert "2 task(s)" in printed and "2 done" in printed  # rank 0's log is streamed
    logs = out / "slurm"
    for rank in (0, 1):
        assert (logs / f"{job}_{rank}_log.out").is_file()
        assert (logs / f"{job}_{rank}_result.pkl").is_file()
    assert f"{job}_0_log.out" in printed
    # the job ran without the launcher flags, into the pinned (absolute) output folder
    assert f"ibot-bench run --suite=smoke --tasks=knn --output={out.absolute()}" in printed
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    keys = Counter((r["encoder"]["spec"], r["task"], r["dataset"]["spec"]) for r in records)
    assert len(keys) == 2 and set(keys.values()) == {1}, keys  # 2 encoders x 1 entry, once each
    assert (out / "leaderboard.md").is_file()


def test_local_pretrain(tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "pre"
    argv = ["pretrain", "--config", "smoke", "--launcher", "local", "--gpus-per-node", "1"]
    assert main([*argv, "--output", str(out), "optim.epochs=1"]) == 0
    printed = capsys.readouterr().out
    job = _job_id(printed)
    assert (out / "checkpoint.pth").is_file()
    assert (out / "slurm" / f"{job}_0_log.out").is_file()
    assert "pretrain done: 1 epoch(s)" in printed


def _fake_slurm(bin_dir: Path, sbatch: str = 'echo "Submitted batch job 4242"') -> None:
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\n{sbatch}\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)


def test_slurm_submission(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "full"
    argv = [*SMOKE_KNN, "--force", "--output", str(out), "--launcher", "slurm", "--nodes", "2"]
    argv += ["--gpus-per-node", "4", "--partition", "gpu", "--time", "1:30:00", "--mem-gb", "64"]
    argv += ["--slurm", "account=proj", "--slurm", "additional_parameters={mail-type: END}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert _job_id(printed) == "4242"
    log = out.absolute() / "slurm" / "4242_0_log.out"
    for line in ("squeue -j 4242", f"tail -f {log}", "scancel 4242", "8 task(s) on 2 node(s)"):
        assert line in printed
    script = (out / "slurm" / "4242_submission.sh").read_text()
    for directive in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=90",
        "--mem=64GB",
        "--account=proj",
        "--mail-type=END",
        "--signal=USR2@",
        "--open-mode=append",  # a requeued job appends to the same logs
        "--job-name=ibot-bench-run",
    ):
        assert f"#SBATCH {directive}" in script, directive
    assert f"srun --unbuffered --output {out.absolute()}/slurm/%j_%t_log.out" in script
    with open(out / "slurm" / "4242_submitted.pkl", "rb") as f:
        command = pickle.load(f).function
    assert command.argv == [
        "run", "--suite=smoke", "--tasks=knn", "--force", f"--output={out.absolute()}"
    ]  # fmt: skip
    # timeout / preemption: the same command again, never --force (finished records stay)
    requeued = command.checkpoint().function
    assert requeued.argv == ["run", "--suite=smoke", "--tasks=knn", f"--output={out.absolute()}"]


def test_sbatch_refusal_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    _fake_slurm(
        tmp_path / "bin", 'echo "sbatch: error: invalid partition specified: x" >&2; exit 1'
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    argv = [*SMOKE_KNN, "--output", str(tmp_path / "o"), "--launcher", "slurm", "--partition", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "ibot-bench: error: sbatch refused the job: sbatch: error: invalid partition specified: x\n"
    )


def test_requeue_drops_resume_once_the_output_has_a_checkpoint(tmp_path):
    argv = ["pretrain", "--config=smoke", "--resume=/old/checkpoint.pth", f"--output={tmp_path}"]
    assert launch._requeue_argv(argv, str(tmp_path)) == argv  # nothing saved yet: keep it
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert launch._requeue_argv(argv, str(tmp_path)) == [argv[0], argv[1], argv[3]]


def test_task_environment_under_slurm(monkeypatch):
    """Rank 5 of 8 (node 1 of 2): the torchrun variables, then the command in-process."""
    pytest.importorskip("submitit")
    slurm = dict(
        SUBMITIT_EXECUTOR="slurm",
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="8",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NODEID="1",
        SLURM_JOB_NODELIST="node[07-08]",
        SLURM_PROCID="5",
        SLURM_LOCALID="1",
    )
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    torchrun = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")
    for key in (*torchrun, "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # so the undo removes what the command sets
        monkeypatch.delenv(key)
    seen = {}

    def fake_main(argv):
        seen.update(argv=argv, **{k: os.environ[k] for k in (*torchrun, "MASTER_ADDR")})
        seen["MASTER_PORT"] = os.environ["MASTER_PORT"]
        return seen.get("rc", 0)

    monkeypatch.setattr("ibot_bench.cli.main", fake_main)
    monkeypatch.setattr("ibot_bench.distributed.init_distributed", lambda: None)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    command = launch.Command(["run", "--suite=full"], "/out")
    assert command() == 0
    assert seen == {
        "argv": ["run", "--suite=full"],
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "NODE_RANK": "1",
        "MASTER_ADDR": "node07",
        "MASTER_PORT": str(20000 + 4242),
    }
    seen["rc"] = 1  # a failed entry marks the job failed (sacct shows FAILED)
    with pytest.raises(launch.JobFailed, match="exited with status 1"):
        command()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nodes", "2"], "--nodes sets up a submitit job; add --launcher slurm"),
        (["--slurm", "account=x"], "--slurm sets up a submitit job"),
        (["--launcher", "local", "--nodes", "0"], "--nodes must be at least 1, got 0"),
        (["--launcher", "local", "--gpus-per-node", "0"], "--gpus-per-node must be at least 1"),
        (["--launcher", "local", "--nodes", "2"], "--launcher local runs on this machine only"),
        (["--launcher", "local", "--slurm", "account"], "--slurm 'account': expected KEY=VALUE"),
        (["--launcher", "local", "--slurm", "=x"], "expected KEY=VALUE"),
        (["--launcher", "local", "--time", "soon"], "--time 'soon': expected HH:MM:SS"),
        (["--launcher", "local", "--slurm", "nodes=2"], "--slurm nodes=...: use --nodes"),
        (["--launcher", "local", "--slurm", "colour=red"], "not a submitit slurm parameter"),
    ],
)
def test_bad_launcher_flags(extra, message, tmp_path, capsys):
    if "slurm parameter" in message or "use --nodes" in message:
        pytest.importorskip("submitit")  # keys are checked against submitit's list
    assert main([*SMOKE_KNN, "--output", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibot-bench: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "slurm").exists()


def test_pretrain_refuses_launcher_flags_without_launcher(tmp_path, capsys):
    assert (
        main(["pretrain", "--config", "smoke", "--output", str(tmp_path), "--time", "1:00:00"]) == 2
    )
    assert "--time sets up a submitit job" in capsys.readouterr().err


def test_slurm_without_sbatch(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main([*SMOKE_KNN, "--output", str(tmp_path / "o"), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "no `sbatch` on the PATH" in err and "--launcher local" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_without_submitit(launcher, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    assert main([*SMOKE_KNN, "--output", str(tmp_path), "--launcher", launcher]) == 2
    assert "pip install 'ibot-bench[slurm]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("1:30:00", 90), ("01:00:01", 61), ("2-00", 2880), ("1-2:30", 1590), ("5:30", 6)],
)
def test_parse_time(text, minutes):
    assert launch.parse_time(text) == minutes
