"""razor_paged_attention (and compensation_sums feeding it) against a naive dense reference.

Both backends are tested: torch_ops always, triton_ops under the Triton interpreter on CPU
(``TRITON_INTERPRET=1``, set below before anything imports Triton; run with ``TRITON_INTERPRET=0``
on a CUDA machine to test the compiled kernels instead).

Every cache slot that the attention may not read (unwritten slots, the null block 0, and, once the
compensation sums are taken, the evicted positions of local heads) holds NaN, so an out-of-range
read shows up as a NaN in the output.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from razor_vllm.kernels import uniform_torch as torch_ops  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


# single_thread and backend fixtures: tests/kernels/conftest.py


@dataclass
class Batch:
    """A paged batch plus the dense per-request K/V it was built from."""

    query: torch.Tensor  # [num_tokens, num_q_heads, head_dim], strided view
    key_cache: torch.Tensor  # [num_blocks, num_kv_heads, block_size, head_dim], strided view
    value_cache: torch.Tensor
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    keys: list  # per request [seq_len, num_kv_heads, head_dim], dense
    values: list
    q_lens: list
    gqa: int

    def args(self):
        return (self.query, self.key_cache, self.value_cache, self.block_table, self.seq_lens,
                self.query_start_loc)


def make_batch(q_lens, ctx_lens, *, num_kv_heads=2, gqa=1, head_dim=16, block_size=16,
               dtype=torch.float32, layout="split", device="cpu", seed=0):
    """Random batch; request r has ctx_lens[r] cached tokens and q_lens[r] new ones.

    ``layout`` picks how K/V views share one buffer: ``"split"`` as vLLM's CPU backend
    (``[nb, H, 2 * bs, D]``, K rows then V rows per block) or ``"interleaved"``
    (``[nb, H, bs, 2D]``); the query is a strided view in the second case too.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    # Block 0 is vLLM's null block: it pads the block table and is never allocated.
    num_blocks = 1 + sum(blocks_per_req) + 2
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_table = torch.zeros(len(q_lens), max(blocks_per_req) + 1, dtype=torch.int32)
    for r, nb in enumerate(blocks_per_req):
        block_table[r, :nb] = torch.tensor([free.pop() for _ in range(nb)])

    if layout == "split":
        buf = torch.full((num_blocks, num_kv_heads, 2 * block_size, head_dim), float("nan"),
                         dtype=dtype)
        key_cache, value_cache = buf[:, :, :block_size], buf[:, :, block_size:]
    else:
        buf = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_dim), float("nan"),
                         dtype=dtype)
        key_cache, value_cache = buf[..., :head_dim], buf[..., head_dim:]

    keys, values = [], []
    for r, s in enumerate(seq_lens):
        k = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)
        for i in range(blocks_per_req[r]):
            rows = slice(i * block_size, min((i + 1) * block_size, s))
            n = rows.stop - rows.start
            b = int(block_table[r, i])
            key_cache[b, :, :n] = k[rows].transpose(0, 1)
            value_cache[b, :, :n] = v[rows].transpose(0, 1)
        keys.append(k)
        values.append(v)

    num_tokens = sum(q_lens)
    num_q_heads = num_kv_heads * gqa
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    if layout == "interleaved":
        query = torch.empty(num_tokens, num_q_heads, head_dim + 8, dtype=dtype)[..., :head_dim]
        query.copy_(q)
    else:
        query = q
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    batch = Batch(query, key_cache, value_cache, block_table,
                  torch.tensor(seq_lens, dtype=torch.int32), query_start_loc, keys, values,
                  list(q_lens), gqa)
    if device != "cpu":
        # .to() keeps the caches strided views of one buffer only if the buffer moves as a whole.
        buf = buf.to(device)
        if layout == "split":
            batch.key_cache, batch.value_cache = buf[:, :, :block_size], buf[:, :, block_size:]
        else:
            batch.key_cache, batch.value_cache = buf[..., :head_dim], buf[..., head_dim:]
        for name in ("query", "block_table", "seq_lens", "query_start_loc"):
            setattr(batch, name, getattr(batch, name).to(device))
    return batch


def frontier(batch, r, sinks, window):
    start = int(batch.seq_lens[r]) - batch.q_lens[r]
    return max(sinks, start - window + 1)


