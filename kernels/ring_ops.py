"""Ring-page operators of the paged KV layout (`razor_vllm.kv_layout`, RazorConfig.kv_layout="paged").

One local KV head of one request keeps its whole RazorAttention state in a *ring region* of a
vLLM-managed page (`razor_vllm.kv_layout.RingLayout`): S sink slots, a W-slot window ring, fp32
Ksum/Vsum and an int32 frontier F (the compensation covers positions ``[S, F)``). A region is a
``[ring.slots, 2*D]`` tensor of the KV dtype; a token's K sits in the first D columns, V in the last D.

A forward step appends C tokens at positions ``[start, start + C)`` (``start`` tokens were cached
before). Per (request, local head) the step is, in this order (`ring_step`):

1. ``start == 0``: `ring_reset` (vLLM does not zero ring pages; a new or preempted request starts over);
2. `ring_attend`: query position p attends the sinks, the compensation token (when n = F_old - S > 0)
   and the exact keys ``[F_old, p]``, ``F_old = max(S, start - W + 1)``: positions < start are read
   from the ring, positions >= start from this step's K/V (the chunk is never in the ring first);
3. `ring_fold`: fold ``[F_old, F_new)`` into the fp32 sums, ``F_new = max(F_old, start + C - W + 1)``
   (ring for positions < start, K/V for the rest) and store F_new;
4. `ring_write`: chunk positions < S go to the sink slots, positions >= max(S, F_new) (at most W - 1)
   to ``ring.window_slot(p)``; the slot of such a p held p - jW < F_new, already folded.

The semantics are those of `razor_vllm.reference.razor_attention_dense` (the tests compare).
All math in fp32; outputs are cast to the query dtype.
"""

from __future__ import annotations

import math

import torch

from razor_vllm.kv_layout import RingLayout


def ring_frontier(ring: RingLayout, start: int) -> int:
    """F_old of a step starting at `start`: first exact non-sink position a local head sees."""
    return max(ring.sinks, start - ring.window + 1)


def ring_reset(region: torch.Tensor, ring: RingLayout) -> None:
    """Start a request over: sums = 0, F = S. region: `[ring.slots, 2*D]`, in place.
    (K/V slots need no clearing: only positions written since the reset are ever read.)"""
    k_sum, v_sum = ring.sums(region)
    k_sum.zero_()
    v_sum.zero_()
    ring.meta(region)[0] = ring.sinks


def _past_slots(ring: RingLayout, start: int) -> list[int]:
    """Region slots of the cached positions a local head sees in a step starting at `start`:
    sinks ``[0, min(S, start))`` then window positions ``[F_old, start)`` in position order."""
    f = ring_frontier(ring, start)
    return list(range(min(ring.sinks, start))) + [ring.window_slot(p) for p in range(f, start)]


def ring_attend(region: torch.Tensor, ring: RingLayout, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, start: int, *, scale: float, compensation: str) -> torch.Tensor:
    """RazorAttention of one local KV head of one request for one step (reads the region only).

    region: `[ring.slots, 2*D]` (state *before* this step); query: `[C, G, D]` (the G query heads of
    this KV head); key/value: `[C, D]` this step's keys/values (post-RoPE) at positions
    ``[start, start + C)``. Returns `[C, G, D]` in query's dtype.
    """
    c, g, d = query.shape
    slots = _past_slots(ring, start)
    idx = torch.tensor(slots, dtype=torch.long)
    past = region[idx].float()  # [n_past, 2D]
    keys = torch.cat([past[:, :d], key.float()], dim=0)  # [n_past + C, D]
    values = torch.cat([past[:, d:], value.float()], dim=0)
    q = query.float()
    logits = torch.einsum("cgd,nd->cgn", q, keys) * scale  # [C, G, N]
    n_past = len(slots)
    # chunk key j is visible to query row i iff j <= i (every past key is visible)
    causal = torch.ones(c, n_past + c, dtype=torch.bool)
    causal[:, n_past:] = torch.ones(c, c, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal[:, None, :], float("-inf"))
    n = ring_frontier(ring, start) - ring.sinks
    if compensation != "none" and n > 0:
        k_sum, v_sum = ring.sums(region)
        k_hat, v_hat = k_sum / n, v_sum / n  # [D] fp32
        bias = math.log(n) if compensation == "count" else 0.0
        comp = torch.einsum("cgd,d->cg", q, k_hat) * scale + bias
        p = torch.softmax(torch.cat([logits, comp[..., None]], dim=-1), dim=-1)
        out = torch.einsum("cgn,nd->cgd", p[..., :-1], values) + p[..., -1:] * v_hat
    else:
        out = torch.einsum("cgn,nd->cgd", torch.softmax(logits, dim=-1), values)
    return out.to(query.dtype)


def ring_fold(region: torch.Tensor, ring: RingLayout, key: torch.Tensor, value: torch.Tensor,
              start: int) -> int:
    """Fold positions ``[F_old, F_new)`` into the fp32 sums and store F_new; returns F_new.

    key/value: `[C, D]` this step's keys/values (positions ``[start, start + C)``). Must run after
    `ring_attend` and before `ring_write` of the same step (the write overwrites folded slots).
    """
    c, d = key.shape
    f_old = ring_frontier(ring, start)
    f_new = max(f_old, start + c - ring.window + 1)
    if f_new > f_old:
        k_sum, v_sum = ring.sums(region)
        old = list(range(f_old, min(f_new, start)))  # still in the ring
        if old:
            rows = region[torch.tensor([ring.window_slot(p) for p in old], dtype=torch.long)].float()
            k_sum += rows[:, :d].sum(dim=0)
            v_sum += rows[:, d:].sum(dim=0)
        a, b = max(f_old, start) - start, f_new - start  # chunk rows being folded
        if b > a:
            k_sum += key[a:b].float().sum(dim=0)
            v_sum += value[a:b].float().sum(dim=0)
    ring.meta(region)[0] = f_new
    return f_new


def ring_write(region: torch.Tensor, ring: RingLayout, key: torch.Tensor, value: torch.Tensor,
               start: int, f_new: int) -> None:
    """Store this step's sinks and newest positions (>= max(S, f_new)) into the region, in place.
    key/value: `[C, D]` at positions ``[start, start + C)``."""
    c = key.shape[0]
    pos = torch.arange(start, start + c)
    keep = (pos < ring.sinks) | (pos >= f_new)
    if not bool(keep.any()):
        return
    pos = pos[keep]
    slots = torch.where(pos < ring.sinks, pos, ring.sinks + (pos - ring.sinks) % ring.window)
    rows = keep.nonzero().squeeze(1)
    region[slots] = torch.cat([key[rows], value[rows]], dim=1).to(region.dtype)


def ring_step(region: torch.Tensor, ring: RingLayout, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, start: int, *, scale: float, compensation: str) -> torch.Tensor:
    """One forward step of one (request, local head): reset (start == 0), attend, fold, write.
    Shapes as `ring_attend`; returns `[C, G, D]`."""
    if start == 0:
        ring_reset(region, ring)
    out = ring_attend(region, ring, query, key, value, start, scale=scale, compensation=compensation)
    f_new = ring_fold(region, ring, key, value, start)
    ring_write(region, ring, key, value, start, f_new)
    return out
