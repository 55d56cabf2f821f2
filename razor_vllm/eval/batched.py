"""Many methods of one prompt decoded side by side over one shared exact prefill (the eval's fast path).

A sweep asks the same prompt for 20-30 methods (KV budgets). Run one by one through HF
(`hf_razor.continue_greedy`), each decode step re-reads the model's weights and the whole context
for every method; most of a 4k prompt's time went there (measured: 28 methods x ~4 s at 4k on 2
cores, against ~19 s for the prefill). Here the methods are the rows of one batch:

* the context's post-RoPE keys/values (the exact prefill, identical for every method) are held once,
  ``[1, Hkv, Tc, D]``, and every row's queries read them by broadcasting;
* each row keeps only its own tail (question chunk and generated tokens);
* row b attends with its own policy: the semantics of `reference.razor_attention_dense` (the oracle),
  with the evicted-range sums taken from prefix sums of the shared context.

The layer loop reuses the HF model's own modules (norms, projections, rotary embedding, MLP), for
the Llama-structured decoders (Llama, Mistral, Qwen2: no per-head q/k norms, no sliding windows);
`supports(model)` says whether a model qualifies, and the harness falls back to the one-by-one path
otherwise. tests/eval/test_batched.py checks it against that path (same greedy tokens).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch

from razor_vllm.config import RazorPolicy
from razor_vllm.reference import frontier


SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def supports(model) -> bool:
    """Llama-structured decoders with full attention in every layer."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    return (getattr(cfg, "model_type", None) in SUPPORTED_MODEL_TYPES
            and not getattr(cfg, "use_sliding_window", False)
            and (not types or set(types) == {"full_attention"}))


class _Rows:
    """Per-row policy tensors for one layer, built once. A full-attention row has no local head."""

    def __init__(self, policies: Sequence[RazorPolicy | None], layer: int, n_kv: int, group: int):
        b = len(policies)
        self.local_q = torch.zeros(b, n_kv * group, dtype=torch.bool)
        sinks, window, comp_on, count = [0] * b, [1] * b, [False] * b, [False] * b
        for i, p in enumerate(policies):
            if p is None:
                continue
            self.local_q[i] = torch.tensor(p.local_mask(layer), dtype=torch.bool).repeat_interleave(group)
            sinks[i], window[i] = p.sinks, p.window
            comp_on[i], count[i] = p.compensation != "none", p.compensation == "count"
        self.sinks, self.window = torch.tensor(sinks), torch.tensor(window)
        self.local_kv = self.local_q.view(b, n_kv, group)[:, :, 0].contiguous()
        self.comp_on = torch.tensor(comp_on) & self.local_q.any(dim=1)
        self.count = torch.tensor(count)

    def select(self, idx: torch.Tensor) -> None:
        for name in ("local_q", "local_kv", "sinks", "window", "comp_on", "count"):
            setattr(self, name, getattr(self, name)[idx])


