"""`forward_paged.build_paged_step`, what `RazorMetadataBuilder.build` runs once per step for
kv_layout="paged": how a step's batch is split between the batched decode path
(`RingDecoder.run`) and the per-(request, head) chunk path, from host-side tensors. (End to end, the
split is exercised by the greedy-equality tests of tests/vllm_backend/test_backend_paged.py.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from razor_vllm.kernels.ring_layout import RingLayout  # noqa: E402
from razor_vllm.vllm.forward_paged import build_paged_step  # noqa: E402

RING = RingLayout(4, 8, 16, torch.float32)


def _step(qsl, seq_lens, first_blocks, compensation="single"):
    bt = torch.zeros(len(seq_lens), 3, dtype=torch.int32)
    bt[:, 0] = torch.tensor(first_blocks, dtype=torch.int32)
    return build_paged_step(torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), bt,
                            len(seq_lens), RING, compensation)


def test_non_consecutive_decodes_and_chunks():
    # req 0 decodes (start 9); req 1 is a one-token prompt (start 0: a prefill); req 2 a 3-token
    # chunk; req 3 decodes (start 299); req 4 has no tokens this step
    step = _step([0, 1, 2, 5, 6, 6], [10, 1, 7, 300, 20], [5, 6, 7, 8, 9])
    assert torch.equal(step.reqs, torch.tensor([0, 3])) and torch.equal(step.rows, torch.tensor([0, 5]))
    assert step.chunks == [(1, 1, 2, 0), (2, 2, 5, 4)]
    assert torch.equal(step.plan.starts, torch.tensor([9, 299]))


def test_consecutive_decodes_are_slices():
    step = _step([0, 3, 4, 5], [3, 50, 60], [1, 2, 3], "count")
    assert step.reqs == slice(1, 3) and step.rows == slice(3, 5)
    assert step.chunks == [(0, 0, 3, 0)]
    assert torch.equal(step.plan.starts, torch.tensor([49, 59]))
    assert step.plan.compensation == "count"


def test_dummy_batch_with_null_blocks_takes_the_chunk_path():
    step = _step([0, 1, 2], [40, 41], [0, 0])
    assert step.plan is None and step.reqs is None
    assert step.chunks == [(0, 0, 1, 39), (1, 1, 2, 40)]


def test_ring_blocks_once_per_block_table():
    step = _step([0, 1, 2], [40, 41], [3, 4])
    bt = torch.tensor([[3, 0], [4, 0]], dtype=torch.int32)
    first = step.ring_blocks(bt)
    assert first.tolist() == [3, 4] and step.ring_blocks(bt) is first  # every other layer of the group
    other = bt.clone()
    other[:, 0] = torch.tensor([7, 8])
    assert step.ring_blocks(other).tolist() == [7, 8]  # another group's table
