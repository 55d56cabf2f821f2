"""Ring-page operators of the paged KV layout (`razor_vllm.vllm.layout`, RazorConfig.kv_layout="paged").

One local KV head of one request keeps its whole RazorAttention state in a *ring region* of a
vLLM-managed page (`razor_vllm.kernels.ring_layout.RingLayout`): S sink slots, a W-slot window ring, fp32
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

import functools
import math

import torch

from razor_vllm.config import COMPENSATION_MODES
from razor_vllm.reference import frontier

from .ring_layout import RingLayout


def ring_frontier(ring: RingLayout, start: int) -> int:
    """F_old of a step starting at `start`: first exact non-sink position a local head sees."""
    return frontier(start, ring.sinks, ring.window)


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

    Prefill chunks (C large) use the fused CPU flash-attention kernel for the causal chunk part
    (`_chunk_attention`) and merge the past part (sinks + window + compensation, every key visible
    to every query: one small matmul) by log-sum-exp; tiny chunks use one masked softmax.
    """
    c, g, d = query.shape
    slots = _past_slots(ring, start)
    n_past = len(slots)
    n = ring_frontier(ring, start) - ring.sinks
    comp = compensation != "none" and n > 0
    q = query.float()
    if c >= _FLASH_MIN_CHUNK and _flash_with_lse() is not None:
        qh = q.permute(1, 0, 2)[None]  # [1, G, C, D]
        out, lse = _chunk_attention(qh, key.float(), value.float(), scale)  # [1, G, C, D], [1, G, C]
        if n_past or comp:
            past = region[torch.tensor(slots, dtype=torch.long)].float()  # [n_past, 2D]
            pk, pv = past[:, :d], past[:, d:]
            logits = torch.matmul(qh, pk.T).mul_(scale)  # [1, G, C, n_past]
            if comp:
                k_hat, v_hat, bias = _compensation_token(region, ring, n, compensation)
                comp_logit = torch.matmul(qh, k_hat[:, None]).mul_(scale).add_(bias)  # [1, G, C, 1]
                logits = torch.cat([logits, comp_logit], dim=-1)
                pv = torch.cat([pv, v_hat[None]], dim=0)
            lse_p = torch.logsumexp(logits, dim=-1)
            out_p = torch.matmul(torch.softmax(logits, dim=-1), pv)
            lse_all = torch.logaddexp(lse, lse_p)
            out = out * torch.exp(lse - lse_all)[..., None] + out_p * torch.exp(lse_p - lse_all)[..., None]
        return out[0].permute(1, 0, 2).to(query.dtype)
    idx = torch.tensor(slots, dtype=torch.long)
    past = region[idx].float()  # [n_past, 2D]
    keys = torch.cat([past[:, :d], key.float()], dim=0)  # [n_past + C, D]
    values = torch.cat([past[:, d:], value.float()], dim=0)
    logits = torch.einsum("cgd,nd->cgn", q, keys) * scale  # [C, G, N]
    # chunk key j is visible to query row i iff j <= i (every past key is visible)
    causal = torch.ones(c, n_past + c, dtype=torch.bool)
    causal[:, n_past:] = torch.ones(c, c, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal[:, None, :], float("-inf"))
    if comp:
        k_hat, v_hat, bias = _compensation_token(region, ring, n, compensation)
        comp_logit = torch.einsum("cgd,d->cg", q, k_hat) * scale + bias
        p = torch.softmax(torch.cat([logits, comp_logit[..., None]], dim=-1), dim=-1)
        out = torch.einsum("cgn,nd->cgd", p[..., :-1], values) + p[..., -1:] * v_hat
    else:
        out = torch.einsum("cgn,nd->cgd", torch.softmax(logits, dim=-1), values)
    return out.to(query.dtype)


def _compensation_token(region: torch.Tensor, ring: RingLayout, n: int, compensation: str):
    """(K_hat, V_hat `[D]` fp32, logit bias) of the compensation token over the n > 0 evicted
    positions: the means of the folded keys/values; bias ln n for "count" (the token weighs as the n
    tokens it stands for), 0 for "single"."""
    k_sum, v_sum = ring.sums(region)
    return k_sum / n, v_sum / n, (math.log(n) if compensation == "count" else 0.0)


