"""ring_ops.ring_attend: the fused path for prefill chunks (CPU flash attention over the chunk,
merged by log-sum-exp with the past part: sinks + window + compensation token) against the masked
softmax path and the dense oracle `razor_vllm.reference.razor_attention_dense`."""

from __future__ import annotations

import pytest
import torch

from razor_vllm.kernels import ring_torch as ring_ops
from razor_vllm.kernels.ring_layout import RingLayout
from razor_vllm.reference import razor_attention_dense

G = 3


def _region_after(ring, k_all, v_all, q_all, start, gen):
    """A dirty region brought to `start` cached tokens by ring_step (one chunk, then decodes)."""
    page = (torch.randn(ring.slots + 4, 2 * ring.head_size, generator=gen) * 5).to(k_all.dtype)
    region = ring.region(page, 2)
    if start:
        first = max(1, start // 2)
        ring_ops.ring_step(region, ring, q_all[:first], k_all[:first], v_all[:first], 0, scale=0.3,
                           compensation="single")
        for p in range(first, start):
            ring_ops.ring_step(region, ring, q_all[p:p + 1], k_all[p:p + 1], v_all[p:p + 1], p, scale=0.3,
                               compensation="single")
    return region


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("compensation", ["single", "count", "none"])
@pytest.mark.parametrize("sinks,window", [(4, 8), (0, 6), (2, 1), (4, 64)])
@pytest.mark.parametrize("start,chunk", [(0, 40), (0, 16), (3, 33), (9, 20), (70, 50), (200, 17)])
def test_ring_attend_fused_equals_masked_and_oracle(dtype, compensation, sinks, window, start, chunk,
                                                    monkeypatch):
    d = 16
    gen = torch.Generator().manual_seed(start * 131 + chunk)
    ring = RingLayout(sinks, window, d, dtype)
    total = start + chunk
    k_all = torch.randn(total, d, generator=gen).to(dtype)
    v_all = torch.randn(total, d, generator=gen).to(dtype)
    q_all = torch.randn(total, G, d, generator=gen).to(dtype)
    region = _region_after(ring, k_all, v_all, q_all, start, gen)
    before = region.clone()
    args = (region, ring, q_all[start:], k_all[start:], v_all[start:], start)
    assert chunk >= ring_ops._FLASH_MIN_CHUNK and ring_ops._flash_with_lse() is not None
    fused = ring_ops.ring_attend(*args, scale=d ** -0.5, compensation=compensation)
    monkeypatch.setattr(ring_ops, "_FLASH_MIN_CHUNK", 10**9)
    masked = ring_ops.ring_attend(*args, scale=d ** -0.5, compensation=compensation)
    assert torch.equal(region.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       before.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # reads only
    ref = razor_attention_dense(q_all[start:].permute(1, 0, 2)[None], k_all[None, None], v_all[None, None],
                                local=torch.tensor([True]), sinks=sinks, window=window,
                                compensation=compensation, scale=d ** -0.5)[0].permute(1, 0, 2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), masked.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(fused.float(), ref.float(), atol=tol, rtol=tol)
