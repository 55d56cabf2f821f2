"""Triton ring decode (kv_layout="paged"): the decode step of the local heads on their ring regions.

The Triton twin of `ring_torch.ring_decode` (its oracle) and of the fused CPU op (`ring_cpp`), with
the same arguments. The region layout is `ring_layout.RingLayout`; the semantics are
`razor_vllm.reference.razor_attention_dense`. Runs on CPU tensors under ``TRITON_INTERPRET=1``
(set before this module is imported), which is how it is tested here.

Below it, the capture-safe kernels for CUDA vLLM (`ring_table`, `ring_decode_rows`, `ring_chunks` =
`ring_chunk_attend` + `ring_chunk_fold_write`): one launch per layer over every local head on vLLM's
flattened batch tensors, no host sync, oracle `ring_torch.ring_step` (tests/kernels/test_ring_rows.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .ring_layout import dtype_size
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


# --------------------------------------------------------------------------------------------------
# Capture-safe kernels for CUDA vLLM: one layer's local heads on vLLM's flattened batch
# --------------------------------------------------------------------------------------------------
# `ring_decode` above needs a host-built plan (starts copied to the device) and validates every head
# in Python per call: neither fits inside a CUDA graph, whose replays re-run the captured launches
# with whatever the batch tensors hold. The kernels below read everything per step from vLLM's own
# device tensors (query_start_loc, seq_lens, block tables) and everything per layer from a
# descriptor table built once (`ring_table`): the raw addresses of the heads' page tensors and block
# tables, so heads in different page tensors and block tables run in ONE launch. Their launch
# functions do no host sync and create no tensors; grid sizes are Python ints from the caller.

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
for _name, _tl_name in (("float8_e4m3fn", "float8e4nv"), ("float8_e5m2", "float8e5")):
    if hasattr(torch, _name) and hasattr(tl, _tl_name):
        _TL_DTYPES[getattr(torch, _name)] = getattr(tl, _tl_name)

# kv_head, page address (bytes), page block stride (elements), offset, block table address, its row stride
_TABLE_COLUMNS = 6


@dataclass(frozen=True, eq=False)
class RingHead:
    """One local KV head of a layer as the capture-safe kernels see it.

    kv_head: index into key/value's head dim (its query heads are ``[kv_head*G, (kv_head+1)*G)``);
    page: ``[num_blocks, P, 2*D]`` page tensor holding the head's ring regions (rows contiguous, any
    block stride); offset: the region's first slot in a page; block_table: int32 ``[max_reqs,
    max_blocks]`` (any row stride, column stride 1): a request's ring page is ``block_table[r, 0]``.
    """

    kv_head: int
    page: torch.Tensor
    offset: int
    block_table: torch.Tensor


def ring_table(heads, device, *, ring) -> torch.Tensor:
    """Descriptor table (int64 ``[X, 6]`` on `device`) of a layer's local heads (a sequence of
    :class:`RingHead`), built once per layer and passed to every launch of `ring_decode_rows` /
    `ring_chunk_attend` / `ring_chunk_fold_write`.

    Columns: kv_head, ``page.data_ptr()`` (bytes), ``page.stride(0)`` (elements), offset,
    ``block_table.data_ptr()``, ``block_table.stride(0)``. The table holds raw addresses: it keeps
    references to the heads (attribute ``_ring_heads``), and a page or block table that is
    reallocated (not updated in place) needs a new table. All heads share `ring` (D, dtype, slots).
    """
    heads = tuple(heads)
    d = ring.head_size
    if ring.dtype not in _TL_DTYPES:
        raise ValueError(f"ring_table: unsupported KV dtype {ring.dtype}")
    esize = dtype_size(ring.dtype)
    if (2 * d * esize) % 4:
        # the fp32 sums and the int32 frontier are read through 4-byte views of the rows
        raise ValueError(f"ring_table: rows of {2 * d} x {ring.dtype} do not hold whole fp32 words")
    device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as the tensors' devices read
    rows = []
    for i, h in enumerate(heads):
        page, bt = h.page, h.block_table
        if page.dim() != 3 or page.shape[2] != 2 * d or page.stride(2) != 1 or page.stride(1) != 2 * d:
            raise ValueError(f"ring_table: head {i}: page must be [num_blocks, P, {2 * d}] with contiguous rows, "
                             f"got shape {tuple(page.shape)} strides {page.stride()}")
        if page.dtype != ring.dtype:
            raise ValueError(f"ring_table: head {i}: page dtype {page.dtype} is not the ring's {ring.dtype}")
        if (page.stride(0) * esize) % 4 or page.data_ptr() % 4:
            raise ValueError(f"ring_table: head {i}: page blocks are not 4-byte aligned (fp32 sums)")
        if h.offset < 0 or h.offset + ring.slots > page.shape[1]:
            # the kernels write the sums and frontier in place: out of bounds otherwise
            raise ValueError(f"ring_table: head {i}: region at slot {h.offset} of {ring.slots} slots exceeds the "
                             f"page of {page.shape[1]} slots")
        if bt.dtype != torch.int32 or bt.dim() != 2 or (bt.shape[1] > 1 and bt.stride(1) != 1):
            raise ValueError(f"ring_table: head {i}: block table must be int32 [max_reqs, max_blocks] with column "
                             f"stride 1, got {bt.dtype} shape {tuple(bt.shape)} strides {bt.stride()}")
        if h.kv_head < 0:
            raise ValueError(f"ring_table: head {i}: kv_head {h.kv_head} < 0")
        if page.device != device or bt.device != device:
            raise ValueError(f"ring_table: head {i}: page on {page.device}, block table on {bt.device}, "
                             f"table on {device}")
        rows.append([h.kv_head, page.data_ptr(), page.stride(0), h.offset, bt.data_ptr(), bt.stride(0)])
    table = torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), _TABLE_COLUMNS)
    table._ring_heads = heads  # keep the addressed tensors alive as long as the table
    # checked against key's head count per launch (an out-of-range head reads out of bounds)
    table._ring_kv_heads = max((h.kv_head for h in heads), default=-1) + 1
    return table


@triton.jit
def _ring_head_region(table_ptr, j, req, ROW: tl.constexpr, ELEM_BYTES: tl.constexpr):
    """(kv head, ring block, byte address of the region) of table row j for request `req`.
    The block is read from the head's block table: check it (0 = null block) before touching it."""
    row = table_ptr + j * 6
    x = tl.load(row)
    page_addr = tl.load(row + 1)
    stride_pb = tl.load(row + 2)
    offset = tl.load(row + 3)
    block_table = tl.load(row + 4).to(tl.pointer_type(tl.int32))
    stride_bt = tl.load(row + 5)
    block = tl.load(block_table + req * stride_bt).to(tl.int64)
    # byte arithmetic, so that the same address serves the cache-dtype, fp32 and int32 views
    addr = page_addr + (block * stride_pb + offset * ROW) * ELEM_BYTES
    return x, block, addr


