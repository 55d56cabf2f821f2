"""The retrieval heads' K/V write of one layer in the paged layout, in one Triton launch.

A layer's retrieval KV heads live in 1-head sibling caches (`[num_blocks, 1, P, 2*D]`, K in the first
D columns of a token's row, V in the last D), which vLLM may place in different KV-cache groups, hence
different slot mappings. `sibling_table` records, once per layer, each retrieval head's cache address
and slot-mapping address; `write_siblings` then copies every head's K/V of the step's tokens into its
sibling in one launch (grid: tokens x retrieval heads), skipping slot -1 (padding). Its oracle is
`uniform_torch.reshape_and_cache` per head. Runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .ring_triton import _TL_DTYPES

_COLUMNS = 5  # kv_head, cache address (bytes), block stride (elements), token row stride, slot mapping address


@dataclass(frozen=True, eq=False)
class SiblingHead:
    """One retrieval KV head of a layer: `kv_head` indexes key/value's head dim; `cache` is its sibling
    `[num_blocks, 1, P, 2*D]` (rows contiguous, any block stride); `slot_mapping` int64 `[>= tokens]`
    (slot = block * P + offset, -1 = no write) of the sibling's KV-cache group."""

    kv_head: int
    cache: torch.Tensor
    slot_mapping: torch.Tensor


def sibling_table(heads, device) -> torch.Tensor:
    """Descriptor table (int64 `[R, 5]` on `device`) of a layer's retrieval heads, built once and
    rebuilt only when vLLM re-binds a cache or a slot-mapping buffer. All heads share dtype, P and D."""
    if not heads:
        raise ValueError("sibling_table: no retrieval heads")
    first = heads[0].cache
    rows = []
    for i, h in enumerate(heads):
        c, sm = h.cache, h.slot_mapping
        if c.dim() != 4 or c.shape[1] != 1 or c.stride(3) != 1 or c.stride(2) != c.shape[3]:
            raise ValueError(f"sibling_table: head {i}: cache must be [num_blocks, 1, P, 2*D] with contiguous rows, "
                             f"got shape {tuple(c.shape)} strides {c.stride()}")
        if c.dtype != first.dtype or c.shape[2:] != first.shape[2:]:
            raise ValueError(f"sibling_table: head {i}: cache {c.dtype} {tuple(c.shape)} differs from head 0's "
                             f"{first.dtype} {tuple(first.shape)}")
        if c.dtype not in _TL_DTYPES:
            raise ValueError(f"sibling_table: unsupported KV dtype {c.dtype}")
        if sm.dtype != torch.int64 or sm.dim() != 1 or sm.stride(0) != 1:
            raise ValueError(f"sibling_table: head {i}: slot mapping must be a contiguous int64 vector, got "
                             f"{sm.dtype} shape {tuple(sm.shape)} strides {sm.stride()}")
        if c.device != torch.device(device) or sm.device != torch.device(device):
            raise ValueError(f"sibling_table: head {i}: cache on {c.device}, slot mapping on {sm.device}, "
                             f"table on {device}")
        rows.append([h.kv_head, c.data_ptr(), c.stride(0), c.stride(2), sm.data_ptr()])
    table = torch.tensor(rows, dtype=torch.int64, device=device)
    table._heads = tuple(heads)  # the addressed tensors live as long as the table
    return table


@triton.jit
def _write_siblings_kernel(table_ptr, key_ptr, value_ptr,
                           stride_kt: tl.int64, stride_kh: tl.int64, stride_kd: tl.int64,
                           stride_vt: tl.int64, stride_vh: tl.int64, stride_vd: tl.int64,
                           BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                           DTYPE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    row = table_ptr + j * 5
    slot = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.int64)) + t)
    if slot < 0:  # padding token (CUDA-graph padding, dummy batches)
        return
    h = tl.load(row)
    cache = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    dst = cache + (slot // BLOCK_SIZE) * tl.load(row + 2) + (slot % BLOCK_SIZE) * tl.load(row + 3)
    offs = tl.arange(0, D_PAD)
    m = offs < HEAD_DIM
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + offs * stride_kd, mask=m)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + offs * stride_vd, mask=m)
    tl.store(dst + offs, k.to(DTYPE), mask=m)
    tl.store(dst + HEAD_DIM + offs, v.to(DTYPE), mask=m)


def write_siblings(table: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_tokens: int) -> None:
    """Write `key`/`value` `[num_tokens, num_kv_heads, D]` (any strides) of the table's retrieval
    heads into their sibling caches at their slots; one launch, no host sync."""
    heads = table._heads
    if num_tokens <= 0 or not heads:
        return
    cache = heads[0].cache
    d = cache.shape[3] // 2
    if key.shape[2] != d or value.shape[2] != d:
        raise ValueError(f"write_siblings: head size {key.shape[2]} != the siblings' {d}")
    _write_siblings_kernel[(num_tokens, len(heads))](
        table, key, value, *key.stride(), *value.stride(),
        BLOCK_SIZE=cache.shape[2], HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), DTYPE=_TL_DTYPES[cache.dtype])
