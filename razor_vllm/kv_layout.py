"""Where RazorAttention's KV lives in vLLM's paged cache: the planning layer (no attention math).

A layer's KV heads split into retrieval heads (full cache) and local heads (S sinks + a window of W
exact tokens + one compensation token). One paged tensor per layer holding every head saves nothing
(a vLLM block holds all KV heads of its layer), so the two kinds must be paged separately, with
stock specs and stock managers only. This module decides how, and produces the specs, the sibling
`AttentionLayerBase` modules and the per-layer address table the backend reads.

The layout ("head pool")
========================
* **Retrieval heads -> one 1-head `FullAttentionSpec` sibling per retrieval KV head.**
  ``FullAttentionSpec(block_size=P, num_kv_heads=1, head_size=D)``, registered as
  ``f"{main}.razor_retrieval_h{h}"``. Every retrieval head of the model has the *same* spec
  whatever its layer's count R_l, so all of them fall into one bucket of the hybrid planner and share
  one block table. Unequal R_l (SmolLM2: 0..3 per layer) therefore cost nothing: nothing is padded
  to max R_l, and a layer without retrieval heads simply has no retrieval sibling.
* **Local heads -> per-request ring pages, ``CircularBufferSpec(block_size=P, num_kv_heads=1)``.**
  One page per request for the request's whole life (stock `CircularBufferManager`). A page holds
  the rings of ``heads_per_page`` (k) local heads, each a region of ``RingLayout.slots`` slots:
  S sink slots, a W-slot window ring, fp32 Ksum/Vsum and a meta slot (the frontier F). The main
  layer's *own* spec is such a page (the backend's `customize_spec` returns `KVLayout.ring_spec`
  for every layer: same spec for every layer, no per-layer information needed in a classmethod),
  so the main layer needs no sibling when its local heads fit (k >= H - R_l); heads that do not fit
  go to free slots of other pages, then to extra ring-page siblings ``f"{main}.razor_ring_p{j}"``.
* **Padding pages** ``f"{main}.razor_pad_{j}"`` (same ring spec, never read) are added only when
  vLLM's group-size rule would otherwise pad the *retrieval* bucket (see below). A padding page
  costs one page per request; a padded retrieval layer would cost a whole sequence.

Why these choices (vLLM 0.32, checked against the code; `tests/test_kv_layout.py` runs the real
planner on the output)
-----------------------------------------------------------------------------------------------
1. **No per-layer R_l in a spec.** `_get_kv_cache_groups_uniform_page_size` buckets layers by
   *equal* spec (a FullAttentionSpec merge asserts equal ``num_kv_heads``), then cuts every bucket
   into groups of ``group_size = min(bucket sizes)`` layers (``max`` if ``max < 1.5 min``), padding
   the last group of each bucket. Per-layer ``FullAttentionSpec(R_l)`` gives buckets {R=1: 5,
   R=2: 3, R=3: 1} on SmolLM2, hence ``group_size = 1``: one group per layer (~70 block tables).
   1-head specs give one retrieval bucket.
2. **Uniform page, no padding.** With the CPU backend's layout (LBHNC: layer-outer, not
   block-outermost) `_get_packed_kv_cache_groups` does not apply and `validate_kv_cache_layout`
   rejects mixed page sizes across several groups, so `unify_kv_cache_spec_page_size` must see one
   page size. It scales a smaller page's ``block_size`` by an integer ratio, or pads it
   (``page_size_padded``: wasted bytes). Both specs here have the shape [1 head, P slots, 2D] with
   the same P, so unification is a no-op and ``page_size_padded`` stays None: zero page padding.
   The same single HNC shape keeps `resolve_kv_cache_layout` free to pick any layout.
3. **Kernel block size.** The CPU backend declares ``get_supported_kernel_block_sizes() ==
   [MultipleOf(32)]`` (its AMX path needs blocks of 32k tokens; the 'vec' kernels run any size,
   verified for 32..864) and Triton ``MultipleOf(16)``. P is rounded up to a multiple of
   ``kernel_block_multiple`` (32), so `select_common_block_size` keeps the manager block whole
   (kernel block == P, block table entries are manager block ids). The aux backends declare
   ``MultipleOf``, never fixed ints: `customize_attention_spec` would otherwise set
   ``block_stride_alignment`` on the siblings' specs only, and they would stop being equal to the
   main layers' ring spec (two buckets).
4. **Ring (CircularBufferSpec), not SlidingWindowSpec, for the local heads.** vLLM sizes a
   `SlidingWindowSpec` group per request as ``cdiv(W - 1 + max_in_flight_tokens, B) + 1`` blocks
   (`SlidingWindowSpec.max_admission_blocks_per_request`; ``max_in_flight_tokens =
   max_num_batched_tokens`` = 2048 by default): with W = 256 that reserves ~2300 tokens per local
   head instead of 256, and the "KV cache size"/max-concurrency figures drop from 5.2x to 2.3x
   of stock on SmolLM2 at 8k (4.2x with max_num_batched_tokens=256; measured in the tests). A
   ring holds exactly S + W + state per head, counted as 1 page per request, independent of the
   chunk size, because the current chunk's own keys are in the forward's key/value tensors. It
   also keeps sinks (a SW group frees the first blocks) and the compensation state in the same
   page. Price: the ring is allocated in full even for a short request (fixed ``pages * P`` slots
   per request: break-even with stock at about ``ring slots / (L * H)`` tokens, ~270 on SmolLM2).
5. **P ties the two kinds together**: the retrieval block is P tokens and a ring page is P slots,
   ``P = round_up(k * ring_slots, 32)``. Small k gives small retrieval blocks (less tail waste,
   more ring-page siblings and groups); k = H puts every layer's rings in its own cache. ``k`` is
   chosen (unless given) to maximise vLLM's own capacity figure at ``max_model_len``, ties going
   to the larger k (fewer modules). SmolLM2 W=256: k=1, P=288 (5.2x stock); k=3, P=800 (4.7x).
6. **Names** contain exactly one integer, the layer index (`extract_layer_index` asserts it;
   `bind_kv_cache` tolerates several layers per index on CPU and CUDA).
7. **Requirements** (the backend enforces them): hybrid KV cache manager on (a CircularBufferSpec
   cannot be promoted to full attention), prefix caching off (a ring cannot be rebuilt from cached
   blocks), the backend writes its own caches (``forward_includes_kv_cache_update = True``: the main
   layer's ring group has no meaningful slot mapping), identical plans on all TP ranks (pass the
   same retrieval-slot counts on every rank: names and specs must match across workers).

Fold invariant (ring form). Per (request, layer, local head) the compensation covers exactly
``[S, F)``. A step with ``start`` cached tokens and C new ones attends sinks, the compensation and
exact keys ``[F_old, p]`` (F_old = max(S, start - W + 1)); the past part ``[F_old, start)`` is in
the ring, the chunk part in the forward's K/V. It then folds ``[F_old, F_new)``, ``F_new = max(S,
start + C - W + 1)`` (ring for positions < start, K/V tensors for the rest) *before* writing the
chunk positions ``>= max(S, F_new)`` into the ring at ``RingLayout.window_slot(p)``: an overwritten
ring position q = p - W*j is < F_new, i.e. already folded. ``start == 0`` resets the page (it is
not zeroed by vLLM: CircularBuffer groups are excluded from block zeroing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

RETRIEVAL_SUFFIX = "razor_retrieval_h"
RING_SUFFIX = "razor_ring_p"
PAD_SUFFIX = "razor_pad_"


def default_main_layer_name(layer: int) -> str:
    """vLLM's name of the attention layer of decoder layer `layer` in Llama-like models."""
    return f"model.layers.{layer}.self_attn.attn"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------
