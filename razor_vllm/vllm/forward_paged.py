"""kv_layout="paged" on CPU: the per-step plan (`PagedStep`, built by the metadata builder) and the
forward strategy (`PagedCPU`, chosen once by the impl).

Retrieval KV heads live in 1-head sibling caches and run vLLM's stock CPU ops on them; local heads
live in ring regions of per-request pages (`razor_vllm.vllm.layout`, `kernels.ring_layout`) and run
the ring operators: one `RingDecoder.run` per layer for all decoding requests, `ring_step` per
(request, head) for prefill chunks. docs/design.md describes the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm import _custom_ops as ops
from vllm.forward_context import get_forward_context

from razor_vllm.kernels import ring_torch
from razor_vllm.kernels.decoder import RingDecoder
from razor_vllm.kernels.ring_layout import RingLayout
from razor_vllm.kernels.ring_torch import RingDecodePlan
from razor_vllm.vllm import layout as kvl
from razor_vllm.vllm.cpu_cache import paged_isa


@dataclass
class PagedStep:
    """What every local head of every layer needs to know about one step: built once per step (and
    KV cache group) by `RazorMetadataBuilder.build`, from host-side tensors."""

    plan: RingDecodePlan | None
    """The decoding requests' plan, or None when there are none."""
    reqs: slice | torch.Tensor | None
    """The decoding requests: a slice of consecutive request indices, or int64 indices."""
    rows: slice | torch.Tensor | None
    """Their query rows: a slice, or int64 indices."""
    chunks: list[tuple[int, int, int, int]]
    """Every other request with tokens: (request, first row, end row, start)."""
    _blocks: dict = field(default_factory=dict)

    def ring_blocks(self, block_table: torch.Tensor) -> torch.Tensor:
        """The decoding requests' ring blocks (column 0) in `block_table`, once per KV cache group
        (the layers of a group share its block table tensor). Keyed by id(): the tensor outlives the
        step, and the identity is re-checked."""
        got = self._blocks.get(id(block_table))
        if got is None or got[0] is not block_table:
            got = self._blocks[id(block_table)] = (block_table, block_table[self.reqs, 0])
        return got[1]


def build_paged_step(query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor,
                     block_table: torch.Tensor, num_reqs: int, ring: RingLayout,
                     compensation: str) -> PagedStep:
    """Sort the step's requests into decode (one new token after at least one cached) and chunks."""
    qsl = query_start_loc_cpu[:num_reqs + 1].tolist()
    seq_lens = seq_lens_cpu[:num_reqs].tolist()
    decode, chunks = [], []
    for i in range(num_reqs):
        t0, t1 = qsl[i], qsl[i + 1]
        if t1 == t0:
            continue
        start = seq_lens[i] - (t1 - t0)
        if t1 - t0 == 1 and start >= 1:
            decode.append(i)
        else:
            chunks.append((i, t0, t1, start))
    plan = reqs = rows = None
    if decode:
        a, b = decode[0], decode[-1] + 1
        consecutive = b - a == len(decode)  # then their rows are consecutive as well (one row each)
        reqs = slice(a, b) if consecutive else torch.tensor(decode)
        rows = slice(qsl[a], qsl[a] + len(decode)) if consecutive else torch.tensor([qsl[i] for i in decode])
        if bool((block_table[reqs, 0] == 0).any()):
            # a dummy batch (profiling / warm-up: every block is the null block): the per-request
            # path skips block 0 instead of writing into it
            chunks = sorted(chunks + [(i, qsl[i], qsl[i + 1], seq_lens[i] - 1) for i in decode])
            reqs = rows = None
        else:
            plan = ring_torch.ring_decode_plan(ring, torch.tensor([seq_lens[i] - 1 for i in decode]),
                                               compensation)
    return PagedStep(plan, reqs, rows, chunks)