# Chunks from this many tokens on go through the fused kernel (below it the masked softmax's
# [C, G, n_past + C] logits are small and the kernel's fixed costs dominate).
_FLASH_MIN_CHUNK = 16


@functools.lru_cache(maxsize=1)
def _flash_with_lse():
    """PyTorch's CPU flash-attention op that also returns the log-sum-exp (needed to merge the
    chunk part with the past part), or None where this build lacks it."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    try:
        x = torch.zeros(1, 1, 2, 8)
        out, lse = op(x, x, x, 0.0, True, scale=1.0)[:2]
        if out.shape != x.shape or lse.shape != (1, 1, 2):
            return None
    except Exception:  # noqa: BLE001 - any failure means: use the fallback
        return None
    return op


def _chunk_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
    """Causal attention of a chunk over itself: q `[1, G, C, D]` fp32, key/value `[C, D]` fp32
    (one KV head shared by the G query heads). Returns (out `[1, G, C, D]`, lse `[1, G, C]`)."""
    _, g, c, d = q.shape
    k = key[None, None].expand(1, g, c, d)
    v = value[None, None].expand(1, g, c, d)
    out, lse = _flash_with_lse()(q, k, v, 0.0, True, scale=scale)[:2]
    return out, lse


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


# --------------------------------------------------------------------------------------------------
# Batched decode: one new token per request, every (local head, request) of a layer in one pass
# --------------------------------------------------------------------------------------------------
# `ring_step` per (request, head) costs ~20 small torch ops; a decode step of a 30-layer model with
# 76 local heads and B requests would run 76 * B of them (the Python overhead then dominates the
# step). A decode step is much simpler than a general chunk: with C = 1 the visible window positions,
# the fold (at most one position) and the written slot depend only on `start`, i.e. are the same for
# every head and layer of the step. `ring_decode_plan` computes them once per step;
# `ring_decode` then treats all local heads of a layer and all decoding requests as one batch
# (gather the regions, two bmm's over sinks + window + this token + the compensation token, fold,
# scatter 2 + 2*sum_slots rows back per region).


class RingDecodePlan:
    """Per-step, per-request quantities of a decode step (C = 1, start >= 1), shared by every local
    head of every layer.

    The work rows of a region (`ring_decode`): ``[0, S+W)`` its sink and window slots,
    ``S+W`` this step's token (K|V), ``S+W+1`` the compensation token (K_hat|V_hat).
    """

    def __init__(self, ring: RingLayout, starts: torch.Tensor, compensation: str) -> None:
        if compensation not in COMPENSATION_MODES:
            raise ValueError(f"unknown compensation {compensation!r}")
        s, w = ring.sinks, ring.window
        starts = starts.to(torch.long)
        if starts.numel() and int(starts.min()) < 1:
            raise ValueError("ring_decode needs start >= 1 (a first token is a prefill: ring_step)")
        self.ring, self.compensation = ring, compensation
        # the layout's ints, read once per step (RingLayout's offsets are properties; ring_decode
        # runs once per layer, where every attribute lookup is paid 30x per step)
        self.geometry = (s, w, ring.head_size, ring.slots, ring.sum_slots, ring.ksum_offset, ring.meta_offset)
        self.state_offsets = (ring.ksum_offset, ring.vsum_offset, ring.meta_offset)  # the fused op's
        self.starts = starts
        self.num_reqs = b = starts.numel()
        st = starts[:, None]
        j = torch.arange(s + w)
        m = st - s  # non-sink positions cached before this step
        k = j - s
        sink_vis = (j < s) & (j < st)
        # Window slot k holds the newest position p < start with (p - S) % W == k; it is visible iff
        # it exists (k < m) and p >= F_old = start - W + 1, false only for the slot this step
        # overwrites (k == m % W) once the ring has wrapped (m >= W).
        win_vis = (j >= s) & (k < m) & ((m < w) | (k != torch.remainder(m, w)))
        f_old = torch.clamp(starts - w + 1, min=s)  # reference.frontier, batched over requests
        n = f_old - s
        f_new = torch.maximum(f_old, starts - w + 2)
        fold = f_new > f_old  # at most one position (f_old) leaves the window per decode step
        self.fold = fold
        self.req_index = torch.arange(b)
        # the folded position f_old is in the ring (f_old < start), or is this token (W = 1)
        self.fold_row = torch.where(f_old < starts, s + torch.remainder(f_old - s, w),
                                    torch.full_like(starts, s + w))
        write = (starts < s) | (starts >= f_new)
        self.all_write = bool(write.all()) if b else True
        self.write = write
        token_slot = torch.where(starts < s, starts, s + torch.remainder(starts - s, w))
        self.token_slot = token_slot  # int64 [B]: the slot this step's token goes to (if written)
        self.f_new = f_new.to(torch.int32)
        use_comp = compensation != "none"
        mask = torch.zeros(b, s + w + 2, dtype=torch.float32)
        mask[:, :s + w].masked_fill_(~(sink_vis | win_vis), float("-inf"))
        if use_comp:
            bias = torch.log(n.clamp(min=1).double()).float() if compensation == "count" else torch.zeros(b)
            mask[:, s + w + 1] = torch.where(n > 0, bias, torch.full_like(bias, float("-inf")))
        else:
            mask[:, s + w + 1] = float("-inf")
        self.mask = mask
        self.n = n.clamp(min=1).to(torch.float32)  # divisor of the sums (any value when n = 0: masked)
        ss = ring.sum_slots
        # region rows written back: [this token's slot, Ksum rows, Vsum rows, meta]; a request that
        # writes no token (W = 1 folds it at once) re-writes its first Ksum row there instead (the
        # same bytes twice: index_put_ stays deterministic)
        first = torch.where(write, token_slot, torch.full_like(token_slot, ring.ksum_offset))
        state = torch.arange(ring.ksum_offset, ring.meta_offset + 1).expand(b, 2 * ss + 1)
        self.rows = torch.cat([first[:, None], state], dim=1)
        self._rows_at: dict[int, torch.Tensor] = {}
        self._mask_for: dict[tuple[int, int], torch.Tensor] = {}
        self._starts_on: dict[torch.device, torch.Tensor] = {}

    def mask_for(self, nx: int, g: int) -> torch.Tensor:
        """`mask` expanded to `[X*B, G, S+W+2]` (contiguous, cached per (X, G)): the additive input
        of the logits' baddbmm."""
        m = self._mask_for.get((nx, g))
        if m is None:
            m = self._mask_for[(nx, g)] = (self.mask[None, :, None, :]
                                           .expand(nx, self.num_reqs, g, -1).reshape(nx * self.num_reqs, g, -1))
        return m

    def starts_on(self, device: torch.device) -> torch.Tensor:
        """`starts` on `device` (cached: the Triton kernel derives every other quantity from it, and
        a step's 30 layers share one copy)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.starts
        t = self._starts_on.get(device)
        if t is None:
            t = self._starts_on[device] = self.starts.to(device)
        return t

    def rows_at(self, offset: int) -> torch.Tensor:
        """`rows` shifted to a region at page slot `offset` (cached per offset)."""
        r = self._rows_at.get(offset)
        if r is None:
            r = self._rows_at[offset] = self.rows + offset
        return r


def ring_decode_plan(ring: RingLayout, starts: torch.Tensor, compensation: str) -> RingDecodePlan:
    """The `RingDecodePlan` of a decode step: `starts` int `[B]` = cached tokens before this step
    (= seq_len - 1) of each decoding request, all >= 1."""
    return RingDecodePlan(ring, starts, compensation)


def ring_decode(pages, offsets, blocks, plan: RingDecodePlan, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, *, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of X local heads for the B requests of `plan`, in place on the ring regions.

    Same result as `ring_step(region, ring, query[b, x][None], key[b, x][None], value[b, x][None],
    start_b)` for every (b, x) (up to fp32 summation order: keys are visited in slot order).

    pages: X page caches `[num_blocks, P, 2*D]` (rows contiguous, any block stride): the page layer
    of local head x; offsets: X region offsets (slots) inside a page; blocks: X int64 `[B]` ring
    block of each request in that page layer's block table (never the null block 0);
    query: `[B, X, G, D]`, key/value: `[B, X, D]` (this step's token, any strides);
    out: optional `[B, X, G, D]` destination (any strides). Returns `[B, X, G, D]` in query's dtype.
    """
    s, w, d, slots, ss, ksum_offset, meta_offset = plan.geometry
    nx, b = len(pages), plan.num_reqs
    g = query.shape[2]
    if out is None:
        out = torch.empty(b, nx, g, d, dtype=query.dtype)
    if b == 0 or nx == 0:
        return out
    nkv = s + w
    dtype = pages[0].dtype
    regions = torch.empty(nx, b, slots, 2 * d, dtype=dtype)
    for x in range(nx):
        torch.index_select(pages[x][:, offsets[x]:offsets[x] + slots], 0, blocks[x], out=regions[x])
    regions = regions.view(nx * b, slots, 2 * d)
    # the rows written back, starting from the current state rows (their unused bytes are kept)
    upd = torch.empty(nx * b, 2 * ss + 2, 2 * d, dtype=dtype)
    upd[:, 1:] = regions[:, ksum_offset:meta_offset + 1]
    upd_sums = upd[:, 1:1 + 2 * ss].reshape(nx * b, 2, -1).view(torch.float32)[..., :d]  # view into upd
    sums = upd_sums.clone()  # [XB, 2, D] fp32: Ksum, Vsum before this step
    # fp32 work rows [XB, S+W+2, 2D]; for an fp32 cache rows S+W and S+W+1 (the sum slots) of the
    # gathered copy are reused in place: this step's token, then the compensation token
    work = regions[:, :nkv + 2] if dtype == torch.float32 else regions[:, :nkv + 2].float()
    work4 = work.view(nx, b, nkv + 2, 2 * d)
    work4[:, :, nkv, :d] = key.transpose(0, 1)
    work4[:, :, nkv, d:] = value.transpose(0, 1)
    torch.div(sums.view(nx, b, 2, d), plan.n[None, :, None, None], out=work4[:, :, nkv + 1].view(nx, b, 2, d))
    q = query.transpose(0, 1).reshape(nx * b, g, d).float()
    # logits = scale * q.K + mask (visibility, and the compensation bias) in one call
    logits = torch.baddbmm(plan.mask_for(nx, g), q, work[..., :d].transpose(1, 2), alpha=scale)
    probs = torch.softmax(logits, dim=-1)
    o = torch.bmm(probs, work[..., d:])  # [XB, G, D] fp32
    out.copy_(o.view(nx, b, g, d).transpose(0, 1))
    # fold the position leaving the window (its row of `work`: ring slot or this token); per-request
    # quantities broadcast over the X heads (views [X, B, ...]), no per-head copies
    folded = work.view(nx, b, nkv + 2, 2 * d)[:, plan.req_index, plan.fold_row].view(nx, b, 2, d)
    sums = sums.view(nx, b, 2, d)
    upd_sums.view(nx, b, 2, d).copy_(torch.where(plan.fold[None, :, None, None], sums + folded, sums))
    upd4 = upd.view(nx, b, 2 * ss + 2, 2 * d)
    upd4[:, :, -1].view(torch.int32)[..., 0] = plan.f_new[None, :]
    kv_row = work4[:, :, nkv].to(dtype)  # this step's token (exact: it came in the cache dtype)
    upd4[:, :, 0] = kv_row if plan.all_write else torch.where(plan.write[None, :, None], kv_row, upd4[:, :, 1])
    for x in range(nx):
        pages[x][blocks[x][:, None], plan.rows_at(offsets[x])] = upd4[x]
    return out