class BatchedDecoder:
    """Decode ``policies`` (None = full attention) of one prompt as one batch over a shared context.

    ``ctx_keys/ctx_values``: per layer ``[1, Hkv, Tc, D]`` post-RoPE, from an exact prefill.
    """

    def __init__(self, model, ctx_keys: list[torch.Tensor], ctx_values: list[torch.Tensor],
                 policies: Sequence[RazorPolicy | None]):
        if not supports(model):
            raise ValueError(f"{type(model).__name__}: the batched decoder handles Llama-structured models only")
        self.model = model
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_kv = cfg.num_key_value_heads
        self.group = cfg.num_attention_heads // self.n_kv
        self.b = len(policies)
        self.ctx_k, self.ctx_v = ctx_keys, ctx_values
        self.tc = ctx_keys[0].shape[2]
        # prefix sums over the shared context (fp64: the evicted range is up to Tc tokens long), so a
        # row's evicted-range sum is two lookups: [Hkv, Tc + 1, D]
        self.pre_k = [self._prefix(k) for k in ctx_keys]
        self.pre_v = [self._prefix(v) for v in ctx_values]
        self.rows = [_Rows(policies, layer, self.n_kv, self.group) for layer in range(self.n_layers)]
        self.tail_k: list[torch.Tensor | None] = [None] * self.n_layers
        self.tail_v: list[torch.Tensor | None] = [None] * self.n_layers
        attn0 = model.model.layers[0].self_attn
        self.rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        self.scale = attn0.scaling
        self.head_dim = attn0.head_dim

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (finished ones): later steps compute only these."""
        idx = torch.tensor(rows)
        for r in self.rows:
            r.select(idx)
        self.tail_k = [t[idx] for t in self.tail_k]
        self.tail_v = [t[idx] for t in self.tail_v]
        self.b = len(rows)

    @staticmethod
    def _prefix(x: torch.Tensor) -> torch.Tensor:
        x = x[0].double()
        return torch.cat([torch.zeros_like(x[:, :1]), x.cumsum(dim=1)], dim=1)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` [B, C] (the same C for every row); returns the last position's logits [B, V]."""
        m = self.model.model
        b, c = ids.shape
        start = self.tc + (0 if self.tail_k[0] is None else self.tail_k[0].shape[2])
        h = m.embed_tokens(ids)
        pos = torch.arange(start, start + c)[None].expand(b, c)
        cos, sin = m.rotary_emb(h, pos)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, c, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, c, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, c, -1, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            self.tail_k[i] = k if self.tail_k[i] is None else torch.cat([self.tail_k[i], k], dim=2)
            self.tail_v[i] = v if self.tail_v[i] is None else torch.cat([self.tail_v[i], v], dim=2)
            o = self._attend(i, q, start)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, c, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h[:, -1]))

    def _attend(self, layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
        """Row b's attention under its own policy (reference.razor_attention_dense's semantics), as a
        two-part softmax: the shared context (one GEMM per KV head over every row's queries; a
        broadcast batch matmul would copy the context once per row) and the row's own tail, plus
        the compensation logit."""
        b, hq, c, d = q.shape
        hkv, g, tc = self.n_kv, self.group, self.tc
        rows = self.rows[layer]
        tk, tv = self.tail_k[layer].float(), self.tail_v[layer].float()  # [B, Hkv, Tt, D]
        tt = tk.shape[2]
        qf = q.float().reshape(b, hkv, g * c, d)
        local = rows.local_kv  # [B, Hkv]
        # frontier F = max(S, start - W + 1) per row (reference.frontier): local heads see [0, S) and [F, ..)
        f = torch.maximum(rows.sinks, start - rows.window + 1)
        pos_c = torch.arange(tc)
        hide_c = (pos_c[None] >= rows.sinks[:, None]) & (pos_c[None] < f[:, None])  # [B, Tc]; context is all causal
        l_ctx = torch.matmul(qf.transpose(0, 1).reshape(hkv, b * g * c, d), self.ctx_k[layer][0].float().transpose(-1, -2))
        l_ctx = l_ctx.view(hkv, b, g * c, tc).mul_(self.scale)
        l_ctx.masked_fill_((local.T[:, :, None] & hide_c[None])[:, :, None, :], float("-inf"))
        pos_t = torch.arange(tc, tc + tt)
        causal_t = pos_t[None, :] <= torch.arange(start, start + c)[:, None]  # [C, Tt]
        hide_t = (pos_t[None] >= rows.sinks[:, None]) & (pos_t[None] < f[:, None])  # [B, Tt]
        l_tail = torch.matmul(qf, tk.transpose(-1, -2)).mul_(self.scale).view(b, hkv, g, c, tt)
        l_tail.masked_fill_(~causal_t | (local[:, :, None, None, None] & hide_t[:, None, None, None, :]),
                            float("-inf"))
        l_tail = l_tail.view(b, hkv, g * c, tt)
        n = f - rows.sinks
        k_hat, v_hat = self._evicted_means(layer, rows.sinks, f, n)  # [B, Hkv, D] each
        bias = torch.where(rows.count, torch.log(n.clamp(min=1).double()).float(), 0.0)
        l_comp = torch.matmul(qf, k_hat[..., None])[..., 0].mul_(self.scale).add_(bias[:, None, None])  # [B, Hkv, G*C]
        l_comp.masked_fill_(~(rows.comp_on[:, None] & (n > 0)[:, None] & local)[:, :, None], float("-inf"))
        m = torch.maximum(torch.maximum(l_ctx.amax(-1).transpose(0, 1), l_tail.amax(-1)), l_comp)  # [B, Hkv, G*C]
        e_ctx = l_ctx.sub_(m.transpose(0, 1)[..., None]).exp_()
        e_tail = l_tail.sub_(m[..., None]).exp_()
        e_comp = (l_comp - m).exp_()
        denom = e_ctx.sum(-1).transpose(0, 1) + e_tail.sum(-1) + e_comp
        o_ctx = torch.matmul(e_ctx.view(hkv, b * g * c, tc), self.ctx_v[layer][0].float()).view(hkv, b, g * c, d)
        out = o_ctx.transpose(0, 1) + torch.matmul(e_tail, tv) + e_comp[..., None] * v_hat[:, :, None, :]
        return (out / denom[..., None]).reshape(b, hq, c, d).to(q.dtype)

    def _evicted_means(self, layer: int, s: torch.Tensor, f: torch.Tensor, n: torch.Tensor):
        """Per row, the fp32 means of keys and values over positions [s, f): [B, Hkv, D] each (zero
        where nothing is evicted)."""
        a, e = s.clamp(max=self.tc), f.clamp(max=self.tc)
        pk, pv = self.pre_k[layer], self.pre_v[layer]  # [Hkv, Tc + 1, D]
        ks = (pk[:, e] - pk[:, a]).transpose(0, 1)  # [B, Hkv, D]
        vs = (pv[:, e] - pv[:, a]).transpose(0, 1)
        for r in torch.nonzero(f > self.tc).flatten().tolist():  # evicted tail tokens (question, answer)
            lo, hi = max(int(s[r]), self.tc) - self.tc, int(f[r]) - self.tc
            ks[r] += self.tail_k[layer][r, :, lo:hi].double().sum(dim=1)
            vs[r] += self.tail_v[layer][r, :, lo:hi].double().sum(dim=1)
        div = n.clamp(min=1).double()[:, None, None]
        return (ks / div).float(), (vs / div).float()


def decode_rows(model, ctx_keys, ctx_values, policies: Sequence[RazorPolicy | None], feed: Sequence[int],
                max_new_tokens: int, eos_token_ids: Sequence[int] = (), first_logits: torch.Tensor | None = None,
                stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuations, one per policy: `feed` (e.g. the question) as one chunk through every
    row's compressed view of the shared context, or, with empty `feed`, from `first_logits` (the
    exact prefill's). A row stops at EOS, at `max_new_tokens` or when `stop(tokens)` holds, and leaves
    the batch."""
    dec = BatchedDecoder(model, ctx_keys, ctx_values, policies)
    b = len(policies)
    if len(feed):
        logits = dec.step(torch.tensor([list(feed)] * b))
    elif first_logits is not None:
        logits = first_logits[None].expand(b, -1)
    else:
        raise ValueError("decode_rows needs feed or first_logits")
    out: list[list[int]] = [[] for _ in range(b)]
    active = list(range(b))  # original row of each batch row still decoding
    for _ in range(max_new_tokens):
        toks = torch.argmax(logits, dim=-1).tolist()
        still = []
        for i, (r, tok) in enumerate(zip(active, toks)):
            out[r].append(tok)
            if not (tok in eos_token_ids or len(out[r]) == max_new_tokens or (stop and stop(out[r]))):
                still.append(i)
        if not still:
            break
        if len(still) < len(active):  # finished rows leave the batch
            dec.keep(still)
            logits, toks = logits[still], [toks[i] for i in still]
            active = [active[i] for i in still]
        logits = dec.step(torch.tensor(toks)[:, None])
    return out
