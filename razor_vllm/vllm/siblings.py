"""The cache-only sibling layers of the paged layout and their metadata-only backends.

A `KVLayout` (`razor_vllm.vllm.layout`) names sibling layers: one per retrieval KV head (a 1-head
full-attention cache), extra ring pages, padding pages. They are `AttentionLayerBase` modules added
to vLLM's static forward context, so that vLLM's runner allocates, groups and block-tables them
like any attention layer; the main layer's impl reads and writes their caches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport, AttentionMetadataBuilder, MultipleOf
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from razor_vllm.vllm.layout import KVLayout, SiblingKind


@dataclass
class RazorPageMetadata:
    """What a ring page's builder hands the forward: the page of request i is
    ``kv_cache[block_table[i, 0], 0]`` (`[P, 2D]`)."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    num_actual_tokens: int
    num_reqs: int
    slot_mapping: torch.Tensor
    """This group's slots of the step's tokens (-1: padding); written by the retrieval siblings."""
    max_query_len: int
    max_seq_len: int


class RazorPageMetadataBuilder(AttentionMetadataBuilder[RazorPageMetadata]):
    """Block table + sequence bookkeeping only (no kernel metadata). It passes the runner's
    persistent tensors through, so it never limits CUDA graphs (vLLM takes the weakest builder)."""

    _cudagraph_support = AttentionCGSupport.ALWAYS

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in the base class
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        return RazorPageMetadata(block_table=cm.block_table_tensor, seq_lens=cm.seq_lens,
                                 query_start_loc=cm.query_start_loc,
                                 num_actual_tokens=cm.num_actual_tokens, num_reqs=cm.num_reqs,
                                 slot_mapping=cm.slot_mapping, max_query_len=cm.max_query_len,
                                 max_seq_len=cm.max_seq_len)


def _no_impl():
    raise NotImplementedError("razor KV siblings hold cache only; the main layer's impl runs them")


class RazorPageKVBackend(AttentionBackend):
    """Ring and padding pages: block table only."""

    forward_includes_kv_cache_update = True
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return "RAZOR_PAGE_KV"

    @staticmethod
    def get_impl_cls():
        _no_impl()

    @staticmethod
    def get_builder_cls():
        return RazorPageMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        # MultipleOf, never fixed ints: `customize_attention_spec` would otherwise set
        # block_stride_alignment on the siblings' specs only, and they would stop being equal to the
        # main layers' ring spec (two buckets instead of one).
        return [MultipleOf(1)]


class RazorRetrievalKVBackend(CPUAttentionBackend):
    """Retrieval siblings on CPU: keeps `CPUAttentionMetadataBuilder`, so ``attn_metadata[sibling]``
    is a ready `CPUAttentionMetadata` for (G query heads, 1 KV head) that
    `cpu_attention_with_kv_cache` accepts as is."""

    @staticmethod
    def get_name() -> str:
        return "RAZOR_RETRIEVAL_KV"

    @staticmethod
    def get_impl_cls():
        _no_impl()


class RazorRetrievalPageKVBackend(RazorPageKVBackend):
    """Retrieval siblings on the `triton` path with razor's own sibling attention (where vLLM has no
    Triton): block table, sequence lengths and slot mapping for the Triton writer and attention
    (`forward_paged_triton`)."""

    @staticmethod
    def get_name() -> str:
        return "RAZOR_RETRIEVAL_KV"


def vllm_attention_backend(attention: str) -> type[AttentionBackend]:
    """vLLM's own backend class for `flash_attn` / `triton_attn` (imported on first use)."""
    if attention == "flash_attn":
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

        return FlashAttentionBackend
    if attention == "triton_attn":
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

        return TritonAttentionBackend
    raise ValueError(f"{attention!r} is not one of vLLM's backends razor uses for siblings")


@functools.cache
def retrieval_vllm_backend(attention: str) -> type[AttentionBackend]:
    """Retrieval siblings on the `triton` path served by vLLM's own attention (`flash_attn` or
    `triton_attn`): that backend with its metadata builder kept (FlashAttention's scheduler metadata
    and split count, or TRITON_ATTN's split-KV scratch and segment choice; the builder's own CUDA-graph
    support), so `attn_metadata[sibling]` is what vLLM's impl for (G query heads, 1 KV head) takes.
    Its cache `[blocks, 1, P, 2D]` is the layout both backends declare
    (`[num_blocks, num_kv_heads, block_size, 2 * head_size]`)."""
    base = vllm_attention_backend(attention)

    class RazorRetrievalVllmKVBackend(base):
        @staticmethod
        def get_name() -> str:
            return "RAZOR_RETRIEVAL_KV"

        @staticmethod
        def get_impl_cls():
            _no_impl()

        @classmethod
        def customize_spec(cls, spec):
            # razor planned this spec (page size, grouping); vLLM's own customization would change it
            return spec

    RazorRetrievalVllmKVBackend.__qualname__ = f"RazorRetrievalVllmKVBackend[{base.get_name()}]"
    return RazorRetrievalVllmKVBackend


