"""Where RazorAttention's KV lives in vLLM's paged cache: the planning layer (pure Python, no vLLM
import at module level, no attention math).

Retrieval KV heads get one 1-head `FullAttentionSpec` sibling layer each (all in one bucket of
vLLM's hybrid planner); local heads live in per-request ring pages (`CircularBufferSpec`), each
holding the `RingLayout` regions of `heads_per_page` heads. `plan_kv_layout` chooses the page size
and the sibling set; `KVLayout` is the per-layer address table the backend reads. The design, with
the vLLM rules each choice follows, is docs/design.md ("The paged layout"); the sibling modules
themselves are `razor_vllm.vllm.siblings`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from razor_vllm.kernels.ring_layout import RingLayout, _cdiv, dtype_size

RETRIEVAL_SUFFIX = "razor_retrieval_h"
RING_SUFFIX = "razor_ring_p"
PAD_SUFFIX = "razor_pad_"


def default_main_layer_name(layer: int) -> str:
    """vLLM's name of the attention layer of decoder layer `layer` in Llama-like models."""
    return f"model.layers.{layer}.self_attn.attn"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalHead:
    kv_head: int
    """Rank-local KV head index in the layer (q heads ``kv_head*G .. kv_head*G+G-1``)."""
    name: str
    """Sibling layer holding this head: cache ``[blocks, 1, P, 2D]``, its own metadata entry and slot
    mapping in the forward context (group: the retrieval group)."""


@dataclass(frozen=True)
class LocalHead:
    kv_head: int
    page: str
    """Layer whose (1-block-per-request) ring page holds this head: the main layer itself or a
    ring-page sibling; block id = ``attn_metadata[page].block_table[req, 0]``."""
    offset: int
    """First slot of this head's `RingLayout` region inside the page."""


@dataclass(frozen=True)
class LayerLayout:
    index: int
    name: str
    retrieval: tuple[RetrievalHead, ...]
    local: tuple[LocalHead, ...]


SiblingKind = Literal["retrieval", "ring", "pad"]


@dataclass(frozen=True)
class SiblingDecl:
    name: str
    kind: SiblingKind
    layer: int


@dataclass(frozen=True)
class KVLayoutParams:
    retrieval_heads: tuple[tuple[int, ...], ...]
    """[layer] -> rank-local retrieval KV heads (every other head is local)."""
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    """KV cache dtype."""
    sinks: int
    window: int
    max_model_len: int
    num_queries_per_kv: int = 1
    kernel_block_multiple: int = 32
    heads_per_page: int | None = None
    """Local heads per ring page (k); None = the k with the largest vLLM capacity."""
    main_layer_names: tuple[str, ...] | None = None
    kv_quant_mode: Any = None
    """`vllm.v1.kv_cache_interface.KVQuantMode` of the cache (None = NONE)."""

    def __post_init__(self):
        object.__setattr__(self, "retrieval_heads", tuple(tuple(sorted(set(r))) for r in self.retrieval_heads))
        if self.main_layer_names is not None:
            object.__setattr__(self, "main_layer_names", tuple(self.main_layer_names))
            if len(self.main_layer_names) != len(self.retrieval_heads):
                raise ValueError("main_layer_names must have one name per layer")
        for layer, heads in enumerate(self.retrieval_heads):
            if any(not 0 <= h < self.num_kv_heads for h in heads):
                raise ValueError(f"layer {layer}: retrieval heads {heads} outside 0..{self.num_kv_heads - 1}")
        if self.window < 1 or self.sinks < 0:
            raise ValueError("window must be >= 1 and sinks >= 0")
        if self.heads_per_page is not None and not 1 <= self.heads_per_page <= self.num_kv_heads:
            raise ValueError(f"heads_per_page must be in 1..{self.num_kv_heads}")

    @property
    def num_layers(self) -> int:
        return len(self.retrieval_heads)

    def main_name(self, layer: int) -> str:
        return self.main_layer_names[layer] if self.main_layer_names else default_main_layer_name(layer)

    def local_heads(self, layer: int) -> tuple[int, ...]:
        keep = set(self.retrieval_heads[layer])
        return tuple(h for h in range(self.num_kv_heads) if h not in keep)

    @property
    def token_bytes_per_head(self) -> int:
        """K+V bytes of one token of one KV head (one cache slot)."""
        return 2 * self.head_size * dtype_size(self.dtype)


