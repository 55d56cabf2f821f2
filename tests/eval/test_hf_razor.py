"""The transformers path (razor_vllm.eval.hf_razor) against stock transformers."""

from pathlib import Path

import pytest
import torch

from razor_vllm.paths import default_model_dir
from razor_vllm.config import RazorPolicy
from razor_vllm.eval.hf_razor import generate

SMOL = default_model_dir()
needs_smol = pytest.mark.skipif(not (SMOL / "config.json").exists(),
                                reason="run `razor-vllm fetch-model smollm2-135m-instruct` first (make test does)")


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # float32: this CPU has no AVX512-BF16, so bf16 is emulated and 2-3x slower; the identities
    # below are exact in any dtype (the same SDPA calls run on both sides)
    model = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(SMOL)


_STOCK: dict = {}


def _stock(model, ids, split):
    """Stock transformers' greedy tokens, computed once per (prompt, split) for all the tests here."""
    key = (tuple(ids), split)
    if key not in _STOCK:
        _STOCK[key] = generate(model, ids, 16, None, split=split)
    return _STOCK[key]


def _prompt(tok, n_sentences=40):
    text = " ".join(f"Line {i}: the quick brown fox number {i} jumps over the lazy dog." for i in range(n_sentences))
    return tok.apply_chat_template([{"role": "user", "content": text + "\nSummarise the lines."}],
                                   add_generation_prompt=True, tokenize=True, return_dict=False)


@needs_smol
def test_window_covering_the_sequence_generates_stock_tokens(smol):
    model, tok = smol
    ids = _prompt(tok)
    n_layers = model.config.num_hidden_layers
    policy = RazorPolicy.build([[0]] * n_layers, 3, sinks=4, window=len(ids) + 64, compensation="count")
    ours = generate(model, ids, 24, policy)
    with torch.inference_mode():
        stock = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert ours == stock[:len(ours)] and len(ours) == 24


def _streaming_with_masks(model, ids, sinks, window, steps):
    """StreamingLLM through stock transformers: full cache, and at every decode step a boolean mask
    that hides keys [sinks, p - window + 1). Independent of razor_vllm.reference."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]
        out = []
        for _ in range(steps):
            tok_id = int(logits.argmax())
            out.append(tok_id)
            p = cache.get_seq_length()  # position of the token being fed
            keep = torch.zeros(1, 1, 1, p + 1, dtype=torch.bool)
            keep[..., :sinks] = True
            keep[..., max(sinks, p - window + 1):] = True
            logits = model(input_ids=torch.tensor([[tok_id]]), past_key_values=cache, use_cache=True,
                           attention_mask=keep).logits[0, -1]
    return out


@needs_smol
def test_all_local_heads_without_compensation_is_streaming_llm(smol):
    model, tok = smol
    ids = _prompt(tok, 20)
    n_layers = model.config.num_hidden_layers
    sinks, window = 4, 32
    policy = RazorPolicy.build([[]] * n_layers, 3, sinks=sinks, window=window, compensation="none")
    ours = generate(model, ids, 12, policy)
    ref = _streaming_with_masks(model, ids, sinks, window, 12)
    assert ours == ref
    full = generate(model, ids, 12, None)
    assert ours != full, "a 32-token window should change this generation; the policy is not applied"


# -- identities in both protocols --------------------------------------------------------------------
# exact prefill: the whole prompt is one exact chunk, only decode steps see the compressed past;
# chunked: the last QUESTION_TOKENS of the prompt are a second chunk after a cache (the question of
# vLLM's chunked prefill), so a multi-token chunk attends through razor too.
QUESTION_TOKENS = 20


def _identity_policy(kind: str, n_layers: int, prompt_len: int) -> RazorPolicy:
    if kind == "all-retrieval":
        return RazorPolicy.build([[0, 1, 2]] * n_layers, 3, sinks=4, window=8, compensation="count")
    return RazorPolicy.build([[]] * n_layers, 3, sinks=4, window=prompt_len + 64, compensation="single")


@needs_smol
@pytest.mark.parametrize("protocol", ["exact-prefill", "chunked"])
@pytest.mark.parametrize("kind", ["all-retrieval", "window-covers-prompt"])
def test_identities_equal_stock_hf_token_for_token(smol, protocol, kind):
    """Razor that must not compress equals stock transformers (no razor session at all, same
    chunking), token for token. The chunked case failed before hf_attention registered SDPA's mask
    builder: the question chunk then attended to the first 20 context tokens only."""
    from razor_vllm.eval import tasks

    model, tok = smol
    sample = tasks.make_suite(["passkey"], [1024], 1, 0, tok)[0]
    ctx, question = tasks.build_prompt_ids(sample, tok)
    ids = ctx + question
    split = None if protocol == "exact-prefill" else len(ids) - QUESTION_TOKENS
    policy = _identity_policy(kind, model.config.num_hidden_layers, len(ids))
    ours = generate(model, ids, 16, policy, split=split)
    stock = _stock(model, ids, split)
    assert ours == stock, (tok.decode(ours), tok.decode(stock))
    if protocol == "chunked":
        assert tasks.is_correct(sample, tok.decode(stock)), "the reference itself should answer this 1k passkey"


@needs_smol
def test_chunked_protocol_compression_changes_the_output(smol):
    """The same chunked run with a 16-token window and no retrieval head must differ from stock:
    the identities above are not passing because razor never ran."""
    from razor_vllm.eval import tasks

    model, tok = smol
    sample = tasks.make_suite(["passkey"], [1024], 1, 0, tok)[0]
    ctx, question = tasks.build_prompt_ids(sample, tok)
    ids = ctx + question
    policy = RazorPolicy.build([[]] * model.config.num_hidden_layers, 3, sinks=4, window=16, compensation="none")
    split = len(ids) - QUESTION_TOKENS
    assert generate(model, ids, 16, policy, split=split) != _stock(model, ids, split)