@triton.jit
def _ring_decode_rows_kernel(
    table_ptr,     # int64 [X, 6]: see ring_table
    qsl_ptr,       # int32 [>= num_rows + 1] query_start_loc
    seq_lens_ptr,  # int32 [>= num_rows] tokens cached after this step
    q_ptr, k_ptr, v_ptr, out_ptr,
    scale,
    stride_qt: tl.int64, stride_qh: tl.int64, stride_qd: tl.int64,
    stride_kt: tl.int64, stride_kh: tl.int64, stride_kd: tl.int64,
    stride_vt: tl.int64, stride_vh: tl.int64, stride_vd: tl.int64,
    stride_ot: tl.int64, stride_oh: tl.int64, stride_od: tl.int64,
    PAGE_DTYPE: tl.constexpr, ELEM_BYTES: tl.constexpr,
    SINKS: tl.constexpr, WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    KSUM_OFF: tl.constexpr, VSUM_OFF: tl.constexpr, META_OFF: tl.constexpr,
    ROW32: tl.constexpr,  # fp32 words per slot (2D * elem_size / 4)
    COMPENSATION: tl.constexpr,
    S_PAD: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """`_ring_decode_kernel` on vLLM's batch: program (b, j) = (batch row b, table head j). Rows with
    q_len != 1 (CUDA-graph padding has 0, chunks are the chunk kernels') and the null block exit.
    start = seq_lens[b] - 1; start == 0 (a one-token prompt) runs on a reset state."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    t = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - t
    # before anything else: a padding row's block table row may not exist
    if q_len != 1:
        return
    ROW: tl.constexpr = 2 * HEAD_DIM
    x, block, addr = _ring_head_region(table_ptr, j, b, ROW, ELEM_BYTES)
    if block == 0:
        return
    start = tl.load(seq_lens_ptr + b) - 1
    t = t.to(tl.int64)
    region = addr.to(tl.pointer_type(PAGE_DTYPE))
    region32 = addr.to(tl.pointer_type(tl.float32))

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = x * GROUP + offs_g
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    k_raw = tl.load(k_ptr + t * stride_kt + x * stride_kh + offs_d * stride_kd, mask=d_mask, other=0.0)
    v_raw = tl.load(v_ptr + t * stride_vt + x * stride_vh + offs_d * stride_vd, mask=d_mask, other=0.0)
    k_tok = k_raw.to(tl.float32)
    v_tok = v_raw.to(tl.float32)

    # This step's token is always visible: start the online softmax from it (no all -inf row).
    m_i = tl.sum(q * k_tok[None, :], axis=1) * scale  # [G_PAD]
    l_i = tl.full([G_PAD], 1.0, tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32) + v_tok[None, :]

    # start == 0 reads no ring row: no sink is visible (s < start) and no window slot (k < start - S)
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

    # The compensation token over the n = F_old - S evicted positions (absent when n == 0, which
    # includes start == 0: F_old = S there).
    f_old = tl.maximum(start - WINDOW + 1, SINKS)
    n = f_old - SINKS
    zero_d = offs_d * 0  # per-request conditions as [D_PAD] vectors (masks of the row's shape)
    reset = d_mask & ((zero_d + start) == 0)
    # a reset state's sums are 0 (the region's bytes are another sequence's: not read)
    k_sum = tl.load(region32 + KSUM_OFF * ROW32 + offs_d, mask=d_mask & ~reset, other=0.0)
    v_sum = tl.load(region32 + VSUM_OFF * ROW32 + offs_d, mask=d_mask & ~reset, other=0.0)
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
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

    # Fold the position leaving the window (at most one per decode step): the ring row of F_old, or
    # this token itself when W = 1. Read before anything is written (W > 1: a different row).
    f_new = tl.maximum(f_old, start - WINDOW + 2)
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
    # k_sum + row, as ring_fold (bit for bit); a reset stores its zero sums even without a fold
    tl.store(region32 + KSUM_OFF * ROW32 + offs_d, tl.where(fold, k_sum + fk, k_sum), mask=fold | reset)
    tl.store(region32 + VSUM_OFF * ROW32 + offs_d, tl.where(fold, v_sum + fv, v_sum), mask=fold | reset)
    tl.store(addr.to(tl.pointer_type(tl.int32)) + META_OFF * ROW32, f_new.to(tl.int32))
    tl.store(region + token_slot * ROW + offs_d, k_raw.to(PAGE_DTYPE), mask=write)
    tl.store(region + token_slot * ROW + HEAD_DIM + offs_d, v_raw.to(PAGE_DTYPE), mask=write)


def _check_step_args(fn: str, table: torch.Tensor, ring, query, key, value, out, compensation: str) -> int:
    """Shape checks of a launch (host metadata only, no device access); returns G."""
    if compensation not in _COMPENSATION_CODES:
        raise ValueError(f"{fn}: unknown compensation {compensation!r}")
    if table.dim() != 2 or table.shape[1] != _TABLE_COLUMNS or table.dtype != torch.int64:
        raise ValueError(f"{fn}: table must be ring_table's int64 [X, {_TABLE_COLUMNS}], got {table.dtype} "
                         f"{tuple(table.shape)}")
    if ring.dtype not in _TL_DTYPES:
        raise ValueError(f"{fn}: unsupported KV dtype {ring.dtype}")
    d = ring.head_size
    if query.shape[-1] != d or key.shape[-1] != d or value.shape[-1] != d or out.shape != query.shape:
        raise ValueError(f"{fn}: head size {d}: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}, out {tuple(out.shape)}")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(f"{fn}: {query.shape[1]} query heads for {key.shape[1]} KV heads")
    if getattr(table, "_ring_kv_heads", 0) > key.shape[1]:
        raise ValueError(f"{fn}: the table names KV head {table._ring_kv_heads - 1}, key has {key.shape[1]}")
    return query.shape[1] // key.shape[1]


@functools.lru_cache(maxsize=64)
def _layout_constexprs(ring) -> dict:
    """The region layout's constexprs, shared by the three kernels. Cached per layout: RingLayout's
    offsets are properties that allocate a tensor to size the dtype, work a launch should not do."""
    return dict(
        PAGE_DTYPE=_TL_DTYPES[ring.dtype], ELEM_BYTES=dtype_size(ring.dtype),
        SINKS=ring.sinks, WINDOW=ring.window, HEAD_DIM=ring.head_size,
        KSUM_OFF=ring.ksum_offset, VSUM_OFF=ring.vsum_offset, META_OFF=ring.meta_offset,
        ROW32=2 * ring.head_size * dtype_size(ring.dtype) // 4,
    )


def ring_decode_rows(table: torch.Tensor, ring, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                     num_rows: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     out: torch.Tensor, *, scale: float, compensation: str) -> torch.Tensor:
    """Decode step of a layer's local heads (`table`, see `ring_table`) for batch rows
    ``[0, num_rows)``, in place on their ring regions; one launch, no host sync (CUDA-graph safe).

    Row b is decoded iff its q_len (``query_start_loc[b+1] - query_start_loc[b]``) is 1 and its
    ring block (``block_table[b, 0]``) is not the null block 0; start = ``seq_lens[b] - 1`` (0: a
    one-token prompt, run on a reset state). Same result as `ring_torch.ring_step` per (row, head),
    the ring state bit for bit. Rows with q_len 1 that are chunks of the chunk kernels must lie
    outside ``[0, num_rows)``.

    query/out: ``[num_tokens, num_heads, D]``, key/value ``[num_tokens, num_kv_heads, D]`` (any
    strides); query_start_loc int32 ``[>= num_rows + 1]``, seq_lens int32 ``[>= num_rows]``.
    Writes out's rows of the heads ``[x*G, (x+1)*G)`` of the decoded tokens only; returns out.
    """
    g = _check_step_args("ring_decode_rows", table, ring, query, key, value, out, compensation)
    nx = table.shape[0]
    if num_rows <= 0 or nx == 0:
        return out
    if query_start_loc.shape[0] < num_rows + 1 or seq_lens.shape[0] < num_rows:
        raise ValueError(f"ring_decode_rows: {num_rows} rows need query_start_loc [>= {num_rows + 1}] and "
                         f"seq_lens [>= {num_rows}], got {tuple(query_start_loc.shape)}, {tuple(seq_lens.shape)}")
    s, w, d = ring.sinks, ring.window, ring.head_size
    _ring_decode_rows_kernel[(num_rows, nx)](
        table, query_start_loc, seq_lens, query, key, value, out, float(scale),
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        **_layout_constexprs(ring), GROUP=g, COMPENSATION=_COMPENSATION_CODES[compensation],
        S_PAD=triton.next_power_of_2(max(s, 1)), G_PAD=triton.next_power_of_2(g),
        D_PAD=triton.next_power_of_2(d), BLOCK_N=min(64, triton.next_power_of_2(w)),
    )
    return out


@triton.jit
def _softmax_tile(q, k_t, v, vis, m_i, l_i, acc, scale, DOT_PRECISION: tl.constexpr):
    """Online-softmax step over one key tile: q ``[BLOCK_M, D_PAD]``, k_t ``[D_PAD, N]``, v
    ``[N, D_PAD]`` (q's dtype), vis ``[BLOCK_M, N]`` or ``[1, N]``; running max/sum ``[BLOCK_M]``
    and acc ``[BLOCK_M, D_PAD]`` in fp32."""
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # a row with nothing visible yet keeps m = -inf: shift it by 0 to avoid inf - inf
    m_shift = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.exp(s - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# req_begin (the number of decode rows before the chunks) changes every step: one compiled kernel
@triton.jit(do_not_specialize=["req_begin"])
def _ring_chunk_attend_kernel(
    table_ptr, qsl_ptr, seq_lens_ptr, req_begin,
    q_ptr, k_ptr, v_ptr, out_ptr,
    scale,
    stride_qt: tl.int64, stride_qh: tl.int64, stride_qd: tl.int64,
    stride_kt: tl.int64, stride_kh: tl.int64, stride_kd: tl.int64,
    stride_vt: tl.int64, stride_vh: tl.int64, stride_vd: tl.int64,
    stride_ot: tl.int64, stride_oh: tl.int64, stride_od: tl.int64,
    PAGE_DTYPE: tl.constexpr, ELEM_BYTES: tl.constexpr,
    SINKS: tl.constexpr, WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    KSUM_OFF: tl.constexpr, VSUM_OFF: tl.constexpr, META_OFF: tl.constexpr,
    ROW32: tl.constexpr, COMPENSATION: tl.constexpr,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows = (token, query head) pairs, a power of two >= 16 (tl.dot)
    BLOCK_Q: tl.constexpr,  # tokens per program: BLOCK_M // GROUP
    BLOCK_N: tl.constexpr,  # keys per tile
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Attention of BLOCK_Q chunk tokens of request ``req_begin + program_id(0)`` for the G query
    heads of table head program_id(2), over the state before this step: the compensation token,
    the visible sinks and window slots, then the chunk's own keys (causal). Reads only: the fold
    and the writes are `_ring_chunk_fold_write_kernel`'s, launched after every program here has
    read the old state.

    ``UPCAST_DOT`` is only set under the Triton interpreter with bf16 inputs, whose ``tl.dot``
    multiplies bf16 bit patterns (see uniform_triton): fp32 operands give the tensor-core result.
    """
    req = req_begin + tl.program_id(0)
    q_block = tl.program_id(1)
    j = tl.program_id(2)
    t0 = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - t0
    if q_block * BLOCK_Q >= q_len:
        return
    ROW: tl.constexpr = 2 * HEAD_DIM
    x, block, addr = _ring_head_region(table_ptr, j, req, ROW, ELEM_BYTES)
    if block == 0:
        return
    start = tl.load(seq_lens_ptr + req) - q_len
    t0 = t0.to(tl.int64)
    region = addr.to(tl.pointer_type(PAGE_DTYPE))
    region32 = addr.to(tl.pointer_type(tl.float32))

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    row_token = offs_m // GROUP
    q_idx = q_block * BLOCK_Q + row_token  # token index in the chunk
    heads = x * GROUP + offs_m % GROUP
    # BLOCK_M is a power of two: with G = 3 some trailing rows belong to no token
    row_mask = (row_token < BLOCK_Q) & (q_idx < q_len)
    q = tl.load(q_ptr + (t0 + q_idx)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # The compensation token over n = F_old - S evicted positions (n == 0 at start == 0: F_old = S,
    # so a reset state's sums are never read).
    f_old = tl.maximum(start - WINDOW + 1, SINKS)
    n = f_old - SINKS
    if COMPENSATION != 0:
        if n > 0:
            # seeds the online softmax: m = its logit, l = 1, acc = V_hat
            n_f = n.to(tl.float32)
            k_hat = tl.load(region32 + KSUM_OFF * ROW32 + offs_d, mask=d_mask, other=0.0) / n_f
            v_hat = tl.load(region32 + VSUM_OFF * ROW32 + offs_d, mask=d_mask, other=0.0) / n_f
            m_i = tl.sum(q.to(tl.float32) * k_hat[None, :], axis=1) * scale
            if COMPENSATION == 2:
                m_i += tl.log(n_f)
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
            acc += v_hat[None, :]

    # Every past key is visible to every token of the chunk: per-column masks only.
    if SINKS > 0:
        offs_s = tl.arange(0, S_PAD)
        vis = (offs_s < SINKS) & (offs_s < start)  # start == 0: none, nothing loaded
        k_t = tl.load(region + offs_s[None, :] * ROW + offs_d[:, None], mask=d_mask[:, None] & vis[None, :],
                      other=0.0).to(q.dtype)
        v = tl.load(region + offs_s[:, None] * ROW + HEAD_DIM + offs_d[None, :], mask=vis[:, None] & d_mask[None, :],
                    other=0.0).to(q.dtype)
        m_i, l_i, acc = _softmax_tile(q, k_t, v, vis[None, :], m_i, l_i, acc, scale, DOT_PRECISION)

    # Window slot k is visible iff it holds a cached position (k < start - S) that this step does not
    # evict: once wrapped (start - S >= W), slot (start - S) % W holds F_old - 1 < F_old.
    cached = start - SINKS
    overwritten = tl.where(cached >= WINDOW, cached % WINDOW, -1)
    for k0 in range(0, tl.minimum(cached, WINDOW), BLOCK_N):  # no iteration when start <= S
        kk = k0 + tl.arange(0, BLOCK_N)
        vis = (kk < WINDOW) & (kk < cached) & (kk != overwritten)
        rows = region + (SINKS + kk) * ROW
        k_t = tl.load(rows[None, :] + offs_d[:, None], mask=d_mask[:, None] & vis[None, :], other=0.0).to(q.dtype)
        v = tl.load(rows[:, None] + HEAD_DIM + offs_d[None, :], mask=vis[:, None] & d_mask[None, :],
                    other=0.0).to(q.dtype)
        m_i, l_i, acc = _softmax_tile(q, k_t, v, vis[None, :], m_i, l_i, acc, scale, DOT_PRECISION)

    # The chunk's own keys [0, last token of this block], causal (from key/value, never the ring).
    kv_end = tl.minimum(q_len, q_block * BLOCK_Q + BLOCK_Q)
    for n0 in range(0, kv_end, BLOCK_N):
        kv_idx = n0 + tl.arange(0, BLOCK_N)
        kv_mask = kv_idx < kv_end
        tok = t0 + kv_idx
        k_t = tl.load(k_ptr + tok[None, :] * stride_kt + x * stride_kh + offs_d[:, None] * stride_kd,
                      mask=d_mask[:, None] & kv_mask[None, :], other=0.0).to(q.dtype)
        v = tl.load(v_ptr + tok[:, None] * stride_vt + x * stride_vh + offs_d[None, :] * stride_vd,
                    mask=kv_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)
        vis = kv_mask[None, :] & (kv_idx[None, :] <= q_idx[:, None])
        m_i, l_i, acc = _softmax_tile(q, k_t, v, vis, m_i, l_i, acc, scale, DOT_PRECISION)

    # Rows outside row_mask (no token: nothing visible may remain) are computed but not stored.
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (t0 + q_idx)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


# req_begin (the number of decode rows before the chunks) changes every step: one compiled kernel
@triton.jit(do_not_specialize=["req_begin"])
def _ring_chunk_fold_write_kernel(
    table_ptr, qsl_ptr, seq_lens_ptr, req_begin,
    k_ptr, v_ptr,
    stride_kt: tl.int64, stride_kh: tl.int64, stride_kd: tl.int64,
    stride_vt: tl.int64, stride_vh: tl.int64, stride_vd: tl.int64,
    PAGE_DTYPE: tl.constexpr, ELEM_BYTES: tl.constexpr,
    SINKS: tl.constexpr, WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
    KSUM_OFF: tl.constexpr, VSUM_OFF: tl.constexpr, META_OFF: tl.constexpr,
    ROW32: tl.constexpr,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """`ring_fold` + `ring_write` of one (chunk request, table head): reset at start == 0, fold
    ``[F_old, F_new)`` into the fp32 sums (in tiles: fp32 summation order differs from torch's),
    store F_new, then write the chunk's sink positions and its positions >= max(S, F_new)."""
    req = req_begin + tl.program_id(0)
    j = tl.program_id(1)
    t0 = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - t0
    if q_len <= 0:
        return
    ROW: tl.constexpr = 2 * HEAD_DIM
    x, block, addr = _ring_head_region(table_ptr, j, req, ROW, ELEM_BYTES)
    if block == 0:
        return
    start = tl.load(seq_lens_ptr + req) - q_len
    t0 = t0.to(tl.int64)
    region = addr.to(tl.pointer_type(PAGE_DTYPE))
    region32 = addr.to(tl.pointer_type(tl.float32))

    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    zero_d = offs_d * 0  # per-request conditions as [D_PAD] vectors (masks of the row's shape)
    reset = d_mask & ((zero_d + start) == 0)
    f_old = tl.maximum(start - WINDOW + 1, SINKS)
    f_new = tl.maximum(f_old, start + q_len - WINDOW + 1)
    fold = d_mask & ((zero_d + f_new) > f_old)

    # [BLOCK_N, D_PAD] partial sums, reduced once at the end
    k_acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    v_acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    # folded positions still in the ring: [F_old, min(F_new, start)) (fewer than W)
    ring_end = tl.minimum(f_new, start)
    for p0 in range(f_old, ring_end, BLOCK_N):
        pos = p0 + offs_n
        rows = region + (SINKS + (pos - SINKS) % WINDOW) * ROW  # pos >= F_old >= S
        mask = (pos < ring_end)[:, None] & d_mask[None, :]
        k_acc += tl.load(rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        v_acc += tl.load(rows[:, None] + HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    # folded chunk positions: [max(F_old, start), F_new), chunk rows from key/value
    for i0 in range(tl.maximum(f_old, start) - start, f_new - start, BLOCK_N):
        idx = i0 + offs_n
        mask = (idx < f_new - start)[:, None] & d_mask[None, :]
        tok = t0 + idx
        k_acc += tl.load(k_ptr + tok[:, None] * stride_kt + x * stride_kh + offs_d[None, :] * stride_kd,
                         mask=mask, other=0.0).to(tl.float32)
        v_acc += tl.load(v_ptr + tok[:, None] * stride_vt + x * stride_vh + offs_d[None, :] * stride_vd,
                         mask=mask, other=0.0).to(tl.float32)
    # a reset state's sums are 0 (the region's bytes are another sequence's: not read)
    k_sum = tl.load(region32 + KSUM_OFF * ROW32 + offs_d, mask=d_mask & ~reset, other=0.0)
    v_sum = tl.load(region32 + VSUM_OFF * ROW32 + offs_d, mask=d_mask & ~reset, other=0.0)
    k_sum = k_sum + tl.sum(k_acc, axis=0)
    v_sum = v_sum + tl.sum(v_acc, axis=0)
    tl.debug_barrier()  # every read of the ring rows above happens before the writes below
    # stored only when something changed (an unchanged sum keeps its exact bits, -0.0 included)
    tl.store(region32 + KSUM_OFF * ROW32 + offs_d, k_sum, mask=fold | reset)
    tl.store(region32 + VSUM_OFF * ROW32 + offs_d, v_sum, mask=fold | reset)
    tl.store(addr.to(tl.pointer_type(tl.int32)) + META_OFF * ROW32, f_new.to(tl.int32))

    # the chunk's sink positions [start, S)
    if SINKS > 0:
        idx = tl.arange(0, S_PAD)
        mask = ((start + idx < SINKS) & (idx < q_len))[:, None] & d_mask[None, :]
        tok = t0 + idx
        dst = region + (start + idx)[:, None] * ROW + offs_d[None, :]
        k = tl.load(k_ptr + tok[:, None] * stride_kt + x * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
        v = tl.load(v_ptr + tok[:, None] * stride_vt + x * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
        tl.store(dst, k.to(PAGE_DTYPE), mask=mask)
        tl.store(dst + HEAD_DIM, v.to(PAGE_DTYPE), mask=mask)
    # the newest positions [max(S, F_new, start), start + C): fewer than W, so distinct slots; the
    # slot of such a p held p - jW < F_new, folded above
    for i0 in range(tl.maximum(tl.maximum(f_new, SINKS), start) - start, q_len, BLOCK_N):
        idx = i0 + offs_n
        mask = (idx < q_len)[:, None] & d_mask[None, :]
        tok = t0 + idx
        dst = region + (SINKS + (start + idx - SINKS) % WINDOW)[:, None] * ROW + offs_d[None, :]
        k = tl.load(k_ptr + tok[:, None] * stride_kt + x * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
        v = tl.load(v_ptr + tok[:, None] * stride_vt + x * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
        tl.store(dst, k.to(PAGE_DTYPE), mask=mask)
        tl.store(dst + HEAD_DIM, v.to(PAGE_DTYPE), mask=mask)


def _chunk_args(fn, table, ring, query_start_loc, seq_lens, req_begin, num_reqs):
    if query_start_loc.shape[0] < req_begin + num_reqs + 1 or seq_lens.shape[0] < req_begin + num_reqs:
        raise ValueError(f"{fn}: requests [{req_begin}, {req_begin + num_reqs}) need query_start_loc "
                         f"[>= {req_begin + num_reqs + 1}] and seq_lens [>= {req_begin + num_reqs}], got "
                         f"{tuple(query_start_loc.shape)}, {tuple(seq_lens.shape)}")


def ring_chunk_attend(table: torch.Tensor, ring, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      req_begin: int, num_reqs: int, max_q_len: int, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, out: torch.Tensor, *, scale: float, compensation: str) -> torch.Tensor:
    """Attention (`ring_torch.ring_attend`) of the chunk requests ``[req_begin, req_begin + num_reqs)``
    of the batch for a layer's local heads (`table`); one launch, reads only, no host sync.

    Request r's tokens are ``[query_start_loc[r], query_start_loc[r+1])`` (q_len >= 1, at most
    `max_q_len`), start = ``seq_lens[r] - q_len`` (0: a new or preempted request, attended on a reset
    state); requests whose ring block ``block_table[r, 0]`` is 0 are skipped. Must be followed by
    `ring_chunk_fold_write` with the same arguments (`ring_chunks` runs both). Shapes as
    `ring_decode_rows`; returns out.
    """
    g = _check_step_args("ring_chunk_attend", table, ring, query, key, value, out, compensation)
    nx = table.shape[0]
    if num_reqs <= 0 or max_q_len <= 0 or nx == 0:
        return out
    _chunk_args("ring_chunk_attend", table, ring, query_start_loc, seq_lens, req_begin, num_reqs)
    # rows are (token, query head) pairs; tl.dot needs >= 16 rows; 64 for long chunks
    block_m = max(16, triton.next_power_of_2(g), min(64, triton.next_power_of_2(max_q_len * g)))
    block_q = block_m // g
    upcast_dot = _INTERPRETED and query.dtype == torch.bfloat16
    _ring_chunk_attend_kernel[(num_reqs, triton.cdiv(max_q_len, block_q), nx)](
        table, query_start_loc, seq_lens, req_begin, query, key, value, out, float(scale),
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        **_layout_constexprs(ring), GROUP=g, COMPENSATION=_COMPENSATION_CODES[compensation],
        S_PAD=max(16, triton.next_power_of_2(ring.sinks)), D_PAD=max(16, triton.next_power_of_2(ring.head_size)),
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=32,
        # fp32 operands would otherwise go through TF32 on Ampere+; 16-bit ones ignore this
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or upcast_dot else "tf32",
        UPCAST_DOT=upcast_dot,
    )
    return out


def ring_chunk_fold_write(table: torch.Tensor, ring, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                          req_begin: int, num_reqs: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """`ring_fold` + `ring_write` (reset first at start == 0) of the chunk requests
    ``[req_begin, req_begin + num_reqs)`` for a layer's local heads; one launch, no host sync. Runs
    after `ring_chunk_attend` of the same step (which reads the state this overwrites). The sums
    match the oracle's to fp32 rounding (tiled summation); slots and frontier bit for bit."""
    if table.dim() != 2 or table.shape[1] != _TABLE_COLUMNS or table.dtype != torch.int64:
        raise ValueError(f"ring_chunk_fold_write: table must be ring_table's int64 [X, {_TABLE_COLUMNS}]")
    if ring.dtype not in _TL_DTYPES or key.shape[-1] != ring.head_size or value.shape[-1] != ring.head_size:
        raise ValueError(f"ring_chunk_fold_write: key/value {tuple(key.shape)}/{tuple(value.shape)} for a ring of "
                         f"head size {ring.head_size}, {ring.dtype}")
    if getattr(table, "_ring_kv_heads", 0) > key.shape[1]:
        raise ValueError(f"ring_chunk_fold_write: the table names KV head {table._ring_kv_heads - 1}, key has "
                         f"{key.shape[1]}")
    nx = table.shape[0]
    if num_reqs <= 0 or nx == 0:
        return
    _chunk_args("ring_chunk_fold_write", table, ring, query_start_loc, seq_lens, req_begin, num_reqs)
    _ring_chunk_fold_write_kernel[(num_reqs, nx)](
        table, query_start_loc, seq_lens, req_begin, key, value, *key.stride(), *value.stride(),
        **_layout_constexprs(ring),
        S_PAD=triton.next_power_of_2(max(ring.sinks, 1)), D_PAD=triton.next_power_of_2(ring.head_size),
        BLOCK_N=32,
    )


def ring_chunks(table: torch.Tensor, ring, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, req_begin: int,
                num_reqs: int, max_q_len: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                out: torch.Tensor, *, scale: float, compensation: str) -> torch.Tensor:
    """One step of the chunk requests ``[req_begin, req_begin + num_reqs)``: `ring_chunk_attend`
    then `ring_chunk_fold_write` (two launches: every attention program reads the old state before
    any program updates it). Returns out."""
    ring_chunk_attend(table, ring, query_start_loc, seq_lens, req_begin, num_reqs, max_q_len, query, key, value,
                      out, scale=scale, compensation=compensation)
    ring_chunk_fold_write(table, ring, query_start_loc, seq_lens, req_begin, num_reqs, key, value)
    return out


# The @triton.jit decorator returns an interpreter stand-in instead of a JITFunction when
# TRITON_INTERPRET=1 was set at import time.
_INTERPRETED = not isinstance(_ring_chunk_attend_kernel, triton.runtime.JITFunction)
