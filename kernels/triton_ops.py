"""Triton kernels for the RazorAttention paged-attention operators.

Same functions and signatures as :mod:`razor_vllm.kernels.torch_ops`, whose module docstring
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

from .torch_ops import check_compensation_args

_COMPENSATION_CODES = {"none": 0, "single": 1, "count": 2}


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
    """Write this step's keys and values into the paged cache, in place.

    Parameters
    ----------
    key, value : torch.Tensor
        ``[num_tokens, num_kv_heads, head_dim]``, any strides. Rows past ``slot_mapping.shape[0]``
        (vLLM pads the batch) are ignored.
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, num_kv_heads, block_size, head_dim]``, any strides; written in place.
    slot_mapping : torch.Tensor
        int64 ``[num_tokens]``, slot id of each token; a negative slot marks a padding token, which
        is skipped.
    """
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
    """Sum the keys and values that local heads evict in this step.

    The sums are recomputed from the cache (stateless), which is exact as long as every head keeps
    its full cache allocated. :func:`razor_paged_attention` divides them by ``count``.

    Parameters
    ----------
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, num_kv_heads, block_size, head_dim]``, any strides.
    block_table : torch.Tensor
        int32 ``[num_reqs, max_blocks_per_req]``.
    seq_lens : torch.Tensor
        int32 ``[num_reqs]``.
    query_start_loc : torch.Tensor
        int32 ``[num_reqs + 1]``.
    head_is_local : torch.Tensor
        bool ``[num_kv_heads]``, ``False`` for retrieval heads.
    sinks, window : int
        ``sinks >= 0``, ``window >= 1``.

    Returns
    -------
    k_sum, v_sum : torch.Tensor
        fp32 ``[num_reqs, num_kv_heads, head_dim]``: sums over positions ``[sinks, F_r)`` for local
        heads, zeros for retrieval heads.
    count : torch.Tensor
        int32 ``[num_reqs]``, ``n_r = F_r - sinks``.
    """
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
    """RazorAttention over a paged KV cache: full causal attention for retrieval heads, sinks +
    recent window + compensation token for local heads.

    Parameters
    ----------
    query : torch.Tensor
        ``[num_tokens, num_q_heads, head_dim]``, any strides; query head ``hq`` reads KV head
        ``hq // (num_q_heads // num_kv_heads)``.
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, num_kv_heads, block_size, head_dim]``, any strides, already holding this
        step's keys and values; same dtype as ``query``.
    block_table : torch.Tensor
        int32 ``[num_reqs, max_blocks_per_req]``.
    seq_lens : torch.Tensor
        int32 ``[num_reqs]``.
    query_start_loc : torch.Tensor
        int32 ``[num_reqs + 1]``.
    scale : float
        Softmax scale.
    head_is_local : torch.Tensor
        bool ``[num_kv_heads]``, ``False`` for retrieval heads.
    sinks, window : int
        ``sinks >= 0``, ``window >= 1``.
    k_sum, v_sum : torch.Tensor, optional
        fp32 ``[num_reqs, num_kv_heads, head_dim]`` from :func:`compensation_sums`; only read when
        ``compensation != "none"``.
    count : torch.Tensor, optional
        int32 ``[num_reqs]`` from :func:`compensation_sums`; the compensation token of request
        ``r`` is present iff ``count[r] > 0``.
    compensation : str
        ``"none"``, ``"single"`` (bias 0) or ``"count"`` (bias ``ln(count[r])``).
    out : torch.Tensor, optional
        ``[num_tokens, num_q_heads, head_dim]``, any strides, written in place when given.

    Returns
    -------
    torch.Tensor
        ``[num_tokens, num_q_heads, head_dim]`` in the dtype of ``query`` (``out`` if given).
    """
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


# --------------------------------------------------------------------------------------------------
# Ring decode (kv_layout="paged"): the decode step of the local heads on their ring regions
# --------------------------------------------------------------------------------------------------
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
