"""backend._paged_step: how a step's batch is split between the batched decode path
(`ring_ops.ring_decode`) and the per-(request, head) chunk path of kv_layout="paged", and its
per-step cache on the forward context. (End to end, the split is exercised by the greedy-equality
tests of tests/test_backend_paged.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from razor_vllm import backend  # noqa: E402
from razor_vllm.kv_layout import RingLayout  # noqa: E402

RING = RingLayout(4, 8, 16, torch.float32)


def _md(qsl, seq_lens, first_blocks):
    bt = torch.zeros(len(seq_lens), 3, dtype=torch.int32)
    bt[:, 0] = torch.tensor(first_blocks, dtype=torch.int32)
    return SimpleNamespace(query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=bt)


def test_non_consecutive_decodes_and_chunks():
    # req 0 decodes (start 9); req 1 is a one-token prompt (start 0: a prefill); req 2 a 3-token
    # chunk; req 3 decodes (start 299); req 4 has no tokens this step
    md = _md([0, 1, 2, 5, 6, 6], [10, 1, 7, 300, 20], [5, 6, 7, 8, 9])
    step = backend._paged_step(SimpleNamespace(), md, RING, "single")
    assert torch.equal(step.reqs, torch.tensor([0, 3])) and torch.equal(step.rows, torch.tensor([0, 5]))
    assert step.chunks == [(1, 1, 2, 0), (2, 2, 5, 4)]
    assert torch.equal(step.plan.starts, torch.tensor([9, 299]))


def test_consecutive_decodes_are_slices():
    md = _md([0, 3, 4, 5], [3, 50, 60], [1, 2, 3])
    step = backend._paged_step(SimpleNamespace(), md, RING, "count")
    assert step.reqs == slice(1, 3) and step.rows == slice(3, 5)
    assert step.chunks == [(0, 0, 3, 0)]
    assert torch.equal(step.plan.starts, torch.tensor([49, 59]))


def test_dummy_batch_with_null_blocks_takes_the_chunk_path():
    md = _md([0, 1, 2], [40, 41], [0, 0])
    step = backend._paged_step(SimpleNamespace(), md, RING, "single")
    assert step.plan is None and step.reqs is None
    assert step.chunks == [(0, 0, 1, 39), (1, 1, 2, 40)]


def test_cached_per_forward_context_and_batch():
    fc = SimpleNamespace()
    md = _md([0, 1, 2], [40, 41], [3, 4])
    first = backend._paged_step(fc, md, RING, "single")
    assert backend._paged_step(fc, md, RING, "single") is first  # every other layer of the step
    other = _md([0, 1], [7], [3])  # another batch (new query_start_loc tensor): recomputed
    assert backend._paged_step(fc, other, RING, "single") is not first
