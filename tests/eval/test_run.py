"""The evaluation harness on the real model: razor keeps a needle that StreamingLLM at the same KV
budget loses (the method's claim, on one 4k passkey prompt from the shipped sweep)."""

from pathlib import Path

import pytest
import torch

from razor_vllm.paths import default_model_dir
from razor_vllm.eval.run import RazorSetting, aggregate, build_policies
from razor_vllm.heads import load_head_config

SMOL = default_model_dir()


def test_build_policies_budget_matches():
    """Streaming gets the same KV as razor; random protects the same number of heads."""
    cfg = load_head_config("smollm2-135m-instruct")
    pols = build_policies(cfg, ["full", "razor", "random", "streaming"], [RazorSetting(256, "single", 0.14, 0.01)],
                          sinks=4, seq_len=4096)
    by = {name: p for name, _, p in pols}
    assert by["full"] is None
    assert abs(by["streaming"].kv_fraction(4096) - by["razor"].kv_fraction(4096)) < 1e-3
    assert sum(map(len, by["random"].retrieval_heads)) == sum(map(len, by["razor"].retrieval_heads)) == 14
    assert by["random"].retrieval_heads != by["razor"].retrieval_heads
    assert by["streaming"].retrieval_heads == tuple(() for _ in range(30))


def test_aggregate_records_have_the_documented_fields():
    rows = [{"task": "passkey", "length": 1024, "method": "razor", "correct": c, "kv_fraction": 0.2,
             "retrieval_fraction": 0.15, "window": 64, "seconds": 1.0,
             "setting": {"window": 64, "compensation": "single", "induction_ratio": 0.14, "echo_ratio": 0.01}}
            for c in (True, False, True, True)]
    (rec,) = aggregate(rows, 4, "exact-prefill", "float32")
    assert (rec.task, rec.length, rec.method, rec.accuracy, rec.kv_fraction, rec.n) == ("passkey", 1024, "razor", 0.75, 0.2, 4)
    assert "exact prefill" in rec.protocol


@pytest.mark.slow
@pytest.mark.skipif(not (SMOL / "config.json").exists(), reason="run `razor-vllm fetch-model smollm2-135m-instruct`")
def test_razor_finds_a_passkey_far_outside_its_window_and_streaming_does_not():
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks
    from razor_vllm.eval.hf_razor import continue_greedy, prefill
    from razor_vllm.profile.profiler import load_model

    tok = AutoTokenizer.from_pretrained(SMOL)
    sample = tasks.make_suite(["passkey"], [4096], 2, 0, tok)[0]  # depth 0.25: ~3000 tokens before the window
    assert sample.depth == 0.25
    ctx, question = tasks.build_prompt_ids(sample, tok)
    ids = ctx + question
    model = load_model(SMOL, "float32")
    cfg = load_head_config("smollm2-135m-instruct", model.config)
    pols = {name: p for name, _, p in build_policies(cfg, ["full", "razor", "streaming"],
                                                     [RazorSetting(256, "single", 0.14, 0.01)], 4, len(ids))}
    cache, logits = prefill(model, ids)
    out = {}
    for name, policy in pols.items():
        gen = continue_greedy(model, cache, [], sample.max_new_tokens, policy, [tok.eos_token_id], first_logits=logits)
        out[name] = tok.decode(gen, skip_special_tokens=True)
    print(out)
    assert tasks.is_correct(sample, out["full"])
    assert tasks.is_correct(sample, out["razor"]), out["razor"]
    assert not tasks.is_correct(sample, out["streaming"]), out["streaming"]
    assert pols["razor"].kv_fraction(len(ids)) < 0.25
    torch.testing.assert_close(pols["streaming"].kv_fraction(len(ids)), pols["razor"].kv_fraction(len(ids)),
                               atol=1e-3, rtol=0)