def sibling_backend(kind: SiblingKind, head_size: int) -> type[AttentionBackend]:
    """The metadata backend of a sibling kind. One class per kind: the runner dedupes attention
    groups by class name, so this keeps one attention group per KV cache group."""
    if kind == "retrieval":
        from razor_vllm.vllm.execution import resolve_execution, resolve_sibling_attention

        if resolve_execution() == "cpu":
            return RazorRetrievalKVBackend
        attention = resolve_sibling_attention(head_size)
        return RazorRetrievalPageKVBackend if attention == "razor" else retrieval_vllm_backend(attention)
    return RazorPageKVBackend


class RazorKVSibling(nn.Module, AttentionLayerBase):
    """A cache-only attention layer: the runner gives it a spec, a cache view, a block table (via
    its group) and a metadata entry; the main layer's impl reads and writes them."""

    kind: SiblingKind = "ring"

    def __init__(self, name: str, spec, num_heads: int, layer: int) -> None:
        super().__init__()
        self.layer_name = name
        self.spec = spec
        self.num_heads = num_heads  # read by get_num_attention_heads_from_layers
        self.layer_index = layer
        self.kv_cache = torch.tensor([])

    def get_kv_cache_spec(self, vllm_config):
        return self.spec

    def get_attn_backend(self):
        return sibling_backend(self.kind, self.spec.head_size)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.layer_name} is a razor KV sibling (cache only), not callable")

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.spec}"


class RazorRetrievalKV(RazorKVSibling):
    """One retrieval KV head of one layer: cache ``[blocks, 1, P, 2D]`` in the retrieval group."""

    kind: SiblingKind = "retrieval"


class RazorRingPage(RazorKVSibling):
    """An extra per-request ring page (local heads that do not fit their main layer's page)."""

    kind: SiblingKind = "ring"


class RazorPadPage(RazorKVSibling):
    """A never-read ring page that keeps vLLM from padding the retrieval bucket."""

    kind: SiblingKind = "pad"


SIBLING_CLASSES: dict[str, type[RazorKVSibling]] = {
    "retrieval": RazorRetrievalKV, "ring": RazorRingPage, "pad": RazorPadPage}


def make_siblings(layout: KVLayout) -> dict[str, nn.Module]:
    p = layout.params
    retr_spec, ring_spec = layout.retrieval_spec(), layout.ring_spec()
    out: dict[str, nn.Module] = {}
    for s in layout.siblings:
        if s.kind == "retrieval":
            out[s.name] = RazorRetrievalKV(s.name, retr_spec, p.num_queries_per_kv, s.layer)
        else:
            out[s.name] = SIBLING_CLASSES[s.kind](s.name, ring_spec, p.num_kv_heads * p.num_queries_per_kv,
                                                  s.layer)
    return out


def register_siblings(vllm_config, layout: KVLayout) -> list[str]:
    """Add the layout's sibling modules to ``vllm_config.compilation_config.static_forward_context``
    (what `get_layers_from_vllm_config` and `forward_context.no_compile_layers` read). Idempotent:
    an existing sibling with the same kind and spec is kept (weight reloads call this again);
    a different object under a sibling's name raises. Returns the names added this call.

    Call it before the runner collects KV cache specs, i.e. from the impl's
    `process_weights_after_loading` (the first impl to get there registers all of them)."""
    ctx = vllm_config.compilation_config.static_forward_context
    for layer in layout.layers:
        if layer.name not in ctx:
            raise ValueError(f"razor: main attention layer {layer.name!r} is not in the forward context; "
                             f"the KV layout was planned for other layer names")
    added = []
    for name, module in make_siblings(layout).items():
        old = ctx.get(name)
        if old is not None:
            if isinstance(old, RazorKVSibling) and old.kind == module.kind and old.spec == module.spec:
                continue
            raise ValueError(f"razor: layer name {name!r} is already taken by {type(old).__name__}")
        ctx[name] = module
        added.append(name)
    return added


def unregister_siblings(vllm_config, layout: KVLayout) -> None:
    """Remove the layout's siblings (tests that build several engines in one process)."""
    ctx = vllm_config.compilation_config.static_forward_context
    for s in layout.siblings:
        if isinstance(ctx.get(s.name), RazorKVSibling):
            del ctx[s.name]
