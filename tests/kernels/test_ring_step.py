"""`ring_torch.ring_step` (the paged layout's chunk path and the oracle of the other ring kernels)
replays a sequence step by step through one ring region (decode, chunked prefill with chunks
larger than W, a first prefill, short sequences, no sinks, a reset at start == 0 on a dirty page);
every step's output equals `reference.razor_attention_dense` on the whole cache."""

from __future__ import annotations

import pytest
import torch

from razor_vllm.kernels import ring_torch as ring_ops
from razor_vllm.kernels.ring_layout import RingLayout
from razor_vllm.reference import razor_attention_dense

D, G = 16, 3


def _replay(schedule, *, sinks, window, compensation, dtype=torch.float32, seed=0, dirty=True):
    """Run `schedule` (chunk sizes; a 0 restarts the sequence) through one ring region and compare
    each step with the oracle. Returns the max abs error."""
    gen = torch.Generator().manual_seed(seed)
    ring = RingLayout(sinks, window, D, dtype)
    page = (torch.randn(ring.slots + 5, 2 * D, generator=gen).to(dtype) if dirty
            else torch.zeros(ring.slots + 5, 2 * D, dtype=dtype))
    region = ring.region(page, 3)
    total = sum(schedule) + 1
    k_all = torch.randn(total, D, generator=gen).to(dtype)
    v_all = torch.randn(total, D, generator=gen).to(dtype)
    q_all = torch.randn(total, G, D, generator=gen).to(dtype)
    start, worst, scale = 0, 0.0, D ** -0.5
    for c in schedule:
        if c == 0:  # preemption / new request: the page is reused as is, start restarts at 0
            start = 0
            continue
        q, k, v = q_all[start:start + c], k_all[start:start + c], v_all[start:start + c]
        out = ring_ops.ring_step(region, ring, q, k, v, start, scale=scale, compensation=compensation)
        ref = razor_attention_dense(q.permute(1, 0, 2)[None], k_all[None, None, :start + c],
                                    v_all[None, None, :start + c], local=torch.tensor([True]),
                                    sinks=sinks, window=window, compensation=compensation,
                                    scale=scale)[0].permute(1, 0, 2)
        err = (out.float() - ref.float()).abs().max().item()
        worst = max(worst, err)
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (schedule, start, c, err)
        start += c
        assert int(ring.meta(region)[0]) == max(sinks, start - window + 1)
    return worst


@pytest.mark.parametrize("compensation", ["single", "count", "none"])
@pytest.mark.parametrize("sinks,window", [(4, 8), (0, 5), (2, 1), (4, 32)])
def test_decode_sequence(compensation, sinks, window):
    _replay([1] * 60, sinks=sinks, window=window, compensation=compensation)


@pytest.mark.parametrize("compensation", ["single", "count"])
def test_first_prefill_then_decode(compensation):
    _replay([50] + [1] * 20, sinks=4, window=8, compensation=compensation)


@pytest.mark.parametrize("schedule", [[7, 30, 3, 19, 1, 1, 40], [9, 9, 9, 9, 1, 1], [2, 2, 100, 1],
                                      [13, 1, 25, 1]])
def test_chunked_prefill_chunks_larger_than_window(schedule):
    _replay(schedule, sinks=4, window=8, compensation="count")
    _replay(schedule, sinks=0, window=6, compensation="single")


def test_short_sequence_below_window():
    _replay([3, 1, 1, 2], sinks=4, window=16, compensation="single")


def test_reset_at_start_zero_on_a_used_page():
    # a second request (or a recomputed one) gets a page full of another sequence's state
    _replay([30, 1, 1, 0, 20, 1, 1, 0, 1, 1, 15], sinks=4, window=8, compensation="count")


def test_bf16_region():
    _replay([20, 1, 1, 17, 1], sinks=4, window=8, compensation="single", dtype=torch.bfloat16)


def test_fold_touches_only_its_region():
    ring = RingLayout(4, 8, D, torch.float32)
    page = torch.randn(3 * ring.slots, 2 * D)
    before = page.clone()
    region = ring.region(page, ring.slots)
    k, v, q = torch.randn(40, D), torch.randn(40, D), torch.randn(40, G, D)
    ring_ops.ring_step(region, ring, q, k, v, 0, scale=0.25, compensation="single")
    assert torch.equal(page[:ring.slots], before[:ring.slots])
    assert torch.equal(page[2 * ring.slots:], before[2 * ring.slots:])
