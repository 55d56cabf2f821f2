"""`benchmarks/kernels.py --smoke`: every GPU benchmark case once at tiny shapes under the Triton
interpreter, each checked by the script against its CPU reference (`torch_ops` for the attention
cases, `ring_ops.ring_decode` for `razor-ring`, output and ring state); a mismatch exits non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_bench_kernels_smoke(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed")
    out = tmp_path / "bench_kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    kinds = {r["kind"] for r in result["rows"]}
    assert kinds == {"full", "razor", "razor+sums", "razor-ring", "sdpa"}
    cases = {(r["ctx"], r["batch"]) for r in result["rows"]}
    assert cases == {(40, 1), (40, 3), (70, 1), (70, 3)}
    ring = [r for r in result["rows"] if r["kind"] == "razor-ring"]
    # the physical-minimum byte count: retrieval heads read the whole context, local heads their ring
    full = next(r for r in result["rows"] if r["kind"] == "full" and r["ctx"] == 70 and r["batch"] == 3)
    ring70 = next(r for r in ring if r["ctx"] == 70 and r["batch"] == 3)
    assert ring70["kv_bytes"] < full["kv_bytes"]
    assert "razor-ring" in proc.stdout and "'ring'" in proc.stdout
