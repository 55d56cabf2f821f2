"""scripts/bench_serving.py: the physical-limit arithmetic that docs/performance.md prints beside
every measurement, checked against the formulas written out by hand for SmolLM2-135M (30 layers x 3
KV heads x head_dim 64, fp32) and the shipped head config (14 retrieval KV heads)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOL = Path.home() / ".cache" / "razor-vllm" / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "scripts" / "bench_serving.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while being created
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def facts(bench):
    if not (SMOL / "config.json").exists():
        pytest.skip(f"SmolLM2 not found at {SMOL}: run `razor-vllm fetch-model smollm2-135m-instruct`")
    return bench.model_facts(SMOL, "smollm2-135m-instruct", window=256, sinks=4, dtype_bytes=4,
                             max_model_len=8192)


def test_model_facts(facts):
    assert (facts["layers"], facts["kv_heads"], facts["q_heads"], facts["head_dim"]) == (30, 3, 9, 64)
    assert facts["retrieval_heads"] == 14 and facts["local_heads"] == 76
    assert abs(facts["params"] - 134.5e6) < 0.1e6  # SmolLM2-135M, tied embeddings


@pytest.mark.parametrize("ctx,batch", [(1088, 1), (4160, 8), (8064, 8), (100, 1)])
def test_decode_limits_match_the_hand_formulas(bench, facts, ctx, batch):
    lim = bench.decode_limits(facts, ctx, batch)
    stock_kv = 30 * 3 * 2 * 64 * 4 * ctx  # layers x kv heads x (K, V) x head_dim x 4 B x T
    kept = min(ctx, 4 + 256 + 1)  # sinks + window + compensation token
    razor_kv = 2 * 64 * 4 * (14 * ctx + 76 * kept)
    assert lim["kv_bytes_per_seq"] == {"stock": stock_kv, "razor": razor_kv}
    weights = facts["step_weight_params"] * 4
    assert lim["bytes_per_step"]["stock"] == weights + batch * stock_kv
    assert lim["bound_speedup_bytes"] == pytest.approx((weights + batch * stock_kv) / (weights + batch * razor_kv))
    # attention FLOPs per token: 4 x head_dim per (query head, key) -> 9 query heads = 3 KV x group 3
    assert lim["flops_per_token"]["stock"] - 2 * facts["step_weight_params"] == 4 * 64 * 3 * 90 * ctx
    if ctx < 261:  # nothing evicted yet: razor reads what stock reads
        assert lim["kv_bytes_per_seq"]["razor"] == stock_kv
