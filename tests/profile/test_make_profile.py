"""`make profile`, exactly as the README writes it: it profiles the default model into out/ and its
`--compare` step checks that the result reproduces the shipped head config (same heads, scores
within 1e-6). Slow: one profiling run (about a minute on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from razor_vllm.heads import load_head_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_make_profile_reproduces_the_shipped_config(smollm2_dir):
    venv = Path(sys.executable).parent.parent
    r = subprocess.run(["make", "-C", str(ROOT), "profile", f"VENV={venv}"], capture_output=True, text=True,
                       timeout=1200, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = ROOT / "out" / "smollm2-135m-instruct.json"
    shipped = ROOT / "razor_vllm" / "configs" / "smollm2-135m-instruct.json"
    assert load_head_config(out).compare(load_head_config(shipped)) == []
    assert json.loads(out.read_text())["retrieval_heads"] == json.loads(shipped.read_text())["retrieval_heads"]
    assert (ROOT / "out" / "smollm2-135m-instruct.png").stat().st_size > 0