# Ring region of one local head
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RingLayout:
    """Slots of one local head's region inside a ring page. A slot is one cache row: 2*D elements of
    the KV dtype (K in the first D, V in the last D, as for a token of the paged caches).

    ======================  ==========================================================
    ``[0, S)``              sink K|V for positions 0..S-1
    ``[S, S+W)``            window ring: position p >= S at ``window_slot(p)``
    ``ksum_offset``         fp32 sum of folded K (``sum_slots`` slots, bit-packed)
    ``vsum_offset``         fp32 sum of folded V
    ``meta_offset``         int32 [F, 0, ...]: frontier (compensation covers [S, F))
    ======================  ==========================================================
    """

    sinks: int
    window: int
    head_size: int
    dtype: torch.dtype

    @property
    def slot_bytes(self) -> int:
        return 2 * self.head_size * dtype_size(self.dtype)

    @property
    def sum_slots(self) -> int:
        """Slots per fp32 sum of D values (1 for 16/32-bit caches, 2 for fp8)."""
        return _cdiv(4 * self.head_size, self.slot_bytes)

    @property
    def window_offset(self) -> int:
        return self.sinks

    @property
    def ksum_offset(self) -> int:
        return self.sinks + self.window

    @property
    def vsum_offset(self) -> int:
        return self.ksum_offset + self.sum_slots

    @property
    def meta_offset(self) -> int:
        return self.vsum_offset + self.sum_slots

    @property
    def slots(self) -> int:
        return self.meta_offset + 1

    def window_slot(self, pos: int) -> int:
        """Slot (relative to the head's region) of position `pos` >= S in the window ring."""
        if pos < self.sinks:
            raise ValueError(f"position {pos} is a sink (< {self.sinks})")
        return self.sinks + (pos - self.sinks) % self.window

    def region(self, page: torch.Tensor, offset: int) -> torch.Tensor:
        """`[slots, 2*D]` view of the region at slot `offset` of one page `[P, 2*D]` (no copy)."""
        return page[offset:offset + self.slots]

    def sums(self, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 `[D]` views (Ksum, Vsum) of a region (requires a contiguous last dim)."""
        d = self.head_size
        k = region[self.ksum_offset:self.ksum_offset + self.sum_slots].reshape(-1).view(torch.float32)[:d]
        v = region[self.vsum_offset:self.vsum_offset + self.sum_slots].reshape(-1).view(torch.float32)[:d]
        return k, v

    def meta(self, region: torch.Tensor) -> torch.Tensor:
        """int32 view of the meta slot; element 0 is the frontier F."""
        return region[self.meta_offset].view(torch.int32)


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


# --------------------------------------------------------------------------------------------------
# Sibling modules and their metadata-only backends
# --------------------------------------------------------------------------------------------------
@dataclass
class RazorPageMetadata:
    """What a ring page's builder hands the forward: the page of request i is
    ``kv_cache[block_table[i, 0], 0]`` (`[P, 2D]`)."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    num_actual_tokens: int
    num_reqs: int


def _page_builder_cls():
    from vllm.v1.attention.backend import AttentionMetadataBuilder

    class RazorPageMetadataBuilder(AttentionMetadataBuilder[RazorPageMetadata]):
        """Block table + sequence bookkeeping only (no kernel metadata)."""

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)

        def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
            cm = common_attn_metadata
            return RazorPageMetadata(block_table=cm.block_table_tensor, seq_lens=cm.seq_lens,
                                     query_start_loc=cm.query_start_loc,
                                     num_actual_tokens=cm.num_actual_tokens, num_reqs=cm.num_reqs)

    return RazorPageMetadataBuilder


