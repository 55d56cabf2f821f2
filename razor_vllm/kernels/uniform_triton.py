"""Triton kernels for the RazorAttention paged-attention operators.

Same functions and signatures as :mod:`razor_vllm.kernels.uniform_torch`, whose module docstring
defines the cache layout, the batch convention and the RazorAttention semantics. The target is
CUDA (Hopper); the kernels also run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set before this module is imported), which is how they are tested.

The attention kernel follows vLLM's ``kernel_unified_attention``: one program per (query block,
KV head) processes the ``BLOCK_Q`` query tokens x ``num_q_heads // num_kv_heads`` GQA query heads
of that KV head as ``BLOCK_M`` rows, gathers K/V tiles through the block table and runs an online
softmax with running ``(M, L, acc)`` in fp32. Local heads only visit the sink tiles and the tiles of
``[F_r, p]``, so a decode step reads ``O(sinks + window)`` keys per local head.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from razor_vllm.config import COMPENSATION_MODES

from .uniform_torch import check_compensation_args

_COMPENSATION_CODES = {mode: code for code, mode in enumerate(COMPENSATION_MODES)}


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_k_t: tl.int64,
    stride_k_h: tl.int64,
    stride_k_d: tl.int64,
    stride_v_t: tl.int64,
    stride_v_h: tl.int64,
    stride_v_d: tl.int64,
    stride_kc_b: tl.int64,
    stride_kc_h: tl.int64,
    stride_kc_s: tl.int64,
    stride_kc_d: tl.int64,
    stride_vc_b: tl.int64,
    stride_vc_h: tl.int64,
    stride_vc_s: tl.int64,
    stride_vc_d: tl.int64,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PADDED: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
):
    """One program per token: copy its ``[num_kv_heads, head_dim]`` K and V rows to its slot."""
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_PADDED)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]

    k = tl.load(key_ptr + token * stride_k_t + offs_h[:, None] * stride_k_h
                + offs_d[None, :] * stride_k_d, mask=mask)
    v = tl.load(value_ptr + token * stride_v_t + offs_h[:, None] * stride_v_h
                + offs_d[None, :] * stride_v_d, mask=mask)
    kc = (key_cache_ptr + block * stride_kc_b + offset * stride_kc_s
          + offs_h[:, None] * stride_kc_h + offs_d[None, :] * stride_kc_d)
    vc = (value_cache_ptr + block * stride_vc_b + offset * stride_vc_s
          + offs_h[:, None] * stride_vc_h + offs_d[None, :] * stride_vc_d)
    tl.store(kc, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _compensation_sums_kernel(
    key_cache_ptr,
    value_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    head_is_local_ptr,
    k_sum_ptr,
    v_sum_ptr,
    count_ptr,
    # Typed so that a value of 1 is not specialised into a constexpr (and a recompile).
    sinks: tl.int32,
    window: tl.int32,
    stride_bt: tl.int64,
    stride_kc_b: tl.int64,
    stride_kc_h: tl.int64,
    stride_kc_s: tl.int64,
    stride_kc_d: tl.int64,
    stride_vc_b: tl.int64,
    stride_vc_h: tl.int64,
    stride_vc_s: tl.int64,
    stride_vc_d: tl.int64,
    stride_sum_r: tl.int64,
    stride_sum_h: tl.int64,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_SIZE: tl.constexpr,
):
    """One program per (request, KV head): sum K and V over the evicted range ``[sinks, F_r)``.

    Retrieval heads run zero iterations and store zeros; the program of KV head 0 also stores
    ``count[r] = F_r - sinks``.
    """
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_len = tl.load(query_start_loc_ptr + req + 1) - tl.load(query_start_loc_ptr + req)
    start = tl.load(seq_lens_ptr + req) - q_len
    frontier = tl.maximum(sinks, start - window + 1)
    if kv_head == 0:
        tl.store(count_ptr + req, frontier - sinks)
    is_local = tl.load(head_is_local_ptr + kv_head)
    end = tl.where(is_local, frontier, sinks)

    offs_t = tl.arange(0, TILE_SIZE)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = offs_d < HEAD_DIM
    # Accumulate whole tiles and reduce over tokens once at the end.
    k_acc = tl.zeros([TILE_SIZE, HEAD_DIM_PADDED], dtype=tl.float32)
    v_acc = tl.zeros([TILE_SIZE, HEAD_DIM_PADDED], dtype=tl.float32)
    for tile_start in range(sinks, end, TILE_SIZE):
        pos = tile_start + offs_t
        pos_mask = pos < end
        block = tl.load(
            block_table_ptr + req * stride_bt + pos // BLOCK_SIZE, mask=pos_mask, other=0
        ).to(tl.int64)
        offset = pos % BLOCK_SIZE
        mask = pos_mask[:, None] & dim_mask[None, :]
        k = tl.load(
            key_cache_ptr + block[:, None] * stride_kc_b + kv_head * stride_kc_h
            + offset[:, None] * stride_kc_s + offs_d[None, :] * stride_kc_d,
            mask=mask, other=0.0,
        )
        v = tl.load(
            value_cache_ptr + block[:, None] * stride_vc_b + kv_head * stride_vc_h
            + offset[:, None] * stride_vc_s + offs_d[None, :] * stride_vc_d,
            mask=mask, other=0.0,
        )
        k_acc += k.to(tl.float32)
        v_acc += v.to(tl.float32)
    out = req * stride_sum_r + kv_head * stride_sum_h + offs_d
    tl.store(k_sum_ptr + out, tl.sum(k_acc, axis=0), mask=dim_mask)
    tl.store(v_sum_ptr + out, tl.sum(v_acc, axis=0), mask=dim_mask)


@triton.jit
def _find_request(query_start_loc_ptr, q_block_global, num_reqs, BLOCK_Q: tl.constexpr):
    """Binary search for the request owning global query block ``q_block_global``.

    Request ``r``'s blocks are numbered from ``query_start_loc[r] // BLOCK_Q + r`` (vLLM's
    numbering: at most one partial block per request, so the ranges never overlap).
    """
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_global:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _razor_attention_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    head_is_local_ptr,
    k_sum_ptr,
    v_sum_ptr,
    count_ptr,
    scale,
    # Typed so that a value of 1 is not specialised into a constexpr (and a recompile).
    num_reqs: tl.int32,
    sinks: tl.int32,
    window: tl.int32,
    stride_q_t: tl.int64,
    stride_q_h: tl.int64,
    stride_q_d: tl.int64,
    stride_o_t: tl.int64,
    stride_o_h: tl.int64,
    stride_o_d: tl.int64,
    stride_bt: tl.int64,
    stride_kc_b: tl.int64,
    stride_kc_h: tl.int64,
    stride_kc_s: tl.int64,
    stride_kc_d: tl.int64,
    stride_vc_b: tl.int64,
    stride_vc_h: tl.int64,
    stride_vc_s: tl.int64,
    stride_vc_d: tl.int64,
    stride_ks_r: tl.int64,
    stride_ks_h: tl.int64,
    stride_ks_d: tl.int64,
    stride_vs_r: tl.int64,
    stride_vs_h: tl.int64,
    stride_vs_d: tl.int64,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    COMPENSATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One program per (query block, KV head); rows are (query token, GQA head) pairs.

    ``COMPENSATION``: 0 none, 1 single, 2 count. ``UPCAST_DOT`` is only set under the Triton
    interpreter with bf16 inputs: it stores bf16 as uint16 and ``tl.dot`` multiplies the bit
    patterns (triton-lang/triton#11584). bf16 products are exact in fp32, so fp32 operands give
    the tensor-core result.
    """
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc_ptr, q_block_global, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + req)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    start = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    offs_t = tl.arange(0, TILE_SIZE)
    row_token = offs_m // QUERIES_PER_KV
    q_idx = q_block * BLOCK_Q + row_token
    q_head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    # BLOCK_M is a power of two, so with GQA ratio 3 some trailing rows belong to no token.
    row_mask = (row_token < BLOCK_Q) & (q_idx < q_len)
    dim_mask = offs_d < HEAD_DIM
    q_pos = start + q_idx

    q = tl.load(
        query_ptr + (q_start + q_idx)[:, None] * stride_q_t + q_head[:, None] * stride_q_h
        + offs_d[None, :] * stride_q_d,
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    )

    # Visible keys: j <= p and (j < sink_end or j >= range_start). Retrieval heads use
    # sink_end = range_start = 0, i.e. plain causal attention.
    is_local = tl.load(head_is_local_ptr + kv_head)
    frontier = tl.maximum(sinks, start - window + 1)
    sink_end = tl.where(is_local, sinks, 0)
    range_start = tl.where(is_local, frontier, 0)

    M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    L = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    if COMPENSATION != 0:
        n = tl.load(count_ptr + req)
        if is_local & (n > 0):
            # Seed the online softmax with the compensation token, the way vLLM seeds learned
            # sinks: M = its logit, L = exp(M - M) = 1, acc = 1 * v_hat.
            n_f = n.to(tl.float32)
            k_hat = tl.load(
                k_sum_ptr + req * stride_ks_r + kv_head * stride_ks_h + offs_d * stride_ks_d,
                mask=dim_mask, other=0.0,
            ) / n_f
            v_hat = tl.load(
                v_sum_ptr + req * stride_vs_r + kv_head * stride_vs_h + offs_d * stride_vs_d,
                mask=dim_mask, other=0.0,
            ) / n_f
            M = tl.sum(q.to(tl.float32) * k_hat[None, :], axis=1) * scale
            if COMPENSATION == 2:
                M += tl.log(n_f)
            L = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
            acc += v_hat[None, :]

    if UPCAST_DOT:
        q = q.to(tl.float32)

    # Keys past the block's last query are invisible to all of its rows.
    kv_end = start + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    # Tile schedule: the sink tiles, then the tiles of [range_start, kv_end) not already visited.
    num_sink_tiles = tl.cdiv(tl.minimum(sink_end, kv_end), TILE_SIZE)
    first_range_tile = tl.maximum(num_sink_tiles, range_start // TILE_SIZE)
    num_range_tiles = tl.maximum(tl.cdiv(kv_end, TILE_SIZE) - first_range_tile, 0)
    bt_row = block_table_ptr + req * stride_bt
    # K tiles are loaded transposed, [HEAD_DIM_PADDED, TILE_SIZE]; V tiles are
    # [TILE_SIZE, HEAD_DIM_PADDED].
    k_ptrs = key_cache_ptr + kv_head * stride_kc_h + offs_d[:, None] * stride_kc_d
    v_ptrs = value_cache_ptr + kv_head * stride_vc_h + offs_d[None, :] * stride_vc_d
    for i in range(0, num_sink_tiles + num_range_tiles):
        tile = tl.where(i < num_sink_tiles, i, first_range_tile + i - num_sink_tiles)
        kv_pos = tile * TILE_SIZE + offs_t
        # Evicted and not-yet-written positions are never loaded.
        kv_mask = (kv_pos < kv_end) & ((kv_pos < sink_end) | (kv_pos >= range_start))
        block = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_mask, other=0).to(tl.int64)
        slot = block * stride_kc_b + (kv_pos % BLOCK_SIZE) * stride_kc_s
        k = tl.load(k_ptrs + slot[None, :], mask=dim_mask[:, None] & kv_mask[None, :], other=0.0)
        slot = block * stride_vc_b + (kv_pos % BLOCK_SIZE) * stride_vc_s
        v = tl.load(v_ptrs + slot[:, None], mask=kv_mask[:, None] & dim_mask[None, :], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        s = tl.where(kv_mask[None, :] & (kv_pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(M, tl.max(s, axis=1))
        # A row with nothing visible yet keeps M = -inf; shift it by 0 to avoid inf - inf.
        m_shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(s - m_shift[:, None])
        alpha = tl.exp(M - m_shift)
        L = L * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        M = m_new

    # Rows outside row_mask (zero queries, possibly nothing visible) are computed but not stored.
    acc = acc / tl.where(L > 0.0, L, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + q_idx)[:, None] * stride_o_t + q_head[:, None] * stride_o_h
        + offs_d[None, :] * stride_o_d,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


# The @triton.jit decorator returns an interpreter stand-in instead of a JITFunction when
# TRITON_INTERPRET=1 was set at import time.
_INTERPRETED = not isinstance(_razor_attention_kernel, triton.runtime.JITFunction)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton `uniform_torch.reshape_and_cache`: same arguments and contract (see its docstring)."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, num_kv_heads, block_size, head_dim = key_cache.shape
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        *key.stride(), *value.stride(), *key_cache.stride(), *value_cache.stride(),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
    )


def compensation_sums(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    head_is_local: torch.Tensor,
    sinks: int,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `uniform_torch.compensation_sums`: same arguments, result and contract (see its
    docstring)."""
    num_reqs = seq_lens.shape[0]
    _, num_kv_heads, block_size, head_dim = key_cache.shape
    device = key_cache.device
    k_sum = torch.empty(num_reqs, num_kv_heads, head_dim, dtype=torch.float32, device=device)
    v_sum = torch.empty_like(k_sum)
    count = torch.empty(num_reqs, dtype=torch.int32, device=device)
    if num_reqs == 0:
        return k_sum, v_sum, count
    _compensation_sums_kernel[(num_reqs, num_kv_heads)](
        key_cache, value_cache, block_table, seq_lens, query_start_loc, head_is_local,
        k_sum, v_sum, count, sinks, window,
        block_table.stride(0), *key_cache.stride(), *value_cache.stride(),
        k_sum.stride(0), k_sum.stride(1),
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        TILE_SIZE=32,
    )
    return k_sum, v_sum, count


def razor_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    scale: float,
    head_is_local: torch.Tensor,
    sinks: int,
    window: int,
    k_sum: torch.Tensor | None = None,
    v_sum: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    compensation: str = "none",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `uniform_torch.razor_paged_attention`: same arguments and result (see its docstring).
    Differences: the output is computed with an online softmax in fp32 (agreement to fp32 rounding),
    and under the interpreter bf16 dot products are upcast to fp32 (`UPCAST_DOT`)."""
    check_compensation_args(compensation, k_sum, v_sum, count)
    if out is None:
        out = torch.empty_like(query)
    num_tokens, num_q_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    queries_per_kv = num_q_heads // num_kv_heads
    # Rows are (token, GQA head) pairs; tl.dot needs at least 16 rows.
    block_m = max(16, triton.next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv
    comp_code = _COMPENSATION_CODES[compensation]
    upcast_dot = _INTERPRETED and query.dtype == torch.bfloat16
    if comp_code == 0:
        # Never read: any tensor stands in for the pointers.
        k_sum = v_sum = count = seq_lens
        sum_strides = (0,) * 6
    else:
        sum_strides = (*k_sum.stride(), *v_sum.stride())
    # Enough programs for vLLM's block numbering (see _find_request); surplus ones exit at once.
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    _razor_attention_kernel[grid](
        out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
        head_is_local, k_sum, v_sum, count,
        scale, num_reqs, sinks, window,
        *query.stride(), *out.stride(), block_table.stride(0),
        *key_cache.stride(), *value_cache.stride(), *sum_strides,
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        TILE_SIZE=32,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        COMPENSATION=comp_code,
        # fp32 operands would otherwise go through TF32 on Ampere+; 16-bit ones ignore this.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or upcast_dot else "tf32",
        UPCAST_DOT=upcast_dot,
    )
    return out
