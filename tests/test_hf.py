"""The transformers path (razor_vllm.hf) against stock transformers."""

from pathlib import Path

import pytest
import torch

from razor_vllm.config import RazorPolicy
from razor_vllm.hf import generate

SMOL = Path.home() / ".cache" / "razor-vllm" / "models" / "smollm2-135m-instruct"
needs_smol = pytest.mark.skipif(not (SMOL / "config.json").exists(),
                                reason="run `razor-vllm fetch-model smollm2-135m-instruct` first (make test does)")


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(SMOL)


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
