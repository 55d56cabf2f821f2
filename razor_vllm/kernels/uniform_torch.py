"""PyTorch implementations of the RazorAttention paged-attention operators.

This module is both the CPU serving path (vLLM's CPU backend has no Triton) and the oracle that the
Triton kernels in :mod:`razor_vllm.kernels.uniform_triton` are tested against; both modules expose the
same functions with the same signatures.

Paged KV cache
    ``key_cache`` / ``value_cache``: ``[num_blocks, num_kv_heads, block_size, head_dim]`` with
    arbitrary strides (they are views into one vLLM buffer and are never made contiguous). Token
    position ``t`` of request ``r`` lives in block ``block_table[r, t // block_size]`` at offset
    ``t % block_size``; its slot id is ``block * block_size + offset``.

Batch (vLLM varlen convention)
    ``query_start_loc``: int32 ``[num_reqs + 1]``, request ``r`` owns query rows
    ``query_start_loc[r]:query_start_loc[r + 1]``. ``seq_lens``: int32 ``[num_reqs]``, tokens in
    the cache including this step's (already cached) new tokens. Query row ``i`` of request ``r`` is
    at absolute position ``seq_lens[r] - q_len_r + i``.

RazorAttention
    With ``start_r = seq_lens[r] - q_len_r`` the frontier of request ``r`` is
    ``F_r = max(sinks, start_r - window + 1)`` and ``n_r = F_r - sinks`` tokens are evicted.
    Retrieval heads (``head_is_local[h] == False``) attend causally to every key. A local head at
    position ``p`` attends to keys ``j <= p`` with ``j < sinks`` or ``j >= F_r``, plus, when
    compensation is on and ``n_r > 0``, one compensation key/value pair: the fp32 means of the
    evicted keys/values ``[sinks, F_r)``, with logit ``scale * q . k_hat + bias`` where ``bias`` is
    ``ln(n_r)`` for ``"count"`` and ``0`` for ``"single"``.
"""

from __future__ import annotations

import math

import torch

from razor_vllm.config import COMPENSATION_MODES
from razor_vllm.reference import frontier

# Upper bound on the fp32 logits materialised at once per (request, head group). Long prefills are
# split into query chunks so that an 8k-token prompt stays within a few hundred MB.
_MAX_LOGITS_PER_CHUNK = 1 << 24


def check_compensation_args(compensation: str, k_sum, v_sum, count) -> None:
    """Raise ``ValueError`` for an unknown ``compensation`` mode, or a mode other than ``"none"``
    without the ``k_sum``/``v_sum``/``count`` outputs of ``compensation_sums``."""
    if compensation not in COMPENSATION_MODES:
        raise ValueError(f"compensation must be one of {COMPENSATION_MODES}, got {compensation!r}")
    if compensation != "none" and (k_sum is None or v_sum is None or count is None):
        raise ValueError(f"compensation={compensation!r} needs k_sum, v_sum and count")


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
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block_size = key_cache.shape[2]
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots % block_size
    # Advanced indices separated by a slice put the token dimension first: the indexed view is
    # [n, num_kv_heads, head_dim], the shape of the rows being written.
    key_cache[blocks, :, offsets] = key[:num_tokens][valid].to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value[:num_tokens][valid].to(value_cache.dtype)


def _frontiers(
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, sinks: int, window: int
) -> torch.Tensor:
    """Per-request frontier ``F_r = max(sinks, seq_lens[r] - q_len_r - window + 1)``.

    Returns an int64 tensor ``[num_reqs]`` on the device of ``seq_lens``.
    """
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    starts = seq_lens.long() - q_lens
    return torch.clamp(starts - window + 1, min=sinks)  # reference.frontier, batched


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
    _, num_kv_heads, _, head_dim = key_cache.shape
    device = key_cache.device
    k_sum = torch.zeros(num_reqs, num_kv_heads, head_dim, dtype=torch.float32, device=device)
    v_sum = torch.zeros_like(k_sum)
    frontiers = _frontiers(seq_lens, query_start_loc, sinks, window)
    count = (frontiers - sinks).to(torch.int32)
    local_heads = head_is_local.nonzero().flatten()
    if local_heads.numel() == 0:
        return k_sum, v_sum, count
    for r, f in enumerate(frontiers.tolist()):
        if f <= sinks:
            continue
        positions = torch.arange(sinks, f, device=device)
        keys = _gather(key_cache, block_table[r], positions, local_heads)
        values = _gather(value_cache, block_table[r], positions, local_heads)
        k_sum[r, local_heads] = keys.sum(0, dtype=torch.float32)
        v_sum[r, local_heads] = values.sum(0, dtype=torch.float32)
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
        ``[num_tokens, num_q_heads, head_dim]``; query head ``hq`` reads KV head
        ``hq // (num_q_heads // num_kv_heads)``.
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, num_kv_heads, block_size, head_dim]``, any strides, already holding this
        step's keys and values.
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
        ``[num_tokens, num_q_heads, head_dim]``, written in place when given.

    Returns
    -------
    torch.Tensor
        ``[num_tokens, num_q_heads, head_dim]`` in the dtype of ``query`` (``out`` if given).
    """
    check_compensation_args(compensation, k_sum, v_sum, count)
    if out is None:
        out = torch.empty_like(query)
    num_q_heads = query.shape[1]
    num_kv_heads = key_cache.shape[1]
    group = num_q_heads // num_kv_heads
    device = query.device
    # Retrieval and local heads need different key sets, so each kind is one batched computation
    # over its KV heads (and the GQA query heads that read them).
    head_groups = []
    for is_local, kv_heads in ((False, (~head_is_local).nonzero().flatten()),
                               (True, head_is_local.nonzero().flatten())):
        if kv_heads.numel():
            q_heads = (kv_heads[:, None] * group + torch.arange(group, device=device)).flatten()
            head_groups.append((is_local, kv_heads, q_heads))
    use_compensation = compensation != "none"
    counts = count.tolist() if use_compensation else None
    starts_loc = query_start_loc.tolist()
    for r, seq_len in enumerate(seq_lens.tolist()):
        q_begin, q_end = starts_loc[r], starts_loc[r + 1]
        if q_end == q_begin:
            continue
        start = seq_len - (q_end - q_begin)
        first_exact = frontier(start, sinks, window)
        for is_local, kv_heads, q_heads in head_groups:
            if is_local:
                positions = torch.cat([
                    torch.arange(min(sinks, seq_len), device=device),
                    torch.arange(first_exact, seq_len, device=device),
                ])
            else:
                positions = torch.arange(seq_len, device=device)
            comp = None
            if is_local and use_compensation and counts[r] > 0:
                n = counts[r]
                bias = math.log(n) if compensation == "count" else 0.0
                comp = (k_sum[r, kv_heads] / n, v_sum[r, kv_heads] / n, bias)
            out[q_begin:q_end, q_heads] = _attend(
                query[q_begin:q_end, q_heads], key_cache, value_cache, block_table[r],
                positions, kv_heads, start, scale, comp,
            ).to(out.dtype)
    return out


def _gather(
    cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor, kv_heads: torch.Tensor
) -> torch.Tensor:
    """Rows of one request's cache: ``[len(positions), len(kv_heads), head_dim]``, cache dtype."""
    block_size = cache.shape[2]
    blocks = block_row[torch.div(positions, block_size, rounding_mode="floor")].long()
    offsets = positions % block_size
    return cache[blocks[:, None], kv_heads[None, :], offsets[:, None]]


