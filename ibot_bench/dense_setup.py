"""Install the dense-task stack (mmcv with compiled ops, mmdet, mmsegmentation) on current torch.

No prebuilt mmcv wheel matches current torch, and mmdet 3.3 / mmseg 1.2 refuse mmcv >= 2.2,
so mmcv 2.1.0 is built from its PyPI sdist. Two things break the stock build on current
torch, and both are handled here without patching the sdist:

- its ``setup.py`` imports ``pkg_resources`` (gone from setuptools >= 81): we build with
  ``setuptools<81`` and no build isolation;
- torch >= 2.10 headers need C++20 but ``setup.py`` passes ``-std=c++17`` after CFLAGS: a
  compiler wrapper given as ``CXX`` rewrites the flag.

The wheel is tied to the exact torch build although its file name doesn't say so, so it is
cached outside the repository under a key of torch version + CUDA/CPU + Python + platform
and reused by every later install (a fresh venv, CI, another clone).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

MMCV_VERSION = "2.1.0"
# versions known to work together with mmcv 2.1.0 on torch 2.14 (see README "Dense tasks")
DENSE_REQUIREMENTS = [
    "mmengine==0.10.7",
    "mmdet==3.3.0",
    "mmsegmentation==1.2.2",
    "setuptools<81",  # mmcv's build and mmengine's Config use pkg_resources
    "ftfy",  # imported by mmseg without being declared
    "regex",
]
INSTALL_COMMAND = "ibot-bench setup-dense   (or: make install-dense)"


def use_cuda() -> bool:
    """Build CUDA ops when torch sees a GPU or the user forces it (``FORCE_CUDA=1``)."""
    import torch

    forced = os.environ.get("FORCE_CUDA", "") == "1"
    return forced or (torch.cuda.is_available() and torch.version.cuda is not None)


def wheel_cache_key(cuda: bool) -> str:
    """The key mmcv's binary really depends on: torch build, device flavour, Python, platform."""
    import torch

    flavour = f"cu{torch.version.cuda}" if cuda else "cpu"
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"mmcv-{MMCV_VERSION}_torch-{torch.__version__.replace('+', '_')}_{flavour}_{py}_{plat}"