def vllm_group_counts(bucket_sizes: Mapping[str, int]) -> tuple[int, dict[str, int]]:
    """Mirror of `_get_kv_cache_groups_uniform_page_size`'s split (vLLM 0.32): returns
    (layers per group, {bucket: number of groups}). One bucket = one group (uniform-spec path).
    Checked against vLLM by the tests."""
    sizes = {k: v for k, v in bucket_sizes.items() if v > 0}
    if len(sizes) == 1:
        (k, v), = sizes.items()
        return v, {k: 1}
    lo, hi = min(sizes.values()), max(sizes.values())
    group_size = hi if hi < lo * 1.5 else lo
    return group_size, {k: _cdiv(v, group_size) for k, v in sizes.items()}


@dataclass(frozen=True)
class Accounting:
    """vLLM's own arithmetic for this plan (`get_kv_cache_config_from_groups`,
    `get_max_concurrency_for_kv_cache_config`)."""

    group_size: int
    retrieval_groups: int
    ring_groups: int
    page_bytes: int

    @property
    def num_groups(self) -> int:
        return self.retrieval_groups + self.ring_groups

    @property
    def block_bytes(self) -> int:
        """Bytes of one pool block (one page in each of ``group_size`` layer slots)."""
        return self.group_size * self.page_bytes


