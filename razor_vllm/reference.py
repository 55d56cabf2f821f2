"""Dense PyTorch reference of RazorAttention: the oracle every kernel and backend is tested against.

Semantics (one sequence, one forward step that appends C tokens to a cache that held `start` tokens;
query row i sits at absolute position p = start + i):

* retrieval KV heads attend causally to every key [0, p];
* every other ("local") KV head attends to the sinks [0, S), the exact keys [F, p] with frontier
  F = max(S, start - W + 1), and — when n = F - S > 0 and compensation is on — one compensation token
  with key mean(K[S:F]) and value mean(V[S:F]) over post-RoPE keys. Its logit gets a bias of ln n
  ("count": it stands for all n evicted tokens) or 0 ("single").

So a first prefill chunk (start = 0) is exact full attention (RazorAttention §3: compression applies to
what later queries see), a later chunked-prefill chunk sees a compressed past, and a decode step sees
the sinks plus the last W tokens. The frontier depends only on `start`, so preemption/recompute and
any chunking are covered by the same rule.

`RazorState` keeps the compensation as running fp32 sums that are folded as tokens leave the window,
which is what a paged implementation that frees evicted blocks must do; `razor_attention_dense`
checks against a direct mean in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from razor_vllm.config import Compensation


def frontier(start: int, sinks: int, window: int) -> int:
    """First exact non-sink key position of local heads for a step starting at `start`."""
    return max(sinks, start - window + 1)


def comp_bias(n: int, compensation: Compensation) -> float:
    """Logit bias of the compensation token standing for n evicted tokens."""
    return math.log(n) if compensation == "count" else 0.0


def razor_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, local: torch.Tensor,
                          sinks: int, window: int, compensation: Compensation, scale: float,
                          k_sum: torch.Tensor | None = None, v_sum: torch.Tensor | None = None) -> torch.Tensor:
    """RazorAttention for one step of a batch of equal-length sequences.

    q: [B, Hq, C, D] this step's queries; k, v: [B, Hkv, T, D] the whole cache including this step's
    keys (post-RoPE), so start = T - C. local: [Hkv] bool, True for compressed heads.
    k_sum, v_sum: optional [B, Hkv, D] fp32 sums over [S, F); computed from k/v when omitted.
    Returns [B, Hq, C, D] in q's dtype. Math in fp32.
    """
    b, hq, c, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    group = hq // hkv
    start = t - c
    f = frontier(start, sinks, window)
    n = f - sinks
    pos_q = torch.arange(start, t)
    pos_k = torch.arange(t)
    causal = pos_k[None, :] <= pos_q[:, None]  # [C, T]
    local_vis = causal & ((pos_k < sinks) | (pos_k >= f))[None, :]
    local_q = local.to(torch.bool).repeat_interleave(group)  # [Hq]
    mask = torch.where(local_q[:, None, None], local_vis[None], causal[None])  # [Hq, C, T]

    # GQA without copying K/V per query head: view queries as [B, Hkv, G*C, D].
    qf = q.float().reshape(b, hkv, group * c, d)
    kf, vf = k.float(), v.float()
    logits = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale).view(b, hq, c, t)  # [B, Hq, C, T]
    logits = logits.masked_fill(~mask[None], float("-inf"))
    use_comp = compensation != "none" and n > 0 and bool(local.any())
    if not use_comp:
        p = torch.softmax(logits, dim=-1).view(b, hkv, group * c, t)
        return torch.matmul(p, vf).view(b, hq, c, d).to(q.dtype)
    if k_sum is None:
        k_sum = k[:, :, sinks:f].float().sum(dim=2)
        v_sum = v[:, :, sinks:f].float().sum(dim=2)
    k_hat, v_hat = k_sum / n, v_sum / n  # [B, Hkv, D]
    comp_logit = torch.matmul(qf, k_hat[..., None]).view(b, hq, c) * scale + comp_bias(n, compensation)
    comp_logit = comp_logit.masked_fill(~local_q[None, :, None], float("-inf"))
    p = torch.softmax(torch.cat([logits, comp_logit[..., None]], dim=-1), dim=-1)  # [B, Hq, C, T+1]
    out = torch.matmul(p[..., :t].reshape(b, hkv, group * c, t), vf).view(b, hq, c, d)
    out = out + p[..., t:] * v_hat.repeat_interleave(group, dim=1)[:, :, None, :]
    return out.to(q.dtype)


@dataclass
class RazorState:
    """Per-layer compensation state: running fp32 sums over the evicted range [S, frontier)."""

    sinks: int
    frontier: int = -1
    k_sum: torch.Tensor | None = None
    v_sum: torch.Tensor | None = None
    folds: int = field(default=0)

    def advance(self, k: torch.Tensor, v: torch.Tensor, target: int) -> None:
        """Fold keys/values [frontier, target) into the sums. k, v: [B, Hkv, T, D] with T >= target.

        A shorter cache than before means a new or recomputed sequence: start over.
        """
        if self.k_sum is None or self.frontier > k.shape[2] or self.frontier < 0:
            self.frontier = self.sinks
            self.k_sum = k.new_zeros(k.shape[0], k.shape[1], k.shape[3], dtype=torch.float32)
            self.v_sum = torch.zeros_like(self.k_sum)
        if target > self.frontier:
            self.k_sum += k[:, :, self.frontier:target].float().sum(dim=2)
            self.v_sum += v[:, :, self.frontier:target].float().sum(dim=2)
            self.frontier = target
            self.folds += 1
