"""razor_vllm/kernels/ring_cpp.py: how the fused CPU op is built, cached and turned off. (Its results are tested
against the PyTorch ring ops in test_ring_decode.py.)"""

from __future__ import annotations

import logging

import pytest

from razor_vllm.kernels import ring_cpp as cpu_ops


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty build cache and no memory of an earlier load in this process."""
    monkeypatch.setenv("RAZOR_VLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_ops, "_state", {})
    return tmp_path


def test_missing_compiler_is_an_error_naming_the_compiler_and_the_way_out(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-razor")
    monkeypatch.setenv(cpu_ops.ENV, "1")
    with pytest.raises(RuntimeError, match=r"'no-such-compiler-razor' not found.*RAZOR_VLLM_CPU_FUSED=0"):
        cpu_ops.load()


def test_auto_mode_warns_and_reports_unavailable_when_the_build_fails(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that exists and fails
    monkeypatch.setenv(cpu_ops.ENV, "auto")
    with caplog.at_level(logging.WARNING, logger=cpu_ops.__name__):
        assert cpu_ops.load() is False
    assert "build failed" in caplog.text and "PyTorch ring ops" in caplog.text
    assert not cpu_ops.library_path().exists()  # nothing half-built is left to be loaded later


def test_off_builds_nothing(fresh, monkeypatch):
    monkeypatch.setenv(cpu_ops.ENV, "0")
    assert cpu_ops.load() is False
    assert not any(fresh.rglob("*.so"))


def test_build_is_cached_per_source_torch_and_cpu(fresh):
    lib = cpu_ops.build()
    assert lib.exists() and lib.is_relative_to(fresh)
    mtime = lib.stat().st_mtime_ns
    assert cpu_ops.build() == lib and lib.stat().st_mtime_ns == mtime  # second call: no rebuild
    assert [p.name for p in lib.parent.iterdir()] == ["razor_cpu_ops.so"]  # no temporary left behind
