"""reshape_and_cache and compensation_sums against dense references, plus the package's lazy
Triton import.

Both backends are tested: torch_ops always, triton_ops under the Triton interpreter on CPU
(``TRITON_INTERPRET=1``, set below before anything imports Triton; run with ``TRITON_INTERPRET=0``
on a CUDA machine to test the compiled kernels instead).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from razor_vllm.kernels import uniform_torch as torch_ops  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"


# single_thread and backend fixtures: tests/kernels/conftest.py


def make_caches(num_blocks, num_kv_heads, block_size, head_dim, dtype, layout, device):
    """NaN-filled K/V caches as strided views of one buffer (vLLM CPU or CUDA-like layout)."""
    if layout == "split":
        buf = torch.full((num_blocks, num_kv_heads, 2 * block_size, head_dim), float("nan"),
                         dtype=dtype, device=device)
        return buf[:, :, :block_size], buf[:, :, block_size:]
    buf = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_dim), float("nan"),
                     dtype=dtype, device=device)
    return buf[..., :head_dim], buf[..., head_dim:]


def random_block_table(seq_lens, block_size, gen):
    """int32 [num_reqs, max_blocks + 1] over a random permutation of blocks 1..; block 0 is the
    null block (vLLM's padding entry), never allocated. Returns (block_table, num_blocks)."""
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(blocks_per_req) + 3
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_table = torch.zeros(len(seq_lens), max(blocks_per_req) + 1, dtype=torch.int32)
    for r, nb in enumerate(blocks_per_req):
        block_table[r, :nb] = torch.tensor([free.pop() for _ in range(nb)])
    return block_table, num_blocks


def dense_rows(cache, block_table_row, seq_len):
    """[seq_len, num_kv_heads, head_dim]: one request's rows read back through its block table."""
    block_size = cache.shape[2]
    return torch.stack([cache[int(block_table_row[t // block_size]), :, t % block_size]
                        for t in range(seq_len)])


@pytest.mark.parametrize("layout", ["split", "interleaved"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 16), (3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_reshape_and_cache_round_trip(backend, dtype, num_kv_heads, head_dim, block_size, layout):
    gen = torch.Generator().manual_seed(1)
    seq_lens = [37, 5, 16]
    block_table, num_blocks = random_block_table(seq_lens, block_size, gen)
    key_cache, value_cache = make_caches(num_blocks, num_kv_heads, block_size, head_dim, dtype,
                                         layout, backend.device)

    # The whole of each sequence is written in two steps (a prefill, then a mixed chunk), with
    # padding tokens (slot -1) between requests and two trailing rows past the slot mapping.
    keys = [torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype) for s in seq_lens]
    values = [torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype) for s in seq_lens]
    garbage = torch.full((1, num_kv_heads, head_dim), 123.0, dtype=dtype)
    for lo_frac, hi_frac in ((0.0, 0.5), (0.5, 1.0)):
        k_rows, v_rows, slots = [], [], []
        for r, s in enumerate(seq_lens):
            lo, hi = int(s * lo_frac), int(s * hi_frac)
            k_rows += [keys[r][lo:hi], garbage]
            v_rows += [values[r][lo:hi], garbage]
            slots += [int(block_table[r, t // block_size]) * block_size + t % block_size
                      for t in range(lo, hi)]
            slots.append(-1)
        k = torch.cat(k_rows + [garbage, garbage])
        v = torch.cat(v_rows + [garbage, garbage])
        # Strided inputs, as K/V slices of a fused QKV projection output.
        qkv = torch.cat([torch.zeros_like(k), k, v], dim=-1).to(backend.device)
        backend.ops.reshape_and_cache(
            qkv[..., head_dim:2 * head_dim], qkv[..., 2 * head_dim:], key_cache, value_cache,
            torch.tensor(slots, dtype=torch.int64, device=backend.device),
        )

    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for r, s in enumerate(seq_lens):
        torch.testing.assert_close(dense_rows(key_cache.cpu(), block_table[r], s), keys[r],
                                   atol=0, rtol=0)
        torch.testing.assert_close(dense_rows(value_cache.cpu(), block_table[r], s), values[r],
                                   atol=0, rtol=0)
        for t in range(s):
            written[int(block_table[r, t // block_size]), t % block_size] = True
    # Every other slot, the null block 0 included, still holds its NaN fill.
    for cache in (key_cache, value_cache):
        assert torch.isnan(cache.cpu().permute(0, 2, 1, 3)[~written]).all()
    assert not written[0].any()


# name -> (query lens, cached tokens before this step)
SCENARIOS = {
    "decode": ([1, 1, 1], [40, 7, 150]),
    "prefill": ([12, 5], [0, 0]),
    "chunked": ([9, 4], [45, 30]),
    "mixed": ([1, 11, 1, 4], [60, 0, 3, 37]),
}


@pytest.mark.parametrize("sinks,window", [(0, 8), (4, 8), (4, 1), (4, 1000)])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype,block_size,head_dim,layout", [
    pytest.param(torch.float32, 16, 16, "split", id="fp32-bs16-d16"),
    pytest.param(torch.bfloat16, 32, 64, "interleaved", id="bf16-bs32-d64"),
    pytest.param(torch.float16, 16, 64, "split", id="fp16-bs16-d64"),
])
def test_compensation_sums_matches_reference(backend, dtype, block_size, head_dim, layout,
                                             scenario, sinks, window):
    gen = torch.Generator().manual_seed(2)
    q_lens, ctx_lens = SCENARIOS[scenario]
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    head_is_local = torch.tensor([True, False, True])
    block_table, num_blocks = random_block_table(seq_lens, block_size, gen)
    key_cache, value_cache = make_caches(num_blocks, 3, block_size, head_dim, dtype, layout, "cpu")
    keys, values = [], []
    for r, s in enumerate(seq_lens):
        keys.append(torch.randn(s, 3, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(s, 3, head_dim, generator=gen).to(dtype))
        for t in range(s):
            b = int(block_table[r, t // block_size])
            key_cache[b, :, t % block_size] = keys[r][t]
            value_cache[b, :, t % block_size] = values[r][t]

    def on_device(x):
        return x.to(backend.device)

    query_start_loc = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    k_sum, v_sum, count = backend.ops.compensation_sums(
        on_device(key_cache), on_device(value_cache), on_device(block_table),
        on_device(torch.tensor(seq_lens, dtype=torch.int32)), on_device(query_start_loc),
        on_device(head_is_local), sinks, window,
    )

    assert k_sum.dtype == v_sum.dtype == torch.float32 and count.dtype == torch.int32
    expected_k = torch.zeros(len(seq_lens), 3, head_dim, dtype=torch.float64)
    expected_v = torch.zeros_like(expected_k)
    expected_count = []
    for r, (q_len, s) in enumerate(zip(q_lens, seq_lens)):
        frontier = max(sinks, s - q_len - window + 1)
        expected_count.append(frontier - sinks)
        expected_k[r, head_is_local] = keys[r][sinks:frontier, head_is_local].double().sum(0)
        expected_v[r, head_is_local] = values[r][sinks:frontier, head_is_local].double().sum(0)
    assert count.cpu().tolist() == expected_count
    torch.testing.assert_close(k_sum.cpu().double(), expected_k, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(v_sum.cpu().double(), expected_v, atol=1e-4, rtol=1e-5)


def test_package_import_and_cpu_dispatch_never_import_triton(tmp_path):
    """``import razor_vllm.kernels`` and the CPU implementation it selects stay Triton-free."""
    script = textwrap.dedent("""
        import sys
        import torch
        import razor_vllm.kernels as kernels
        assert "triton" not in sys.modules, "import pulled in triton"
        key_cache = torch.zeros(2, 1, 4, 8)
        value_cache = torch.zeros(2, 1, 4, 8)
        kv = torch.ones(1, 1, 8)
        ops = kernels.uniform_ops(kernels.uniform_impl_for(key_cache.device))
        assert ops.__name__.endswith("uniform_torch")
        ops.reshape_and_cache(kv, kv, key_cache, value_cache, torch.tensor([4]))
        out = ops.razor_paged_attention(
            torch.ones(1, 2, 8), key_cache, value_cache, torch.tensor([[1]], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
            scale=1.0, head_is_local=torch.tensor([True]), sinks=0, window=4)
        assert torch.equal(out, torch.ones(1, 2, 8)), out
        assert "triton" not in sys.modules, "CPU dispatch pulled in triton"
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
