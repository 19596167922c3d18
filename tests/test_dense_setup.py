"""The mmcv build helper: cache key and the C++20 compiler wrapper."""

from __future__ import annotations

import subprocess
import sys

import torch

from ibot_bench import dense_setup


def test_wheel_cache_key_names_everything_the_binary_depends_on(monkeypatch):
    key = dense_setup.wheel_cache_key(cuda=False)
    assert dense_setup.MMCV_VERSION in key
    assert torch.__version__.replace("+", "_") in key
    assert f"cp{sys.version_info.major}{sys.version_info.minor}" in key
    assert key.endswith(dense_setup.sysconfig.get_platform().replace("-", "_").replace(".", "_"))
    assert "_cpu_" in key
    if torch.version.cuda:
        assert f"_cu{torch.version.cuda}_" in dense_setup.wheel_cache_key(cuda=True)


def test_cache_root_follows_ibot_bench_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("IBOT_BENCH_CACHE", str(tmp_path))
    assert dense_setup.cache_root() == tmp_path


def test_compiler_wrapper_turns_cxx17_into_cxx20(tmp_path):
    wrapper = dense_setup._write_cxx_wrapper(tmp_path)
    src = tmp_path / "probe.cpp"
    src.write_text("int main() { return __cplusplus >= 202002L ? 0 : 1; }\n")
    exe = tmp_path / "probe"
    subprocess.run([str(wrapper), "-std=c++17", "-o", str(exe), str(src)], check=True)
    assert subprocess.run([str(exe)]).returncode == 0


def test_installed_mmcv_has_compiled_ops():
    assert dense_setup.mmcv_ops_status() is None