_AUX: dict[str, type] = {}


def _aux_backend(kind: str) -> type:
    """Metadata-only backends of the siblings (cached: the runner dedupes attention groups by class
    name, and one class per kind keeps one attention group per KV cache group).

    * "retrieval": on CPU a subclass of `CPUAttentionBackend` keeping `CPUAttentionMetadataBuilder`,
      so ``attn_metadata[sibling]`` is a ready `CPUAttentionMetadata` for (G query heads, 1 KV head)
      that `cpu_attention_with_kv_cache` accepts as is; elsewhere the page builder (block table,
      seq lens) for the backend's own kernels.
    * "page": ring/padding pages: block table only.

    Both declare kernel block sizes as `MultipleOf` (see the module docstring, point 3).
    """
    if kind in _AUX:
        return _AUX[kind]
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionBackend, MultipleOf

    def no_impl():
        raise NotImplementedError("razor KV siblings hold cache only; the main layer's impl runs them")

    if kind == "retrieval" and current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        class RazorRetrievalKVBackend(CPUAttentionBackend):
            @staticmethod
            def get_name() -> str:
                return "RAZOR_RETRIEVAL_KV"

            @staticmethod
            def get_impl_cls():
                no_impl()

        cls: type = RazorRetrievalKVBackend
    else:
        builder = _page_builder_cls()

        class RazorPageKVBackend(AttentionBackend):
            forward_includes_kv_cache_update = True
            supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]

            @staticmethod
            def get_name() -> str:
                return "RAZOR_PAGE_KV"

            @staticmethod
            def get_impl_cls():
                no_impl()

            @staticmethod
            def get_builder_cls():
                return builder

            @staticmethod
            def get_supported_kernel_block_sizes(kv_cache_spec=None):
                return [MultipleOf(1)]

        cls = RazorPageKVBackend
        if kind == "retrieval":
            cls = type("RazorRetrievalKVBackend", (RazorPageKVBackend,),
                       {"get_name": staticmethod(lambda: "RAZOR_RETRIEVAL_KV")})
    _AUX[kind] = cls
    return cls