def _attend(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_row: torch.Tensor,
    positions: torch.Tensor,
    kv_heads: torch.Tensor,
    start: int,
    scale: float,
    comp: tuple[torch.Tensor, torch.Tensor, float] | None,
) -> torch.Tensor:
    """Causal attention of one request's queries over its cached keys at ``positions``.

    ``query``: ``[q_len, len(kv_heads) * group, head_dim]``, the GQA query heads of ``kv_heads``
    in order; ``positions``: sorted int64 ``[num_keys]``; ``start``: absolute position of the
    first query; ``comp``: ``(k_hat, v_hat, bias)``, ``k_hat``/``v_hat`` fp32
    ``[len(kv_heads), head_dim]``, an extra key visible to every query. Returns fp32
    ``[q_len, len(kv_heads) * group, head_dim]``.
    """
    q_len, num_heads, head_dim = query.shape
    num_kv = kv_heads.numel()
    group = num_heads // num_kv
    # The compensation pair goes first with position -1: it is then visible to every query under
    # the causal test, and each query chunk's keys stay a prefix of the key list.
    first = 0 if comp is None else 1
    key_pos = positions if comp is None else torch.cat([positions.new_full((1,), -1), positions])
    # [num_kv, num_keys, head_dim] in fp32, the accumulation precision.
    keys = torch.empty(num_kv, key_pos.numel(), head_dim, dtype=torch.float32,
                       device=query.device)
    values = torch.empty_like(keys)
    keys[:, first:] = _gather(key_cache, block_row, positions, kv_heads).transpose(0, 1)
    values[:, first:] = _gather(value_cache, block_row, positions, kv_heads).transpose(0, 1)
    if comp is not None:
        keys[:, 0], values[:, 0] = comp[0], comp[1]
    # [num_kv, group, q_len, head_dim]: the query heads sharing a KV head form one matmul.
    q = query.float().view(q_len, num_kv, group, head_dim).permute(1, 2, 0, 3)
    q_pos = torch.arange(start, start + q_len, device=query.device)
    out = torch.empty(q_len, num_kv, group, head_dim, dtype=torch.float32, device=query.device)
    chunk = max(1, _MAX_LOGITS_PER_CHUNK // (num_heads * key_pos.numel()))
    for c0 in range(0, q_len, chunk):
        c1 = min(c0 + chunk, q_len)
        # Keys past the chunk's last query are invisible to all of it: use the prefix only.
        num_keys = int(torch.searchsorted(key_pos, start + c1 - 1, right=True))
        qc = q[:, :, c0:c1].reshape(num_kv, group * (c1 - c0), head_dim)
        logits = torch.bmm(qc, keys[:, :num_keys].transpose(1, 2)).mul_(scale)
        logits = logits.view(num_kv, group, c1 - c0, num_keys)
        if comp is not None:
            logits[..., 0] += comp[2]
        hidden = key_pos[None, :num_keys] > q_pos[c0:c1, None]
        probs = torch.softmax(logits.masked_fill_(hidden, float("-inf")), dim=-1)
        oc = torch.bmm(probs.view(num_kv, -1, num_keys), values[:, :num_keys])
        out[c0:c1] = oc.view(num_kv, group, c1 - c0, head_dim).permute(2, 0, 1, 3)
    return out.view(q_len, num_heads, head_dim)