def cache_root() -> Path:
    """``$IBOT_BENCH_CACHE`` or ``$XDG_CACHE_HOME/ibot-bench`` (``~/.cache/ibot-bench``)."""
    if os.environ.get("IBOT_BENCH_CACHE"):
        return Path(os.environ["IBOT_BENCH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ibot-bench"


def mmcv_ops_status() -> str | None:
    """None when mmcv with compiled ops imports at the pinned version, else what is wrong."""
    try:
        import mmcv
    except ImportError:
        return "mmcv is not installed"
    if mmcv.__version__ != MMCV_VERSION:
        return f"mmcv {mmcv.__version__} is installed; the dense tasks need {MMCV_VERSION}"
    try:
        import mmcv._ext  # noqa: F401
        from mmcv.ops import roi_align  # noqa: F401  (loads mmcv._ext)
    except (ImportError, OSError) as err:
        return f"mmcv {mmcv.__version__} has no usable compiled ops ({err})"
    return None


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def _write_cxx_wrapper(folder: Path) -> Path:
    real = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if real is None:
        raise SystemExit("No C++ compiler found: install g++ (Debian: apt install g++).")
    wrapper = folder / "cxx20"
    # rebuild "$@" in place: each original argument is shifted off and re-appended
    body = (
        "#!/bin/sh\n# rewrite mmcv's hard-coded -std=c++17: torch's headers need C++20\n"
        'n=$#\nwhile [ "$n" -gt 0 ]; do\n  a="$1"; shift\n'
        '  if [ "$a" = "-std=c++17" ]; then a="-std=c++20"; fi\n'
        '  set -- "$@" "$a"; n=$((n-1))\ndone\n'
        f'exec {real} "$@"\n'
    )
    wrapper.write_text(body)
    wrapper.chmod(0o755)
    return wrapper


def _strip_wheel(wheel: Path, workdir: Path) -> Path:
    """Strip debug symbols from the compiled extension (32 MB -> about 1.4 MB)."""
    if shutil.which("strip") is None:
        return wheel
    unpacked = workdir / "unpacked"
    subprocess.run(
        [sys.executable, "-m", "wheel", "unpack", str(wheel), "-d", str(unpacked)], check=True
    )
    for so in unpacked.rglob("*.so"):
        subprocess.run(["strip", "--strip-debug", str(so)], check=True)
    out = workdir / "stripped"
    out.mkdir()
    (root,) = list(unpacked.iterdir())
    subprocess.run(
        [sys.executable, "-m", "wheel", "pack", str(root), "-d", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (stripped,) = list(out.glob("*.whl"))
    return stripped


def build_mmcv_wheel(cuda: bool, dest: Path, jobs: int) -> Path:
    """Build mmcv ``MMCV_VERSION`` with ops from the PyPI sdist into ``dest``; return the wheel."""
    _pip("install", "-q", "setuptools<81", "wheel", "ninja")
    with tempfile.TemporaryDirectory(prefix="mmcv-build-") as tmp:
        tmpdir = Path(tmp)
        env = dict(os.environ)
        env.update(
            MMCV_WITH_OPS="1",
            MAX_JOBS=str(jobs),
            CXX=str(_write_cxx_wrapper(tmpdir)),
            FORCE_CUDA="1" if cuda else "0",
        )
        if not cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
        print(
            f"Building mmcv {MMCV_VERSION} with {'CUDA' if cuda else 'CPU'} ops "
            f"({jobs} jobs; about 13 minutes on 2 cores, once per torch build)...",
            flush=True,
        )
        start = time.time()
        _pip(
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--no-binary",
            "mmcv",
            f"mmcv=={MMCV_VERSION}",
            "-w",
            str(tmpdir / "built"),
            env=env,
        )
        (wheel,) = list((tmpdir / "built").glob("mmcv-*.whl"))
        wheel = _strip_wheel(wheel, tmpdir)
        dest.mkdir(parents=True, exist_ok=True)
        final = dest / wheel.name
        shutil.copy2(wheel, dest / (wheel.name + ".part"))
        os.replace(dest / (wheel.name + ".part"), final)
        print(f"Built in {(time.time() - start) / 60:.1f} min -> {final}", flush=True)
        return final


def setup_dense(rebuild: bool = False, jobs: int | None = None) -> None:
    """Install the dense stack into the running Python, building mmcv once per torch build."""
    _pip("install", "-q", *DENSE_REQUIREMENTS)
    if not rebuild and mmcv_ops_status() is None:
        print(f"mmcv {MMCV_VERSION} with compiled ops is already installed.")
        return
    cuda = use_cuda()
    folder = cache_root() / "wheels" / wheel_cache_key(cuda)
    cached = sorted(folder.glob("mmcv-*.whl"))
    if cached and not rebuild:
        wheel = cached[-1]
        print(f"Using cached mmcv wheel {wheel}")
    else:
        wheel = build_mmcv_wheel(cuda, folder, jobs or max(1, os.cpu_count() or 1))
    # the wheel's own requirements (mmengine, addict, opencv...) come from PyPI
    _pip("install", "-q", "--force-reinstall", "--no-deps", str(wheel))
    _pip("install", "-q", str(wheel))
    problem = mmcv_ops_status_fresh()
    if problem:
        raise SystemExit(f"mmcv install check failed: {problem}")
    print(f"Dense stack ready: mmcv {MMCV_VERSION} ({'CUDA' if cuda else 'CPU'} ops).")


def mmcv_ops_status_fresh() -> str | None:
    """Check the installed mmcv in a new interpreter (this one may have imported an old one)."""
    code = (
        "from ibot_bench.dense_setup import mmcv_ops_status as s; import sys; "
        "p = s(); print(p or ''); sys.exit(1 if p else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return None if out.returncode == 0 else (out.stdout.strip() or out.stderr.strip()[-500:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ibot-bench setup-dense",
        description="Install mmengine/mmdet/mmseg and build mmcv with ops for this torch.",
    )
    parser.add_argument("--rebuild", action="store_true", help="ignore the cached wheel")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    args = parser.parse_args(argv)
    print(f"Python {platform.python_version()}, cache {cache_root()}")
    setup_dense(rebuild=args.rebuild, jobs=args.jobs)


if __name__ == "__main__":
    main()