def _sibling_base():
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    return AttentionLayerBase


def _make_sibling_classes():
    AttentionLayerBase = _sibling_base()

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
            return _aux_backend("retrieval" if self.kind == "retrieval" else "page")

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

    return RazorKVSibling, RazorRetrievalKV, RazorRingPage, RazorPadPage


_CLASSES: tuple | None = None


def sibling_classes():
    """(RazorKVSibling, RazorRetrievalKV, RazorRingPage, RazorPadPage), built on first use so that
    importing this module does not import vLLM."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_sibling_classes()
    return _CLASSES


def make_siblings(layout: KVLayout) -> dict[str, nn.Module]:
    base, retr_cls, ring_cls, pad_cls = sibling_classes()
    p = layout.params
    retr_spec, ring_spec = layout.retrieval_spec(), layout.ring_spec()
    out: dict[str, nn.Module] = {}
    for s in layout.siblings:
        if s.kind == "retrieval":
            out[s.name] = retr_cls(s.name, retr_spec, p.num_queries_per_kv, s.layer)
        else:
            cls = ring_cls if s.kind == "ring" else pad_cls
            out[s.name] = cls(s.name, ring_spec, p.num_kv_heads * p.num_queries_per_kv, s.layer)
    return out


def register_siblings(vllm_config, layout: KVLayout) -> list[str]:
    """Add the layout's sibling modules to ``vllm_config.compilation_config.static_forward_context``
    (what `get_layers_from_vllm_config` and `forward_context.no_compile_layers` read). Idempotent:
    an existing sibling with the same kind and spec is kept (weight reloads call this again);
    a different object under a sibling's name raises. Returns the names added this call.

    Call it before the runner collects KV cache specs, i.e. from the impl's
    `process_weights_after_loading` (the first impl to get there registers all of them)."""
    ctx = vllm_config.compilation_config.static_forward_context
    base = sibling_classes()[0]
    for layer in layout.layers:
        if layer.name not in ctx:
            raise ValueError(f"razor: main attention layer {layer.name!r} is not in the forward context; "
                             f"the KV layout was planned for other layer names")
    added = []
    for name, module in make_siblings(layout).items():
        old = ctx.get(name)
        if old is not None:
            if isinstance(old, base) and old.kind == module.kind and old.spec == module.spec:
                continue
            raise ValueError(f"razor: layer name {name!r} is already taken by {type(old).__name__}")
        ctx[name] = module
        added.append(name)
    return added


def unregister_siblings(vllm_config, layout: KVLayout) -> None:
    ctx = vllm_config.compilation_config.static_forward_context
    base = sibling_classes()[0]
    for s in layout.siblings:
        if isinstance(ctx.get(s.name), base):
            del ctx[s.name]


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
