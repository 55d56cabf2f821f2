"""RazorAttention for Hugging Face transformers decoders (the quick CPU path for accuracy studies,
and the reference output for the vLLM backend).

Inside `RazorSession(model, policy)` every attention call of the model goes through
`razor_vllm.reference.razor_attention_dense`, with the compensation kept as running fp32 sums
(`RazorState`). The HF cache itself stays full (this path measures answers, not memory).

When a step has nothing evicted (a first prefill chunk, or a sequence still inside sinks + window)
or a layer has no local heads, the call goes to transformers' own SDPA attention unchanged, so razor
with a window that covers the sequence is *exactly* stock HF, not merely close.

Batches must be unpadded (equal-length sequences): positions are taken from the cache length.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import torch

from razor_vllm.config import RazorPolicy
from razor_vllm.eval.hf_attention import use_attention
from razor_vllm.reference import RazorState, frontier, razor_attention_dense

_NAME = "razor"


def _razor_attention(session: "RazorSession", module, query, key, value, attention_mask, scaling=None,
                     dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    policy = session.policy
    layer = module.layer_idx
    start = key.shape[2] - query.shape[2]
    f = frontier(start, policy.sinks, policy.window)
    local = policy.local_mask(layer)
    if f == policy.sinks or not any(local):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if getattr(module, "sliding_window", None):
        raise NotImplementedError(f"layer {layer} has a native sliding window; razor supports full-attention layers")
    state = session.states[layer]
    state.advance(key, value, f)
    out = razor_attention_dense(
        query, key, value, local=torch.tensor(local), sinks=policy.sinks, window=policy.window,
        compensation=policy.compensation, scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        k_sum=state.k_sum, v_sum=state.v_sum)
    return out.transpose(1, 2).contiguous(), None


class RazorSession:
    """Context manager: the model attends with RazorAttention `policy` while active."""

    def __init__(self, model, policy: RazorPolicy):
        n_layers = model.config.get_text_config().num_hidden_layers
        if policy.num_layers != n_layers:
            raise ValueError(f"policy has {policy.num_layers} layers, model has {n_layers}")
        self.model, self.policy = model, policy
        self.states = {layer: RazorState(policy.sinks) for layer in range(n_layers)}
        self._context = None

    def __enter__(self) -> "RazorSession":
        # with SDPA's mask builder (hf_attention): a multi-token chunk after a cache gets its causal
        # mask instead of None, which SDPA would read as "attend to the first q_len keys"
        self._context = use_attention(self.model, _NAME, functools.partial(_razor_attention, self))
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)


@torch.inference_mode()
def prefill(model, ids: Sequence[int]):
    """Exact prefill of `ids` (stock attention); returns (cache, logits of the last position)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([list(ids)]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1]


@torch.inference_mode()
def continue_greedy(model, cache, ids: Sequence[int], max_new_tokens: int, policy: RazorPolicy | None,
                    eos_token_ids: Sequence[int] = (), first_logits: torch.Tensor | None = None,
                    stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Feed `ids` as one chunk after what `cache` holds, then decode greedily.

    With a policy, the chunk and every decode step attend through RazorAttention (the cached past is
    compressed); without, attention is stock. With empty `ids`, decoding starts from `first_logits`
    (the logits of an exact prefill). `stop(tokens)` ends decoding early (e.g. once an answer is
    complete). The cache is cropped back afterwards, so several methods can share one expensive
    exact prefill of a long context.
    """
    base_len = cache.get_seq_length()
    session = RazorSession(model, policy) if policy is not None else None
    generated: list[int] = []
    try:
        if session:
            session.__enter__()
        if len(ids):
            logits = model(input_ids=torch.tensor([list(ids)]), past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits[0, -1]
        elif first_logits is not None:
            logits = first_logits
        else:
            raise ValueError("continue_greedy needs ids or first_logits")
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(logits))
            generated.append(tok)
            if tok in eos_token_ids or len(generated) == max_new_tokens or (stop and stop(generated)):
                break
            logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
    finally:
        if session:
            session.__exit__(None, None, None)
        added = cache.get_seq_length() - base_len
        if added:
            cache.crop(-added)
    return generated


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, policy: RazorPolicy | None,
             eos_token_ids: Sequence[int] = (), split: int | None = None,
             chunk_size: int | None = None) -> list[int]:
    """Greedy generation of one sequence.

    By default the whole prompt is one exact prefill chunk and only decoding sees a compressed past.
    With `split`, prompt_ids[:split] is the exact first chunk and the rest is a second chunk that
    already attends to a compressed past (chunked prefill / question-after-context protocol).
    With `chunk_size`, the prompt is prefilled in chunks of that many tokens, as vLLM's chunked
    prefill does for one request with `--max-num-batched-tokens chunk_size`: the first chunk is
    exact, every later one attends to the compressed past.
    """
    if chunk_size is not None and chunk_size < len(prompt_ids):
        cache, logits = prefill(model, prompt_ids[:chunk_size])
        session = RazorSession(model, policy) if policy is not None else None
        with session if session else contextlib.nullcontext(), torch.inference_mode():
            for c0 in range(chunk_size, len(prompt_ids), chunk_size):
                chunk = list(prompt_ids[c0:c0 + chunk_size])
                logits = model(input_ids=torch.tensor([chunk]), past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[0, -1]
        # continue_greedy's own session folds the compensation state again from the full HF cache
        return continue_greedy(model, cache, [], max_new_tokens, policy, eos_token_ids, first_logits=logits)
    if split is None or split >= len(prompt_ids):
        cache, logits = prefill(model, prompt_ids)
        return continue_greedy(model, cache, [], max_new_tokens, policy, eos_token_ids, first_logits=logits)
    cache, _ = prefill(model, prompt_ids[:split])
    return continue_greedy(model, cache, prompt_ids[split:], max_new_tokens, policy, eos_token_ids)
