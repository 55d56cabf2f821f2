"""One helper for routing a transformers model's attention through a Python function for the
duration of a context: the profiler's score hook and the HF razor session both use it.

    with use_attention(model, "razor", fn):
        model(...)

`fn` has transformers' attention-function signature. It is registered together with SDPA's mask
builder: without a registered mask function transformers hands a custom attention function
``attention_mask=None``, which (1) turns sliding-window layers into full causal ones and (2) makes
SDPA, for a multi-token chunk after a cache, crop the keys to the first ``q_len`` positions (its
upper-left causal default). With `sdpa_mask` a plain causal prefill still gets ``None`` (the fast
path) and every other case an explicit mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

_STACKS: dict[str, list[Callable]] = {}


def _dispatcher(name: str) -> Callable:
    def dispatch(*args, **kwargs):
        return _STACKS[name][-1](*args, **kwargs)

    return dispatch


@contextmanager
def use_attention(model, name: str, fn: Callable) -> Iterator[None]:
    """Make `model` attend through `fn` while the context is active (nestable per name)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    stack = _STACKS.setdefault(name, [])
    if not stack:
        AttentionInterface.register(name, _dispatcher(name))
        AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    stack.append(fn)
    try:
        yield
    finally:
        stack.pop()
        model.set_attn_implementation(previous)
