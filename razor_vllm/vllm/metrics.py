"""RazorAttention's KV saving on vLLM's /metrics.

vLLM 0.32 loads the entry point group `vllm.stat_logger_plugins` in the API server process of
`vllm serve` (AsyncLLM, `load_stat_logger_plugin_factories`) and builds each class once the engine has
started, with the same `VllmConfig` the engine got. That process serves /metrics from prometheus_client's
registry (`get_prometheus_registry`), so gauges registered here appear next to vLLM's own `vllm:*`
metrics. The general plugin (`razor_vllm.vllm.plugin`) cannot do this: it runs before any config exists.

Exported when `--additional-config` has a `razor` section (nothing otherwise):

| metric | meaning |
|---|---|
| `razor:retrieval_head_fraction` | retrieval KV heads / all KV heads (after `retrieval`: all -> 1, none -> 0) |
| `razor:kv_bytes_per_token` | KV bytes one more token of a sequence costs: retrieval heads only with `kv_layout` paged; every head with uniform (its memory is not saved) |
| `razor:kv_bytes_per_token_full` | the same for stock attention: layers x KV heads x 2 (K, V) x head_dim x dtype size |
| `razor:kv_bytes_per_request_fixed` | paged: the per-request ring pages (sinks + window + compensation state of every local head), in vLLM's block accounting; 0 for uniform |
| `razor:kv_fraction` | KV entries kept / full for one sequence of max_model_len tokens (what the start-up log line says) |
| `razor:config_info` | 1, labelled with head_config, window, sinks, compensation, retrieval, kv_layout |

Every metric carries vLLM's `model_name` label. The values are computed from the configuration only
(they are fixed for the engine's life), with the same code the backend uses, so they cannot drift
from what the engine does. Side effect of any stat logger plugin (vLLM's rule): with
`--disable-log-stats` vLLM still collects stats for the plugins, but prints no periodic stats lines.
"""

from __future__ import annotations

import threading

from prometheus_client import Gauge
from vllm.logger import init_logger
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

logger = init_logger(f"vllm.{__name__}")

_GAUGES: dict[str, Gauge] = {}
_LOCK = threading.Lock()
_INFO_LABELS = ("model_name", "head_config", "window", "sinks", "compensation", "retrieval", "kv_layout")
_DOCS = {
    "razor:retrieval_head_fraction": "RazorAttention: retrieval KV heads (full cache) / all KV heads",
    "razor:kv_bytes_per_token": "RazorAttention: KV cache bytes per additional token of a sequence "
                                "(retrieval heads only with kv_layout paged; all heads with uniform)",
    "razor:kv_bytes_per_token_full": "KV cache bytes per token of stock attention (all KV heads)",
    "razor:kv_bytes_per_request_fixed": "RazorAttention kv_layout paged: ring-page bytes every request "
                                        "holds for its whole life (0 with uniform)",
    "razor:kv_fraction": "RazorAttention: KV entries kept / full for one sequence of max_model_len tokens",
}


def _gauge(name: str, labels: tuple[str, ...]) -> Gauge:
    """One process-wide Gauge per name: prometheus_client refuses a second registration, and vLLM
    may build its stat loggers more than once per process (tests, elastic EP re-init)."""
    with _LOCK:
        g = _GAUGES.get(name)
        if g is None:
            doc = _DOCS.get(name, "RazorAttention settings of this engine (value 1)")
            g = _GAUGES[name] = Gauge(name, doc, labelnames=list(labels), multiprocess_mode="mostrecent")
        return g


def razor_kv_figures(vllm_config) -> dict[str, float] | None:
    """The figures above for an engine configuration (None when razor is not configured).

    Raises what the backend raises for a bad setting (RazorConfigError, HeadConfigError): the
    engine refuses those at start, before this runs in a server.
    """
    from razor_vllm.config import parse_razor_config
    from razor_vllm.vllm import engine_state
    from razor_vllm.vllm import layout as kvl

    extra = vllm_config.additional_config
    if not isinstance(extra, dict) or "razor" not in extra:
        return None
    cfg = parse_razor_config(extra)
    mc = vllm_config.model_config
    state = engine_state.current()  # the same policy and layout objects the backend uses
    policy = state.policy(vllm_config)
    params = kvl.params_from_vllm(vllm_config, policy.retrieval_heads, sinks=policy.sinks, window=policy.window)
    total_heads = policy.num_layers * policy.num_kv_heads
    retrieval = sum(len(h) for h in policy.retrieval_heads)
    full = total_heads * params.token_bytes_per_head
    figures = {
        "razor:retrieval_head_fraction": retrieval / total_heads,
        "razor:kv_bytes_per_token_full": float(full),
        "razor:kv_bytes_per_token": float(full),
        "razor:kv_bytes_per_request_fixed": 0.0,
        "razor:kv_fraction": policy.kv_fraction(mc.max_model_len),
    }
    if cfg.kv_layout == "paged":
        layout = state.layout(vllm_config, policy)
        figures["razor:kv_bytes_per_token"] = float(retrieval * params.token_bytes_per_head)
        figures["razor:kv_bytes_per_request_fixed"] = float(layout.accounting.ring_groups
                                                            * layout.accounting.block_bytes)
    return figures


class RazorStatLogger(AggregateStatLoggerBase):
    """`vllm.stat_logger_plugins: razor`. Sets the gauges once; records nothing per step (vLLM's own
    `vllm:kv_cache_usage_perc` etc. already cover the runtime state, razor's groups included)."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        self.vllm_config = vllm_config
        try:
            figures = razor_kv_figures(vllm_config)
        except Exception as e:  # never take the server down for a metric
            logger.warning("razor metrics not exported: %s", e)
            return
        if figures is None:
            return
        from razor_vllm.config import parse_razor_config

        model_name = vllm_config.model_config.served_model_name
        if isinstance(model_name, (list, tuple)):
            model_name = model_name[0]
        for name, value in figures.items():
            _gauge(name, ("model_name",)).labels(model_name=str(model_name)).set(value)
        cfg = parse_razor_config(vllm_config.additional_config)
        _gauge("razor:config_info", _INFO_LABELS).labels(
            model_name=str(model_name), head_config=cfg.head_config, window=str(cfg.window),
            sinks=str(cfg.sinks), compensation=cfg.compensation, retrieval=cfg.retrieval,
            kv_layout=cfg.kv_layout).set(1)
        logger.info("razor metrics on /metrics: %s",
                    ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        pass

    def log_engine_initialized(self):
        pass