def reference_attention(batch, head_is_local, sinks, window, compensation, scale):
    """Dense fp64 RazorAttention, straight from the definition, one query head at a time."""
    num_tokens, num_q_heads, _ = batch.query.shape
    out = torch.empty(batch.query.shape, dtype=torch.float64)
    query = batch.query.cpu().double()
    q_begin = 0
    for r, q_len in enumerate(batch.q_lens):
        seq_len = int(batch.seq_lens[r])
        start = seq_len - q_len
        f = frontier(batch, r, sinks, window)
        n = f - sinks
        keys, values = batch.keys[r].double(), batch.values[r].double()
        q = query[q_begin:q_begin + q_len]
        j = torch.arange(seq_len)
        causal = j[None, :] <= torch.arange(start, seq_len)[:, None]
        for hq in range(num_q_heads):
            h = hq // batch.gqa
            local = bool(head_is_local[h])
            visible = causal & ((j < sinks) | (j >= f))[None, :] if local else causal
            logits = (scale * q[:, hq] @ keys[:, h].T).masked_fill(~visible, float("-inf"))
            vals = values[:, h]
            if local and compensation != "none" and n > 0:
                k_hat = keys[sinks:f, h].mean(0)
                v_hat = values[sinks:f, h].mean(0)
                bias = math.log(n) if compensation == "count" else 0.0
                logits = torch.cat([logits, (scale * q[:, hq] @ k_hat + bias)[:, None]], dim=1)
                vals = torch.cat([vals, v_hat[None]], dim=0)
            out[q_begin:q_begin + q_len, hq] = torch.softmax(logits, dim=-1) @ vals
        q_begin += q_len
    return out