@dataclass(frozen=True)
class KVLayout:
    params: KVLayoutParams
    page_tokens: int
    """P: tokens per retrieval block = slots per ring page."""
    heads_per_page: int
    ring: RingLayout
    layers: tuple[LayerLayout, ...]
    siblings: tuple[SiblingDecl, ...]
    accounting: Accounting

    # -- specs ------------------------------------------------------------------------------------
    def _spec_kwargs(self) -> dict[str, Any]:
        p = self.params
        kw: dict[str, Any] = dict(block_size=self.page_tokens, num_kv_heads=1, head_size=p.head_size,
                                  head_size_v=p.head_size, dtype=p.dtype)
        if p.kv_quant_mode is not None:
            kw["kv_quant_mode"] = p.kv_quant_mode
        return kw

    def retrieval_spec(self):
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        return FullAttentionSpec(**self._spec_kwargs())

    def ring_spec(self):
        from vllm.v1.kv_cache_interface import CircularBufferSpec

        return CircularBufferSpec(**self._spec_kwargs())

    def customize(self, spec):
        """What `RazorAttentionBackend.customize_spec` returns for a main layer's stock spec:
        the ring-page spec (idempotent; any other spec is returned unchanged)."""
        from vllm.v1.kv_cache_interface import CircularBufferSpec, FullAttentionSpec

        ring = self.ring_spec()
        if spec == ring:
            return spec
        if isinstance(spec, CircularBufferSpec):
            raise ValueError(f"razor: unexpected circular-buffer spec {spec}, expected {ring}")
        if isinstance(spec, FullAttentionSpec) and spec.sliding_window is None:
            p = self.params
            if (spec.num_kv_heads, spec.head_size, spec.dtype) != (p.num_kv_heads, p.head_size, p.dtype):
                raise ValueError(f"razor: layer spec {spec} does not match the KV layout "
                                 f"({p.num_kv_heads} KV heads, head_size {p.head_size}, {p.dtype})")
            return ring
        return spec

    def kv_cache_specs(self) -> dict[str, Any]:
        """Every layer name -> spec, as the model runner's `get_kv_cache_spec` reports them."""
        specs: dict[str, Any] = {}
        ring, retr = self.ring_spec(), self.retrieval_spec()
        for layer in self.layers:
            specs[layer.name] = ring
        for s in self.siblings:
            specs[s.name] = retr if s.kind == "retrieval" else ring
        return specs

    # -- accounting -------------------------------------------------------------------------------
    def blocks_per_request(self, num_tokens: int | None = None) -> int:
        """Pool blocks one request of `num_tokens` (default max_model_len) holds."""
        t = self.params.max_model_len if num_tokens is None else num_tokens
        a = self.accounting
        return a.retrieval_groups * _cdiv(t, self.page_tokens) + a.ring_groups

    def bytes_per_request(self, num_tokens: int | None = None) -> int:
        return self.blocks_per_request(num_tokens) * self.accounting.block_bytes

    def ideal_bytes_per_request(self, num_tokens: int | None = None) -> int:
        """The formula: retrieval heads x T + local heads x (S + W + 1), no paging."""
        p = self.params
        t = p.max_model_len if num_tokens is None else num_tokens
        n_r = sum(len(r) for r in p.retrieval_heads)
        n_l = p.num_layers * p.num_kv_heads - n_r
        return p.token_bytes_per_head * (n_r * t + n_l * min(t, p.sinks + p.window + 1))

    def capacity(self, available_bytes: int) -> tuple[int, float]:
        """(KV cache size in tokens, max concurrency) exactly as vLLM logs them."""
        num_blocks = available_bytes // self.accounting.block_bytes
        conc = num_blocks / self.blocks_per_request()
        return int(conc * self.params.max_model_len), conc

    def stock_capacity(self, available_bytes: int, block_size: int = 128) -> tuple[int, float]:
        """The same for stock vLLM (one FullAttentionSpec(H) group, `block_size`-token blocks)."""
        p = self.params
        block_bytes = p.num_layers * p.num_kv_heads * block_size * p.token_bytes_per_head
        conc = (available_bytes // block_bytes) / _cdiv(p.max_model_len, block_size)
        return int(conc * p.max_model_len), conc

    def layer(self, index: int) -> LayerLayout:
        return self.layers[index]

    def describe(self) -> str:
        p, a = self.params, self.accounting
        n_r = sum(len(x.retrieval) for x in self.layers)
        n_ring = self.num_ring_pages
        stock_b = p.num_layers * p.num_kv_heads * p.token_bytes_per_head * _round_up(p.max_model_len, 128)
        return (f"razor KV layout: {n_r} retrieval heads in 1-head FullAttention siblings, "
                f"{p.num_layers * p.num_kv_heads - n_r} local heads in {n_ring} ring pages "
                f"({self.heads_per_page}/page, {self.ring.slots} slots each); P={self.page_tokens} "
                f"tokens/slots, {a.num_groups} KV cache groups of {a.group_size} layers, "
                f"{self.bytes_per_request() / 2**20:.1f} MiB/request at {p.max_model_len} tokens "
                f"vs {stock_b / 2**20:.1f} MiB stock ({stock_b / self.bytes_per_request():.2f}x)")

    @property
    def num_ring_pages(self) -> int:
        return len(self.layers) + sum(s.kind != "retrieval" for s in self.siblings)


def _assign_rings(params: KVLayoutParams, k: int, slots: int) -> tuple[list[list[LocalHead]], list[SiblingDecl]]:
    """Local heads -> (page, offset): own main page first, then free slots of other pages, then extra
    ring pages (named after the layer of their first head)."""
    L = params.num_layers
    pages: list[tuple[str, int]] = [(params.main_name(l), l) for l in range(L)]  # (name, layer)
    used = [0] * L
    local: list[list[LocalHead]] = [[] for _ in range(L)]
    overflow: list[tuple[int, int]] = []
    for l in range(L):
        for h in params.local_heads(l):
            if used[l] < k:
                local[l].append(LocalHead(h, pages[l][0], used[l] * slots))
                used[l] += 1
            else:
                overflow.append((l, h))
    extras: list[SiblingDecl] = []
    free = [i for i in range(L) for _ in range(k - used[i])]
    for l, h in overflow:
        if free:
            i = free.pop(0)
        else:
            j = len(extras)
            name = f"{params.main_name(l)}.{RING_SUFFIX}{j}"
            extras.append(SiblingDecl(name, "ring", l))
            pages.append((name, l))
            used.append(0)
            i = len(pages) - 1
            free.extend([i] * k)
            free.pop(0)
        local[l].append(LocalHead(h, pages[i][0], used[i] * slots))
        used[i] += 1
    for heads in local:
        heads.sort(key=lambda x: x.kv_head)
    return local, extras


def _plan_for_k(params: KVLayoutParams, k: int) -> KVLayout:
    ring = RingLayout(params.sinks, params.window, params.head_size, params.dtype)
    P = _round_up(k * ring.slots, params.kernel_block_multiple)
    local, extras = _assign_rings(params, k, ring.slots)
    retr = [SiblingDecl(f"{params.main_name(l)}.{RETRIEVAL_SUFFIX}{h}", "retrieval", l)
            for l in range(params.num_layers) for h in params.retrieval_heads[l]]
    n_f, n_ring = len(retr), params.num_layers + len(extras)
    page_bytes = P * params.token_bytes_per_head
    T = params.max_model_len

    def cost(pads: int) -> tuple[int, int, dict[str, int]]:
        g, groups = vllm_group_counts({"retrieval": n_f, "ring": n_ring + pads})
        blocks = groups.get("retrieval", 0) * _cdiv(T, P) + groups.get("ring", 0)
        return blocks * g * page_bytes, g, groups

    # Padding pages only help when vLLM would pad the retrieval bucket; search the cheapest count.
    best = min(range(0, 2 * max(n_f, 1) + 1), key=lambda d: (cost(d)[0], d))
    _, g, groups = cost(best)
    # Fill the last ring group with explicit padding pages: the same bytes vLLM would pad anyway,
    # but no "Add N padding layers, may waste X%" warning and the waste shows in describe().
    best += groups.get("ring", 0) * g - (n_ring + best)
    last = params.num_layers - 1
    pads = [SiblingDecl(f"{params.main_name(last)}.{PAD_SUFFIX}{j}", "pad", last) for j in range(best)]
    layers = tuple(
        LayerLayout(l, params.main_name(l),
                    tuple(RetrievalHead(h, f"{params.main_name(l)}.{RETRIEVAL_SUFFIX}{h}")
                          for h in params.retrieval_heads[l]),
                    tuple(local[l]))
        for l in range(params.num_layers))
    acc = Accounting(g, groups.get("retrieval", 0), groups.get("ring", 0), page_bytes)
    return KVLayout(params, P, k, ring, layers, tuple(retr + extras + pads), acc)


GROUP_TOLERANCE = 0.02
"""A plan with fewer KV cache groups (block tables) wins if it costs at most 2% more memory."""


def plan_kv_layout(params: KVLayoutParams) -> KVLayout:
    """The layout for `params`: fixed `heads_per_page`, or the k in 1..H with the largest vLLM
    capacity at max_model_len, preferring fewer groups (then larger k) within `GROUP_TOLERANCE`."""
    if all(len(r) == params.num_kv_heads for r in params.retrieval_heads):
        raise ValueError("razor: every head is a retrieval head; serve with the stock KV cache "
                         "(nothing to compress)")
    ks = [params.heads_per_page] if params.heads_per_page else range(1, params.num_kv_heads + 1)
    plans = [_plan_for_k(params, k) for k in ks]
    best = min(x.bytes_per_request() for x in plans)
    near = [x for x in plans if x.bytes_per_request() <= best * (1 + GROUP_TOLERANCE)]
    return min(near, key=lambda x: (x.accounting.num_groups, x.bytes_per_request(), -x.heads_per_page))


def params_from_vllm(vllm_config, retrieval_heads: Sequence[Iterable[int]], *, sinks: int, window: int,
                     main_layer_names: Sequence[str] | None = None,
                     heads_per_page: int | None = None) -> KVLayoutParams:
    """`KVLayoutParams` for the model of `vllm_config` (TP=1: rank-local == global heads)."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import KVQuantMode, get_kv_quant_mode

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    kv = mc.get_num_kv_heads(pc)
    q = mc.get_num_attention_heads(pc)
    cache_dtype = cc.cache_dtype
    dtype = mc.dtype if cache_dtype in ("auto", None) else STR_DTYPE_TO_TORCH_DTYPE[cache_dtype]
    qm = get_kv_quant_mode(cache_dtype) if cache_dtype not in ("auto", None) else KVQuantMode.NONE
    return KVLayoutParams(retrieval_heads=tuple(tuple(r) for r in retrieval_heads), num_kv_heads=kv,
                          head_size=mc.get_head_size(), dtype=dtype, sinks=sinks, window=window,
                          max_model_len=mc.max_model_len, num_queries_per_kv=q // kv,
                          heads_per_page=heads_per_page,
                          main_layer_names=tuple(main_layer_names) if main_layer_names else None,
                          kv_quant_mode=None if qm == KVQuantMode.NONE else qm)
