"""`sibling_triton.write_siblings`: a layer's retrieval heads written into their 1-head sibling caches
in one launch, against `uniform_torch.reshape_and_cache` per head (the oracle), under the Triton
interpreter. Three heads: two siblings in one KV-cache group (one slot mapping), one in another group
(its own slot mapping); padding tokens (slot -1) write nothing; every other byte stays."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU tensors: compiled Triton needs TRITON_INTERPRET=1 here", allow_module_level=True)

from razor_vllm.kernels import sibling_triton, uniform_torch  # noqa: E402

D, P, BLOCKS, KV_HEADS = 16, 8, 6, 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_siblings_equals_reshape_and_cache_per_head(dtype):
    gen = torch.Generator().manual_seed(0)
    # one allocation holding three sibling caches side by side, as vLLM binds views of one storage
    storage = (torch.randn(BLOCKS, 3, P, 2 * D, generator=gen) * 5).to(dtype)
    caches = [storage[:, i:i + 1] for i in range(3)]  # [BLOCKS, 1, P, 2D], block stride 3*P*2D
    n = 7
    slots_a = torch.tensor([9, 10, -1, 17, 40, -1, 3], dtype=torch.int64)
    slots_b = torch.tensor([30, 31, -1, 8, 44, -1, 20], dtype=torch.int64)
    fused = torch.randn(n, 3 * KV_HEADS, D, generator=gen).to(dtype)
    key, value = fused[:, :KV_HEADS], fused[:, 2 * KV_HEADS:]  # strided views
    heads = [sibling_triton.SiblingHead(0, caches[0], slots_a), sibling_triton.SiblingHead(2, caches[1], slots_a),
             sibling_triton.SiblingHead(3, caches[2], slots_b)]
    orig, want = storage.clone(), storage.clone()
    for i, h in enumerate(heads):
        c = want[:, i:i + 1]
        uniform_torch.reshape_and_cache(key[:, h.kv_head:h.kv_head + 1], value[:, h.kv_head:h.kv_head + 1],
                                        c[..., :D], c[..., D:], h.slot_mapping)
    table = sibling_triton.sibling_table(heads, "cpu")
    sibling_triton.write_siblings(table, key, value, n)
    assert not torch.equal(want, orig)  # the oracle wrote something (10 of 21 (token, head) rows)
    assert torch.equal(storage.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_sibling_table_rejects_bad_caches():
    cache = torch.zeros(4, 1, P, 2 * D)
    sm = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="contiguous rows"):
        sibling_triton.sibling_table([sibling_triton.SiblingHead(0, cache.transpose(2, 3), sm)], "cpu")
    with pytest.raises(ValueError, match="contiguous int64"):
        sibling_triton.sibling_table([sibling_triton.SiblingHead(0, cache, sm.int())], "cpu")
    with pytest.raises(ValueError, match="differs from head 0"):
        sibling_triton.sibling_table([sibling_triton.SiblingHead(0, cache, sm),
                                      sibling_triton.SiblingHead(1, cache.half(), sm)], "cpu")