def poison_evicted(batch, head_is_local, sinks, window):
    """NaN the evicted positions [sinks, F_r) of local heads: attention must not read them."""
    block_size = batch.key_cache.shape[2]
    local = head_is_local.nonzero().flatten().tolist()
    for r in range(len(batch.q_lens)):
        for t in range(sinks, frontier(batch, r, sinks, window)):
            b = int(batch.block_table[r, t // block_size])
            for cache in (batch.key_cache, batch.value_cache):
                cache[b, local, t % block_size] = float("nan")


def run_razor(backend, batch, head_is_local, sinks, window, compensation, scale, poison=True):
    ops = backend.ops
    head_is_local = head_is_local.to(backend.device)
    k_sum, v_sum, count = ops.compensation_sums(
        batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens,
        batch.query_start_loc, head_is_local, sinks, window,
    )
    if poison:
        poison_evicted(batch, head_is_local, sinks, window)
    return ops.razor_paged_attention(
        *batch.args(), scale=scale, head_is_local=head_is_local, sinks=sinks, window=window,
        k_sum=k_sum, v_sum=v_sum, count=count, compensation=compensation,
    )


def assert_close(actual, expected, dtype):
    tol = TOLERANCES[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.cpu().double(), expected.double(), atol=tol, rtol=tol)


# name -> (query lens, cached tokens before this step)
SCENARIOS = {
    "decode": ([1, 1, 1], [40, 7, 150]),
    "prefill": ([12, 5], [0, 0]),
    "chunked": ([9, 4], [45, 30]),
    "mixed": ([1, 11, 1, 4], [60, 0, 3, 37]),
}

# (GQA ratio, head_dim, block_size, dtype, cache layout, head_is_local)
CONFIGS = [
    pytest.param(1, 16, 16, torch.float32, "split", (True, False), id="gqa1-d16-bs16-fp32"),
    pytest.param(3, 64, 32, torch.bfloat16, "interleaved", (False, True), id="gqa3-d64-bs32-bf16"),
    pytest.param(4, 16, 32, torch.float16, "split", (True, True), id="gqa4-d16-bs32-fp16"),
    pytest.param(4, 64, 16, torch.float32, "interleaved", (True, False), id="gqa4-d64-bs16-fp32"),
]

# (sinks, window, compensation); a window of 1000 exceeds every sequence: nothing is evicted.
RAZOR_PARAMS = [
    pytest.param(0, 8, "none", id="s0-w8-none"),
    pytest.param(4, 8, "single", id="s4-w8-single"),
    pytest.param(4, 8, "count", id="s4-w8-count"),
    pytest.param(0, 3, "count", id="s0-w3-count"),
    pytest.param(4, 3, "none", id="s4-w3-none"),
    pytest.param(4, 1000, "count", id="s4-w1000-count"),
]


@pytest.mark.parametrize("sinks,window,compensation", RAZOR_PARAMS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("gqa,head_dim,block_size,dtype,layout,local", CONFIGS)
def test_matches_reference(backend, gqa, head_dim, block_size, dtype, layout, local, scenario,
                           sinks, window, compensation):
    q_lens, ctx_lens = SCENARIOS[scenario]
    batch = make_batch(q_lens, ctx_lens, num_kv_heads=len(local), gqa=gqa, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, layout=layout, device=backend.device)
    head_is_local = torch.tensor(local)
    scale = head_dim ** -0.5
    expected = reference_attention(batch, head_is_local, sinks, window, compensation, scale)
    out = run_razor(backend, batch, head_is_local, sinks, window, compensation, scale)
    assert_close(out, expected, dtype)


def test_writes_into_strided_out(backend):
    batch = make_batch([3, 1], [20, 33], gqa=2, device=backend.device)
    head_is_local = torch.tensor([True, False])
    expected = reference_attention(batch, head_is_local, 4, 8, "count", 0.25)
    num_tokens, num_q_heads, head_dim = batch.query.shape
    buf = torch.zeros(num_tokens, num_q_heads, 2 * head_dim, device=backend.device)
    out = buf[..., head_dim:]
    k_sum, v_sum, count = backend.ops.compensation_sums(
        batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens,
        batch.query_start_loc, head_is_local.to(backend.device), 4, 8,
    )
    ret = backend.ops.razor_paged_attention(
        *batch.args(), scale=0.25, head_is_local=head_is_local.to(backend.device), sinks=4,
        window=8, k_sum=k_sum, v_sum=v_sum, count=count, compensation="count", out=out,
    )
    assert ret.data_ptr() == out.data_ptr()
    assert_close(out, expected, torch.float32)
    assert torch.all(buf[..., :head_dim] == 0)


@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_retrieval_equals_causal_equals_unbounded_window(backend, gqa):
    """All-retrieval == plain causal paged attention == all-local with window >= seq_len."""
    batch = make_batch([1, 12, 5], [30, 0, 21], gqa=gqa, block_size=16, device=backend.device)
    scale = 0.25
    all_retrieval = run_razor(backend, batch, torch.tensor([False, False]), 4, 8, "count", scale)
    unbounded = run_razor(backend, batch, torch.tensor([True, True]), 4, 10_000, "count", scale)

    # Plain causal attention via SDPA over the dense K/V, independent of the Razor code paths.
    causal = torch.empty(batch.query.shape)
    q_begin = 0
    for r, q_len in enumerate(batch.q_lens):
        seq_len = int(batch.seq_lens[r])
        q = batch.query[q_begin:q_begin + q_len].cpu().transpose(0, 1)
        k = batch.keys[r].repeat_interleave(gqa, dim=1).transpose(0, 1)
        v = batch.values[r].repeat_interleave(gqa, dim=1).transpose(0, 1)
        mask = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - q_len, seq_len)[:, None]
        causal[q_begin:q_begin + q_len] = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
        q_begin += q_len

    assert_close(all_retrieval, causal, torch.float32)
    assert_close(unbounded, causal, torch.float32)


def test_window_one_decode_attends_to_itself(backend):
    """sinks=0, window=1, no compensation: a local decode query sees only its own key."""
    gqa = 2
    batch = make_batch([1, 1, 1], [0, 9, 40], gqa=gqa, device=backend.device)
    out = run_razor(backend, batch, torch.tensor([True, True]), 0, 1, "none", 0.25).cpu()
    for r in range(3):
        own_value = batch.values[r][-1].repeat_interleave(gqa, dim=0)  # [num_q_heads, head_dim]
        torch.testing.assert_close(out[r], own_value, atol=1e-6, rtol=0)


def test_count_and_single_differ_only_with_evicted_tokens(backend):
    # sinks 4, window 8: request 0 (start 3) evicts nothing, request 1 (start 40) evicts 29.
    batch = make_batch([1, 1], [3, 40], gqa=2, device=backend.device)
    head_is_local = torch.tensor([True, False])
    single = run_razor(backend, batch, head_is_local, 4, 8, "single", 0.25, poison=False).cpu()
    count = run_razor(backend, batch, head_is_local, 4, 8, "count", 0.25, poison=False).cpu()
    local_q_heads, retrieval_q_heads = slice(0, 2), slice(2, 4)
    torch.testing.assert_close(single[0], count[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(single[1, retrieval_q_heads], count[1, retrieval_q_heads],
                               atol=1e-6, rtol=0)
    assert (single[1, local_q_heads] - count[1, local_q_heads]).abs().max() > 1e-2


@pytest.mark.parametrize("compensation,match", [("mean", "one of"), ("count", "needs k_sum")])
def test_rejects_bad_compensation_args(backend, compensation, match):
    batch = make_batch([1], [5], device=backend.device)
    with pytest.raises(ValueError, match=match):
        backend.ops.razor_paged_attention(
            *batch.args(), scale=0.25, head_is_local=torch.tensor([True, True]), sinks=0,
            window=4, compensation=compensation,
        )
