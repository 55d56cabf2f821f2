"""Triton ring decode (kv_layout="paged"): the decode step of the local heads on their ring regions.

The Triton twin of `ring_torch.ring_decode` (its oracle) and of the fused CPU op (`ring_cpp`), with
the same arguments. The region layout is `ring_layout.RingLayout`; the semantics are
`razor_vllm.reference.razor_attention_dense`. Runs on CPU tensors under ``TRITON_INTERPRET=1``
(set before this module is imported), which is how it is tested here.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .uniform_triton import _COMPENSATION_CODES

# The Triton twin of `ring_ops.ring_decode` (its oracle) and of the fused CPU op. What makes the
# paged layout's decode cheap on a GPU: a local head reads its S + W ring rows plus two fp32 state
# rows, whatever the context length, because the compensation sums are state that one row per step
# updates (the uniform layout's `compensation_sums` re-reads every evicted key instead). Every
# per-request quantity of `RingDecodePlan` (visibility, fold row, written slot, frontier) is a
# function of `start` alone, so the kernel derives it from `starts` and needs no other plan tensor
# on the device.


@triton.jit
def _ring_rows_update(q, region, slots, vis, offs_d, d_mask, m_i, l_i, acc, scale,
                      ROW: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Online-softmax step over the region rows `slots` ([N]) where `vis`: q `[G_PAD, D_PAD]` fp32,
    running max/sum `[G_PAD]` and acc `[G_PAD, D_PAD]`. Invisible rows are not loaded."""
    rows = region + slots[:, None] * ROW + offs_d[None, :]
    kv_mask = vis[:, None] & d_mask[None, :]
    k = tl.load(rows, mask=kv_mask, other=0.0).to(tl.float32)
    v = tl.load(rows + HEAD_DIM, mask=kv_mask, other=0.0).to(tl.float32)
    logits = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G_PAD, N]
    logits = tl.where(vis[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _ring_decode_kernel(
    page_ptr,      # [num_blocks, P, 2D] cache dtype: the page layer (rows contiguous)
    page32_ptr,    # the same bytes as fp32 (the Ksum/Vsum rows)
    page_i32_ptr,  # the same bytes as int32 (the frontier in the meta row)
    block_ptr,     # [B] ring block of each request (a block-table column: any stride)
    xs_ptr,        # int32 [X_g] the heads (index into query/key/value/out's X dim) of this launch
    offs_ptr,      # int32 [X_g] their region offsets (slots) in the page
    starts_ptr,    # int [B] cached tokens before this step (>= 1)
    q_ptr, k_ptr, v_ptr, out_ptr,
    scale,
    stride_pb: tl.int64, stride_p32b: tl.int64, stride_blk: tl.int64,
    stride_qb: tl.int64, stride_qx: tl.int64, stride_qg: tl.int64, stride_qd: tl.int64,
    stride_kb: tl.int64, stride_kx: tl.int64, stride_kd: tl.int64,
    stride_vb: tl.int64, stride_vx: tl.int64, stride_vd: tl.int64,
    stride_ob: tl.int64, stride_ox: tl.int64, stride_og: tl.int64, stride_od: tl.int64,
    SINKS: tl.constexpr, WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    KSUM_OFF: tl.constexpr, VSUM_OFF: tl.constexpr, META_OFF: tl.constexpr,
    ROW32: tl.constexpr,  # fp32 words per slot (2D * elem_size / 4)
    COMPENSATION: tl.constexpr,
    S_PAD: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (request b, local head of this page): attend sinks + visible window rows +
    this token + the compensation token (online softmax in fp32), then fold the position leaving the
    window into the sums, store the frontier and write this token to its slot."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    x = tl.load(xs_ptr + j).to(tl.int64)
    offset = tl.load(offs_ptr + j).to(tl.int64)
    start = tl.load(starts_ptr + b).to(tl.int32)
    block = tl.load(block_ptr + b * stride_blk).to(tl.int64)
    ROW: tl.constexpr = 2 * HEAD_DIM
    region = page_ptr + block * stride_pb + offset * ROW
    region32 = page32_ptr + block * stride_p32b + offset * ROW32

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + x * stride_qx + offs_g[:, None] * stride_qg + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    k_raw = tl.load(k_ptr + b * stride_kb + x * stride_kx + offs_d * stride_kd, mask=d_mask, other=0.0)
    v_raw = tl.load(v_ptr + b * stride_vb + x * stride_vx + offs_d * stride_vd, mask=d_mask, other=0.0)
    k_tok = k_raw.to(tl.float32)
    v_tok = v_raw.to(tl.float32)

    # This step's token is always visible: start the online softmax from it (no all -inf row).
    m_i = tl.sum(q * k_tok[None, :], axis=1) * scale  # [G_PAD]
    l_i = tl.full([G_PAD], 1.0, tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32) + v_tok[None, :]

    if SINKS > 0:
        offs_s = tl.arange(0, S_PAD)
        vis = (offs_s < SINKS) & (offs_s < start)
        m_i, l_i, acc = _ring_rows_update(q, region, offs_s, vis, offs_d, d_mask, m_i, l_i, acc, scale,
                                          ROW, HEAD_DIM)

    # Window slot k holds the newest position p < start with (p - S) % W == k: visible iff it exists
    # (k < start - S) and is not the slot this step overwrites once the ring has wrapped.
    cached = start - SINKS
    overwritten = tl.where(cached >= WINDOW, cached % WINDOW, -1)  # -1: no slot (ring not full)
    for k0 in range(0, WINDOW, BLOCK_N):
        kk = k0 + tl.arange(0, BLOCK_N)
        vis = (kk < WINDOW) & (kk < cached) & (kk != overwritten)
        m_i, l_i, acc = _ring_rows_update(q, region, SINKS + kk, vis, offs_d, d_mask, m_i, l_i, acc, scale,
                                          ROW, HEAD_DIM)

    # The compensation token over the n = F_old - S evicted positions (absent when n == 0).
    f_old = tl.maximum(start - WINDOW + 1, SINKS)
    n = f_old - SINKS
    k_sum = tl.load(region32 + KSUM_OFF * ROW32 + offs_d, mask=d_mask, other=0.0)
    v_sum = tl.load(region32 + VSUM_OFF * ROW32 + offs_d, mask=d_mask, other=0.0)
    if COMPENSATION != 0:
        n_f = tl.maximum(n, 1).to(tl.float32)
        logit_c = tl.sum(q * (k_sum / n_f)[None, :], axis=1) * scale
        if COMPENSATION == 2:
            logit_c = logit_c + tl.log(n_f)
        logit_c = tl.where(n > 0, logit_c, float("-inf"))
        m_new = tl.maximum(m_i, logit_c)
        alpha = tl.exp(m_i - m_new)
        p_c = tl.exp(logit_c - m_new)
        l_i = l_i * alpha + p_c
        acc = acc * alpha[:, None] + p_c[:, None] * (v_sum / n_f)[None, :]

    o = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + x * stride_ox + offs_g[:, None] * stride_og + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

    # Fold the position leaving the window (at most one per decode step): the ring row of F_old, or
    # this token itself when W = 1. Read before anything is written (W > 1: a different row).
    f_new = tl.maximum(f_old, start - WINDOW + 2)
    # per-request conditions as [D_PAD] vectors (masks must be tensors of the row's shape)
    zero_d = offs_d * 0
    fold = d_mask & ((zero_d + f_new) > f_old)
    in_ring = (zero_d + f_old) < start
    fold_row = SINKS + (f_old - SINKS) % WINDOW
    fk = tl.load(region + fold_row * ROW + offs_d, mask=fold & in_ring, other=0.0).to(tl.float32)
    fv = tl.load(region + fold_row * ROW + HEAD_DIM + offs_d, mask=fold & in_ring, other=0.0).to(tl.float32)
    fk = tl.where(in_ring, fk, k_tok)
    fv = tl.where(in_ring, fv, v_tok)
    write = d_mask & (((zero_d + start) < SINKS) | ((zero_d + start) >= f_new))
    token_slot = tl.where(start < SINKS, start, SINKS + (start - SINKS) % WINDOW)
    tl.debug_barrier()  # every read of the region above happens before the writes below
    tl.store(region32 + KSUM_OFF * ROW32 + offs_d, k_sum + fk, mask=fold)
    tl.store(region32 + VSUM_OFF * ROW32 + offs_d, v_sum + fv, mask=fold)
    tl.store(page_i32_ptr + block * stride_p32b + (offset * ROW32 + META_OFF * ROW32), f_new)
    tl.store(region + token_slot * ROW + offs_d, k_raw.to(page_ptr.dtype.element_ty), mask=write)
    tl.store(region + token_slot * ROW + HEAD_DIM + offs_d, v_raw.to(page_ptr.dtype.element_ty), mask=write)


@functools.lru_cache(maxsize=256)
def _int32_on(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small constant index tensor on `device`, made once (not a host-to-device copy per layer)."""
    return torch.tensor(values, dtype=torch.int32, device=device)


def ring_decode(pages, offsets, blocks, plan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton :func:`razor_vllm.kernels.ring_ops.ring_decode`: one decode step of X local heads for
    the B requests of `plan` (a :class:`~razor_vllm.kernels.ring_ops.RingDecodePlan`), in place on
    the ring regions. Same arguments and result (up to fp32 summation order; the ring state is the
    same bit for bit).

    Parameters
    ----------
    pages : sequence of torch.Tensor
        X page caches ``[num_blocks, P, 2*D]`` (rows contiguous, any block stride; 2*D*elem_size a
        multiple of 4): the page layer of local head x. Heads that share a page tensor and a block
        column run in one launch.
    offsets : sequence of int
        X region offsets (slots) inside a page.
    blocks : sequence of torch.Tensor
        X int32/int64 ``[B]`` ring block of each request (any stride), never the null block 0.
    query : torch.Tensor
        ``[B, X, G, D]``; key, value ``[B, X, D]`` (this step's token), any strides.
    out : torch.Tensor, optional
        ``[B, X, G, D]`` destination, any strides.

    Returns
    -------
    torch.Tensor
        ``[B, X, G, D]`` in query's dtype (``out`` if given).
    """
    s, w, d = plan.geometry[0], plan.geometry[1], plan.geometry[2]
    ksum_off, vsum_off, meta_off = plan.state_offsets
    b, nx, g, _ = query.shape
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if b == 0 or nx == 0:
        return out
    starts = plan.starts_on(query.device)
    groups: dict[tuple, list[int]] = {}
    for x, (page, blk) in enumerate(zip(pages, blocks)):
        if page.dim() != 3 or page.shape[2] != 2 * d or page.stride(2) != 1 or page.stride(1) != 2 * d:
            raise ValueError(f"ring_decode: page {x} must be [num_blocks, P, {2 * d}] with contiguous rows, "
                             f"got shape {tuple(page.shape)} strides {page.stride()}")
        if (2 * d * page.element_size()) % 4 or (page.stride(0) * page.element_size()) % 4:
            raise ValueError(f"ring_decode: page {x}: rows of {2 * d} x {page.dtype} do not hold whole fp32 "
                             "sums")
        if offsets[x] < 0 or offsets[x] + meta_off >= page.shape[1]:
            # the C++ op's check too: a region past the page would be written out of bounds
            raise ValueError(f"ring_decode: region at slot {offsets[x]} with meta row {meta_off} exceeds the "
                             f"page of {page.shape[1]} slots (head {x})")
        key_ = (page.data_ptr(), page.stride(0), tuple(page.shape), blk.data_ptr(), blk.stride(0))
        groups.setdefault(key_, []).append(x)
    esize = pages[0].element_size()
    row32 = 2 * d * esize // 4
    for xs in groups.values():
        page, blk = pages[xs[0]], blocks[xs[0]]
        heads = _int32_on(tuple(xs), query.device)
        offs = _int32_on(tuple(offsets[x] for x in xs), query.device)
        _ring_decode_kernel[(b, len(xs))](
            page, page.view(torch.float32), page.view(torch.int32), blk, heads, offs, starts,
            query, key, value, out, float(scale),
            page.stride(0), page.stride(0) * esize // 4, blk.stride(0),
            *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            SINKS=s, WINDOW=w, HEAD_DIM=d, GROUP=g,
            KSUM_OFF=ksum_off, VSUM_OFF=vsum_off, META_OFF=meta_off, ROW32=row32,
            COMPENSATION=_COMPENSATION_CODES[plan.compensation],
            S_PAD=triton.next_power_of_2(max(s, 1)), G_PAD=triton.next_power_of_2(g),
            D_PAD=triton.next_power_of_2(d), BLOCK_N=min(64, triton.next_power_of_2(w)),
        )
    return out
