"""The wheel works on its own: built, installed without the source tree, run from elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build the wheel (no network: this environment's setuptools) and install it, without
    dependencies (they are this environment's), into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # the files a clone has: no stale build/ or local results
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(tmp / "dist"), str(source)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("ibot_bench-*.whl"))
    target = tmp / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target)]
    subprocess.run([*install, str(wheel)], check=True, cwd=tmp)
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    return {"wheel": wheel, "target": target, "workdir": workdir}


def ibot_bench(installed: dict, *args: str) -> subprocess.CompletedProcess:
    """The installed console script, run from a folder outside the repository."""
    env = {**os.environ, "PYTHONPATH": str(installed["target"])}
    script = installed["target"] / "bin" / "ibot-bench"
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=installed["workdir"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_wheel_holds_one_import_name_with_configs_and_reference_rows(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ibot_bench"}, top  # no top-level pretrain/ or downstream/
    for path in (
        "ibot_bench/pretrain/train.py",
        "ibot_bench/downstream/knn.py",
        "ibot_bench/downstream/detection/__init__.py",
        "ibot_bench/configs/suites/smoke.yaml",
        "ibot_bench/configs/tasks/finetune_quick.yaml",
        "ibot_bench/configs/pretrain/quick.yaml",
        "ibot_bench/reference/ibot_paper.csv",
    ):
        assert path in names, path


def test_installed_wheel_runs_from_another_directory(installed):
    where = ibot_bench(installed, "version")  # imports come from the wheel, not the tree
    assert where.returncode == 0, where.stderr
    code = "import ibot_bench.pretrain.train as t, ibot_bench.resources as r; "
    code += "from ibot_bench.leaderboard import reference_frame as f; "
    code += "print(t.__file__); print(r.config_dir()); print(r.reference_dir()); print(len(f()))"
    env = {**os.environ, "PYTHONPATH": str(installed["target"])}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=installed["workdir"], env=env, capture_output=True,
        text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert all(line.startswith(str(installed["target"])) for line in out[:3]), out
    assert int(out[3]) > 30  # the published rows

    listed = ibot_bench(installed, "list")
    assert listed.returncode == 0, listed.stderr
    assert "knn" in listed.stdout and "smoke" in listed.stdout and "timm" in listed.stdout

    shown = ibot_bench(installed, "config", "show", "knn")
    assert shown.returncode == 0, shown.stderr
    assert "temperature: 0.07" in shown.stdout and "ks:" in shown.stdout

    run = ibot_bench(installed, "run", "--suite", "smoke")
    assert run.returncode == 0, run.stdout + run.stderr
    records = list((installed["workdir"] / "results" / "smoke" / "records").glob("*.json"))
    protocols = {json.loads(p.read_text())["protocol"] for p in records}
    assert len(records) == 10  # 2 random encoders x 5 tasks (cluster-head: n/a, no head)
    assert protocols == {"knn", "linear", "logreg", "cluster-kmeans", "semi-50pct"}
    assert (installed["workdir"] / "results" / "smoke" / "leaderboard.md").is_file()
