"""The eval's batched decoder (razor_vllm.eval.batched) against the one-method-at-a-time HF path
(hf_razor.continue_greedy over RazorSession, itself tested against the dense oracle and stock HF):
the same greedy tokens for every method in both protocols, on the real model, including windows so
small that the question's own tokens are evicted (the tail branch of the compensation sums)."""

import pytest
import torch

from razor_vllm.config import RazorPolicy
from razor_vllm.eval.run import RazorSetting, build_methods, settings_grid
from razor_vllm.heads import load_head_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(smollm2_dir):
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks
    from razor_vllm.profile.profiler import load_model

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    sample = tasks.make_sample("niah_single", 1024, 0.3, 1, tok)
    ctx, question = tasks.build_prompt_ids(sample, tok)
    model = load_model(smollm2_dir, "float32")
    cfg = load_head_config("smollm2-135m-instruct", model.config)
    # sinks 0 and a window of 8 reach the edge cases; every weighting; controls at the first setting
    grid = settings_grid([64, 0], [256, 8], ["single", "count", "none"], [0.14], 0.01, one_at_a_time=True)
    methods = build_methods(cfg, ["full", "razor", "streaming", "random"], grid, len(ctx) + len(question),
                            controls="first")
    # every head local with a 4-token window: the question and the answer leave the window mid-way
    methods.append(type(methods[0])("tiny", RazorSetting(), RazorPolicy.build(
        [[]] * 30, 3, sinks=2, window=4, compensation="count")))
    return model, tok, ctx, question, methods


def _sequential(model, cache, feed, methods, first, eos):
    from razor_vllm.eval.hf_razor import continue_greedy

    return [continue_greedy(model, cache, feed, 12, m.policy, eos, first_logits=first) for m in methods]


def test_batched_equals_one_by_one_in_both_protocols(setup):
    from razor_vllm.eval import batched
    from razor_vllm.eval.hf_razor import prefill

    model, tok, ctx, question, methods = setup
    assert batched.supports(model)
    eos = [tok.eos_token_id]
    cache, _ = prefill(model, ctx)
    keys = [l.keys for l in cache.layers]
    values = [l.values for l in cache.layers]
    policies = [m.policy for m in methods]
    qc = batched.decode_rows(model, keys, values, policies, question, 12, eos)
    assert qc == _sequential(model, cache, question, methods, None, eos)
    with torch.inference_mode():
        first = model(input_ids=torch.tensor([question]), past_key_values=cache, use_cache=True,
                      logits_to_keep=1).logits[0, -1]
    keys = [l.keys for l in cache.layers]
    values = [l.values for l in cache.layers]
    ep = batched.decode_rows(model, keys, values, policies, [], 12, eos, first_logits=first)
    assert ep == _sequential(model, cache, [], methods, first, eos)
    # the methods do not all agree, so the comparison could see a wrong policy
    assert len({tuple(t) for t in qc}) > 2 and len({tuple(t) for t in ep}) > 2


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(setup):
    """Rows stop at different steps (the stop rule depends on each row's own tokens): the rows left
    in the batch still match the one-by-one path token for token."""
    from razor_vllm.eval import batched
    from razor_vllm.eval.hf_razor import continue_greedy, prefill

    model, tok, ctx, question, methods = setup
    cache, _ = prefill(model, ctx)

    def stop(toks):  # depends on the row's own tokens, so rows whose outputs differ stop at different steps
        return len(toks) >= 3 and sum(toks) % 3 == 0

    got = batched.decode_rows(model, [l.keys for l in cache.layers], [l.values for l in cache.layers],
                              [m.policy for m in methods], question, 12, [tok.eos_token_id], stop=stop)
    want = [continue_greedy(model, cache, question, 12, m.policy, [tok.eos_token_id], stop=stop) for m in methods]
    assert got == want
    assert len({len(t) for t in got}) > 1, "every row stopped at the same step: nothing left the batch"


def test_logits_match_the_oracle_path_closely(setup):
    """Every step's logits per row, teacher-forced with the same tokens: within fp32 noise of the
    RazorSession path (2e-3 of their spread), also once the tiny window evicts the question's and
    the answer's own tokens."""
    from razor_vllm.eval import batched
    from razor_vllm.eval.hf_razor import RazorSession, prefill

    model, tok, ctx, question, methods = setup
    forced = tok("The special magic number is 1234567, I think.")["input_ids"][:6]
    cache, _ = prefill(model, ctx)
    dec = batched.BatchedDecoder(model, [l.keys for l in cache.layers], [l.values for l in cache.layers],
                                 [m.policy for m in methods])
    got = [dec.step(torch.tensor([question] * len(methods)))]
    got += [dec.step(torch.tensor([[t]] * len(methods))) for t in forced]
    for r, m in enumerate(methods):
        with torch.inference_mode(), (RazorSession(model, m.policy) if m.policy else torch.no_grad()):
            refs = [model(input_ids=torch.tensor([question]), past_key_values=cache, use_cache=True,
                          logits_to_keep=1).logits[0, -1]]
            refs += [model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1]
                     for t in forced]
        cache.crop(len(ctx) - cache.get_seq_length())
        for step, ref in enumerate(refs):
            torch.testing.assert_close(got[step][r], ref, atol=2e-3 * float(ref.std()), rtol=0,
                                       msg=lambda e: f"{m.label}, step {step}: {e}")


def test_unsupported_models_are_refused(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from razor_vllm.eval import batched

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = Gemma3ForCausalLM(cfg)
    assert not batched.supports(model)
    with pytest.raises(ValueError, match="Llama-structured"):
        batched.BatchedDecoder(model, [], [], [None])