class PagedCPU:
    """The forward of one layer in the paged layout on CPU (the impl holds one per layer)."""

    def __init__(self, impl, layout: kvl.KVLayout, decoder: RingDecoder) -> None:
        self.impl, self.layout, self.decoder = impl, layout, decoder
        self._decode_consts: tuple | None = None
        """(head selector, contiguous?, region offsets) of the layer's local heads."""
        self._sibling_views: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        """Retrieval sibling name -> (its cache, key view, value view)."""

    def reset(self) -> None:
        """The layer was (re)resolved: drop per-layer constants."""
        self._decode_consts = None

    def describe(self) -> str:
        return f"{self.decoder.describe()} for decode, ring_torch.ring_step for prefill chunks"

    def kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Nothing: the forward writes the siblings and ring pages itself (this layer's slot mapping
        addresses a ring)."""

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, md, output: torch.Tensor) -> torch.Tensor:
        """Retrieval head h: write `key[:, h]`/`value[:, h]` into its sibling's cache
        `[num_blocks, 1, P, 2D]` (stock CPU layout) with the sibling's slot mapping, then the stock
        CPU attention for query heads `[hG, (h+1)G)` with the sibling's `CPUAttentionMetadata`.
        Local heads: the ring regions of the requests' ring pages (`block_table[i, 0]` of the page
        layer's metadata); block 0 is the null block of dummy batches: not touched.
        kv_cache: this layer's ring-page cache `[num_blocks, 1, P, 2D]`.
        """
        impl, layout = self.impl, self.layout
        spec = layout.layer(impl.layer_index)
        if spec.name != impl.layer_name:
            raise RuntimeError(f"razor: layer {impl.layer_name!r} is planned as {spec.name!r}")
        fc = get_forward_context()
        n = md.num_actual_tokens
        group = impl.num_heads // impl.num_kv_heads
        d = impl.head_size
        if spec.retrieval:
            isa = paged_isa(query.dtype, layout.page_tokens, d)
            # The stock ops read strided query/key/value (measured: identical results), but write a
            # contiguous output: one scratch buffer for the layer's retrieval heads.
            out = torch.empty(n, group, d, dtype=output.dtype)
        for r in spec.retrieval:
            h, q0, q1 = r.kv_head, r.kv_head * group, (r.kv_head + 1) * group
            cache = fc.no_compile_layers[r.name].kv_cache
            smd = fc.attn_metadata[r.name]
            views = self._sibling_views.get(r.name)
            if views is None or views[0] is not cache:  # once per sibling (and per cache reallocation)
                nb, _, bs, _ = cache.shape
                views = self._sibling_views[r.name] = (cache, *cache.view(nb, 1, 2 * bs, d).chunk(2, dim=2))
            _, key_cache, value_cache = views
            ops.cpu_attn_reshape_and_cache(key[:n, h:h + 1], value[:n, h:h + 1],
                                           key_cache, value_cache, smd.slot_mapping[:n], isa,
                                           k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
            ops.cpu_attention_with_kv_cache(
                query=query[:n, q0:q1], key_cache=key_cache, value_cache=value_cache,
                output=out, query_start_loc=smd.query_start_loc, seq_lens=smd.seq_lens, scale=impl.scale,
                causal=smd.causal, alibi_slopes=impl.alibi_slopes, sliding_window=impl.sliding_window,
                block_table=smd.block_table, softcap=impl.logits_soft_cap,
                scheduler_metadata=smd.scheduler_metadata, s_aux=None,
                dynamic_causal=smd.dynamic_causal, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
            output[:n, q0:q1] = out
        if not spec.local:
            return output
        step: PagedStep = md.paged_step
        pages = []
        for x in spec.local:
            if x.page == impl.layer_name:
                pages.append((kv_cache, md.block_table))
            else:
                pages.append((fc.no_compile_layers[x.page].kv_cache, fc.attn_metadata[x.page].block_table))
        if step.plan is not None:
            self._decode(step, spec, pages, query, key, value, output, group)
        compensation = self.decoder.compensation
        for i, t0, t1, start in step.chunks:
            for x, (page_cache, block_table) in zip(spec.local, pages):
                block = int(block_table[i, 0])
                if block == 0:
                    continue
                h, q0, q1 = x.kv_head, x.kv_head * group, (x.kv_head + 1) * group
                region = layout.ring.region(page_cache[block, 0], x.offset)
                output[t0:t1, q0:q1] = ring_torch.ring_step(
                    region, layout.ring, query[t0:t1, q0:q1], key[t0:t1, h], value[t0:t1, h],
                    start, scale=impl.scale, compensation=compensation)
        return output

    def _decode(self, step: PagedStep, spec: kvl.LayerLayout, pages, query: torch.Tensor,
                key: torch.Tensor, value: torch.Tensor, output: torch.Tensor, group: int) -> None:
        """The decoding requests of the step, all local heads of this layer at once."""
        consts = self._decode_consts
        if consts is None:  # the layer's local heads never change: once per layer
            heads = [x.kv_head for x in spec.local]
            contiguous_heads = heads == list(range(heads[0], heads[0] + len(heads)))
            sel = slice(heads[0], heads[0] + len(heads)) if contiguous_heads else torch.tensor(heads)
            consts = self._decode_consts = (sel, contiguous_heads, [x.offset for x in spec.local])
        sel, contiguous_heads, offsets = consts
        h, d = self.impl.num_kv_heads, self.impl.head_size
        rows = step.rows  # slice (decode requests are consecutive rows) or int64 row indices
        b = step.plan.num_reqs
        blocks = [step.ring_blocks(bt) for _, bt in pages]
        q = query[rows].view(b, h, group, d)[:, sel]
        k, v = key[rows][:, sel], value[rows][:, sel]
        page_views = [cache[:, 0] for cache, _ in pages]
        scale = self.impl.scale
        if isinstance(rows, slice) and contiguous_heads:
            self.decoder.run(step.plan, page_views, offsets, blocks, q, k, v, scale=scale,
                             out=output[rows].view(b, h, group, d)[:, sel])
        else:
            res = self.decoder.run(step.plan, page_views, offsets, blocks, q, k, v, scale=scale)
            out = output.view(-1, h, group, d)
            row_idx = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
            head_idx = sel if isinstance(sel, torch.Tensor) else torch.arange(sel.start, sel.stop)
            out[row_idx[:, None], head_idx[None, :]] = res
