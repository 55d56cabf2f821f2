"""The dense oracle against brute force (explicit masks and an explicit compensation column)."""

import math

import pytest
import torch

from razor_vllm.reference import RazorState, frontier, razor_attention_dense


def brute_force(q, k, v, local, sinks, window, compensation, scale):
    """Loop over (batch, head, query): list the visible keys by hand, append the compensation
    token by hand, softmax in float64."""
    b, hq, c, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    start = t - c
    out = torch.zeros(b, hq, c, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kvh = h // g
            for i in range(c):
                p = start + i
                f = max(sinks, start - window + 1)
                if local[kvh]:
                    vis = [j for j in range(p + 1) if j < sinks or j >= f]
                else:
                    vis = list(range(p + 1))
                keys = [k[bi, kvh, j].double() for j in vis]
                vals = [v[bi, kvh, j].double() for j in vis]
                bias = [0.0] * len(vis)
                n = f - sinks
                if local[kvh] and compensation != "none" and n > 0:
                    keys.append(k[bi, kvh, sinks:f].double().mean(0))
                    vals.append(v[bi, kvh, sinks:f].double().mean(0))
                    bias.append(math.log(n) if compensation == "count" else 0.0)
                logits = torch.stack([q[bi, h, i].double() @ kk * scale + bb for kk, bb in zip(keys, bias)])
                w = torch.softmax(logits, 0)
                out[bi, h, i] = (w[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("compensation", ["none", "single", "count"])
@pytest.mark.parametrize("t,c", [(20, 1), (20, 5), (20, 20), (9, 1), (33, 7)])
@pytest.mark.parametrize("sinks,window", [(4, 4), (2, 8), (0, 3), (4, 64)])
def test_dense_matches_brute_force(compensation, t, c, sinks, window):
    torch.manual_seed(t * 100 + c + sinks + window)
    b, hq, hkv, d = 2, 6, 3, 8
    q, k, v = torch.randn(b, hq, c, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    local = torch.tensor([True, False, True])
    got = razor_attention_dense(q, k, v, local=local, sinks=sinks, window=window,
                                compensation=compensation, scale=d ** -0.5)
    want = brute_force(q, k, v, local, sinks, window, compensation, d ** -0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def _full_causal(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=False,
        attn_mask=torch.ones(q.shape[2], k.shape[2]).tril(k.shape[2] - q.shape[2]).bool(), scale=scale)


@pytest.mark.parametrize("compensation", ["none", "single", "count"])
def test_window_covering_sequence_is_full_attention(compensation):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    got = razor_attention_dense(q, k, v, local=torch.tensor([True, True]), sinks=4, window=40,
                                compensation=compensation, scale=0.25)
    torch.testing.assert_close(got, _full_causal(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


def test_all_retrieval_is_full_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    got = razor_attention_dense(q, k, v, local=torch.tensor([False, False]), sinks=4, window=2,
                                compensation="count", scale=0.25)
    torch.testing.assert_close(got, _full_causal(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


def test_compression_changes_the_answer():
    """Guards against a reference that ignores its policy."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    kw = dict(local=torch.tensor([True, True]), sinks=4, window=4, scale=0.25)
    single = razor_attention_dense(q, k, v, compensation="single", **kw)
    count = razor_attention_dense(q, k, v, compensation="count", **kw)
    none = razor_attention_dense(q, k, v, compensation="none", **kw)
    full = _full_causal(q, k, v, 0.25)
    for a, b_ in [(single, count), (single, none), (none, full), (count, full)]:
        assert (a - b_).abs().max() > 1e-3


def test_running_fp32_sums_match_direct_mean():
    """Decode token by token with a RazorState: the folded sums equal a direct sum, and every token
    is counted exactly once (exact key or compensation)."""
    torch.manual_seed(3)
    sinks, window, t0 = 4, 8, 12
    k, v = torch.randn(1, 2, 60, 16, dtype=torch.bfloat16), torch.randn(1, 2, 60, 16, dtype=torch.bfloat16)
    state = RazorState(sinks)
    for t in range(t0, 60):
        f = frontier(t - 1, sinks, window)
        state.advance(k[:, :, :t], v[:, :, :t], f)
        assert state.frontier == f
        torch.testing.assert_close(state.k_sum, k[:, :, sinks:f].float().sum(2), atol=1e-4, rtol=1e-5)
        exact = set(range(sinks)) | set(range(f, t))
        evicted = set(range(sinks, f))
        assert exact.isdisjoint(evicted) and exact | evicted == set(range(t))
        assert len(exact) == min(t, sinks + window)


def test_state_restarts_for_a_new_sequence():
    k = torch.randn(1, 1, 30, 4)
    state = RazorState(2)
    state.advance(k, k, 20)
    state.advance(k[:, :, :10], k[:, :, :10], 5)  # shorter cache: recompute after preemption
    torch.testing.assert_close(state.k_sum, k[:, :, 2:5].sum(2))
