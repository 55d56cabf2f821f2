"""ring_decode (batched decode over every local head of a layer and every decoding request), all three
implementations: `ring_ops.ring_decode` (PyTorch), `cpu_ops.ring_decode` (the fused C++ op) and
`ring_triton.ring_decode` (under the Triton interpreter on CPU tensors), against
the per-(request, head) `ring_step` it replaces and against the dense oracle
`razor_vllm.reference.razor_attention_dense`.

Regions live in several page tensors (a layer's local heads sit in its own page and in sibling
pages, at different offsets), requests are at different points of their life (inside the sinks,
window not yet full, ring wrapped), pages start dirty (vLLM does not zero ring pages).
"""

from __future__ import annotations

import os

import pytest
import torch

from razor_vllm.kernels import ring_cpp as cpu_ops, ring_torch as ring_ops
from razor_vllm.kernels.ring_layout import RingLayout
from razor_vllm.reference import razor_attention_dense

G = 3


def _fused(*args, **kwargs):
    if not cpu_ops.load():
        pytest.fail("the fused CPU op did not build/load (see the warning above; needs g++)")
    return cpu_ops.ring_decode(*args, **kwargs)


def _triton(*args, **kwargs):
    # conftest sets TRITON_INTERPRET=1 unless told otherwise: CPU tensors go through the interpreter
    pytest.importorskip("triton", reason="triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("these tests use CPU tensors: compiled Triton needs TRITON_INTERPRET=1 here")
    from razor_vllm.kernels import ring_triton

    return ring_triton.ring_decode(*args, **kwargs)


@pytest.fixture(params=["torch", "fused", "triton"])
def ring_decode(request):
    return {"torch": ring_ops.ring_decode, "fused": _fused, "triton": _triton}[request.param]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _setup(sinks, window, d, dtype, starts, num_heads, seed):
    """Pages with one region per (head, request), each replayed with ring_step through `start`
    tokens (prefill of a random size, then decode steps). Returns everything a test needs."""
    gen = torch.Generator().manual_seed(seed)
    ring = RingLayout(sinks, window, d, dtype)
    b = len(starts)
    num_blocks = b + 3
    offsets = [0, ring.slots + 1, 5][:num_heads]  # heads at different slots of their pages
    pages = [(torch.randn(num_blocks, 2 * ring.slots + 8, 2 * d, generator=gen) * 7).to(dtype)
             for _ in range(num_heads)]
    # int32 like vLLM's block tables
    blocks = [(torch.randperm(num_blocks - 1, generator=gen)[:b] + 1).to(torch.int32) for _ in range(num_heads)]
    total = max(starts) + 4
    k_all = torch.randn(num_heads, b, total, d, generator=gen).to(dtype)
    v_all = torch.randn(num_heads, b, total, d, generator=gen).to(dtype)
    q_all = torch.randn(num_heads, b, total, G, d, generator=gen).to(dtype)
    for x in range(num_heads):
        for i, st in enumerate(starts):
            region = ring.region(pages[x][blocks[x][i]], offsets[x])
            pos = 0
            first = int(torch.randint(1, st + 1, (1,), generator=gen))  # prompt, then decodes
            for c in [first] + [1] * (st - first):
                ring_ops.ring_step(region, ring, q_all[x, i, pos:pos + c], k_all[x, i, pos:pos + c],
                                   v_all[x, i, pos:pos + c], pos, scale=d ** -0.5, compensation="count")
                pos += c
    return ring, pages, offsets, blocks, k_all, v_all, q_all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("compensation", ["single", "count", "none"])
@pytest.mark.parametrize("sinks,window,starts", [
    (4, 8, [1, 3, 4, 5, 11, 12, 13, 40, 41]),   # inside the sinks, filling, full, wrapped
    (0, 5, [1, 2, 4, 5, 6, 23]),                # no sinks
    (2, 1, [1, 2, 3, 9]),                        # W = 1: the token is folded at once, never written
    (4, 32, [7, 35, 36, 37, 100]),
])
@pytest.mark.parametrize("num_heads", [1, 3])
def test_ring_decode_equals_ring_step(ring_decode, dtype, compensation, sinks, window, starts, num_heads):
    d = 16
    ring, pages, offsets, blocks, k_all, v_all, q_all = _setup(sinks, window, d, dtype, starts, num_heads, seed=1)
    ref_pages = [p.clone() for p in pages]
    st = torch.tensor(starts)
    q = torch.stack([q_all[x, torch.arange(len(starts)), st] for x in range(num_heads)], dim=1)  # [B, X, G, D]
    k = torch.stack([k_all[x, torch.arange(len(starts)), st] for x in range(num_heads)], dim=1)  # [B, X, D]
    v = torch.stack([v_all[x, torch.arange(len(starts)), st] for x in range(num_heads)], dim=1)
    scale = d ** -0.5
    ref = torch.empty_like(q)
    for x in range(num_heads):
        for i, s0 in enumerate(starts):
            region = ring.region(ref_pages[x][blocks[x][i]], offsets[x])
            ref[i, x] = ring_ops.ring_step(region, ring, q[i, x][None], k[i, x][None], v[i, x][None], s0,
                                           scale=scale, compensation=compensation)[0]
    plan = ring_ops.ring_decode_plan(ring, st, compensation)
    out = ring_decode(pages, offsets, blocks, plan, q, k, v, scale=scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    for x in range(num_heads):
        # identical state, bit for bit (bf16 views of fp32 sums may be NaN patterns: compare bits):
        # same token slots, same fp32 sums (one row added in both), same frontier
        assert torch.equal(_bits(pages[x]), _bits(ref_pages[x])), (x, (_bits(pages[x]) != _bits(ref_pages[x])).nonzero()[:5])


def test_ring_decode_strided_query_and_out(ring_decode):
    """query/key/value/out as strided views of a layer's [tokens, heads, ...] tensors, and blocks as
    column 0 of a block table (what the backend passes)."""
    d, starts = 16, [9, 30, 31]
    ring, pages, offsets, blocks, k_all, v_all, q_all = _setup(4, 8, d, torch.float32, starts, 2, seed=2)
    blocks = [torch.stack([bl, torch.zeros_like(bl), bl + 100], dim=1)[:, 0] for bl in blocks]
    assert blocks[0].stride() == (3,)
    ref_pages = [p.clone() for p in pages]
    b, st = len(starts), torch.tensor(starts)
    # a layer with 3 KV heads where heads 0 and 2 are local: non-contiguous head selection
    q_layer = torch.randn(b, 3, G, d)
    k_layer, v_layer = torch.randn(b, 3, d), torch.randn(b, 3, d)
    for x, h in enumerate((0, 2)):
        q_layer[:, h], k_layer[:, h], v_layer[:, h] = (q_all[x, torch.arange(b), st], k_all[x, torch.arange(b), st],
                                                       v_all[x, torch.arange(b), st])
    out_layer = torch.zeros(b, 3, G, d)
    heads = torch.tensor([0, 2])
    res = ring_decode(pages, offsets, blocks, ring_ops.ring_decode_plan(ring, st, "single"),
                               q_layer[:, heads], k_layer[:, heads], v_layer[:, heads], scale=0.25)
    out_layer[:, heads] = res
    plan = ring_ops.ring_decode_plan(ring, st, "single")
    out2 = torch.zeros(b, 3, G, d)
    ring_decode(ref_pages, offsets, blocks, plan, q_layer[:, 0:3:2], k_layer[:, 0:3:2],
                         v_layer[:, 0:3:2], scale=0.25, out=out2[:, 0:3:2])
    torch.testing.assert_close(out2, out_layer, atol=0, rtol=0)
    assert torch.equal(out2[:, 1], torch.zeros(b, G, d))


@pytest.mark.parametrize("compensation", ["single", "count"])
@pytest.mark.parametrize("sinks,window", [(4, 8), (0, 3), (2, 1)])
def test_ring_decode_sequence_against_dense_oracle(ring_decode, compensation, sinks, window):
    """Prefill with ring_step, then 40 decode steps of 4 requests with ring_decode, each step equal
    to the dense oracle over the request's whole sequence."""
    d, b = 16, 4
    gen = torch.Generator().manual_seed(3)
    ring = RingLayout(sinks, window, d, torch.float32)
    pages = [torch.randn(b + 1, ring.slots, 2 * d, generator=gen)]
    blocks = [torch.arange(1, b + 1)]
    prompt = [3, 1, 17, 9]
    total = max(prompt) + 41
    k_all, v_all = torch.randn(b, total, d, generator=gen), torch.randn(b, total, d, generator=gen)
    q_all = torch.randn(b, total, G, d, generator=gen)
    scale = d ** -0.5
    for i, n in enumerate(prompt):
        ring_ops.ring_step(ring.region(pages[0][i + 1], 0), ring, q_all[i, :n], k_all[i, :n], v_all[i, :n], 0,
                           scale=scale, compensation=compensation)
    starts = torch.tensor(prompt)
    for _ in range(40):
        idx = torch.arange(b)
        plan = ring_ops.ring_decode_plan(ring, starts, compensation)
        out = ring_decode(pages, [0], blocks, plan, q_all[idx, starts][:, None],
                                   k_all[idx, starts][:, None], v_all[idx, starts][:, None], scale=scale)
        for i in range(b):
            s0 = int(starts[i])
            ref = razor_attention_dense(q_all[i, s0:s0 + 1].permute(1, 0, 2)[None], k_all[i, :s0 + 1][None, None],
                                        v_all[i, :s0 + 1][None, None], local=torch.tensor([True]), sinks=sinks,
                                        window=window, compensation=compensation, scale=scale)[0].permute(1, 0, 2)
            torch.testing.assert_close(out[i, 0], ref[0], atol=1e-5, rtol=1e-5)
            assert int(ring.meta(ring.region(pages[0][i + 1], 0))[0]) == max(sinks, s0 + 1 - window + 1)
        starts = starts + 1


def test_ring_decode_plan_rejects_start_zero():
    with pytest.raises(ValueError, match="start >= 1"):
        ring_ops.ring_decode_plan(RingLayout(4, 8, 16, torch.float32), torch.tensor([3, 0]), "single")


@pytest.mark.parametrize("impl", ["fused", "triton"])
def test_ring_decode_rejects_region_outside_page(impl):
    """A region offset whose state rows fall past the page is refused before anything is written
    (the kernels write the frontier and sums in place: out of bounds otherwise)."""
    d, starts = 16, [9, 30]
    ring, pages, offsets, blocks, k_all, v_all, q_all = _setup(4, 8, d, torch.float32, starts, 1, seed=4)
    before = pages[0].clone()
    st = torch.tensor(starts)
    idx = torch.arange(len(starts))
    q, k, v = q_all[0, idx, st][:, None], k_all[0, idx, st][:, None], v_all[0, idx, st][:, None]
    bad = pages[0].shape[1] - ring.slots + 1  # the meta row lands one slot past the page
    fn = {"fused": _fused, "triton": _triton}[impl]
    with pytest.raises((ValueError, RuntimeError), match="exceeds the page"):
        fn(pages, [bad], blocks, ring_ops.ring_decode_plan(ring, st, "single"), q, k, v, scale=0.25)
    assert torch.equal(pages[0], before)
