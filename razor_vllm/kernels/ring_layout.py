"""`RingLayout`: the slot map of one local head's ring region, the contract every ring kernel reads
(`ring_torch`, `ring_triton`, `ring_cpp` and csrc/ring_decode.cpp). The planner
(`razor_vllm.vllm.layout`) sizes pages from it; docs/design.md explains the layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class RingLayout:
    """Slots of one local head's region inside a ring page. A slot is one cache row: 2*D elements of
    the KV dtype (K in the first D, V in the last D, as for a token of the paged caches).

    ======================  ==========================================================
    ``[0, S)``              sink K|V for positions 0..S-1
    ``[S, S+W)``            window ring: position p >= S at ``window_slot(p)``
    ``ksum_offset``         fp32 sum of folded K (``sum_slots`` slots, bit-packed)
    ``vsum_offset``         fp32 sum of folded V
    ``meta_offset``         int32 [F, 0, ...]: frontier (compensation covers [S, F))
    ======================  ==========================================================
    """

    sinks: int
    window: int
    head_size: int
    dtype: torch.dtype

    @property
    def slot_bytes(self) -> int:
        return 2 * self.head_size * dtype_size(self.dtype)

    @property
    def sum_slots(self) -> int:
        """Slots per fp32 sum of D values (1 for 16/32-bit caches, 2 for fp8)."""
        return _cdiv(4 * self.head_size, self.slot_bytes)

    @property
    def window_offset(self) -> int:
        return self.sinks

    @property
    def ksum_offset(self) -> int:
        return self.sinks + self.window

    @property
    def vsum_offset(self) -> int:
        return self.ksum_offset + self.sum_slots

    @property
    def meta_offset(self) -> int:
        return self.vsum_offset + self.sum_slots

    @property
    def slots(self) -> int:
        return self.meta_offset + 1

    def window_slot(self, pos: int) -> int:
        """Slot (relative to the head's region) of position `pos` >= S in the window ring."""
        if pos < self.sinks:
            raise ValueError(f"position {pos} is a sink (< {self.sinks})")
        return self.sinks + (pos - self.sinks) % self.window

    def region(self, page: torch.Tensor, offset: int) -> torch.Tensor:
        """`[slots, 2*D]` view of the region at slot `offset` of one page `[P, 2*D]` (no copy)."""
        return page[offset:offset + self.slots]

    def sums(self, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 `[D]` views (Ksum, Vsum) of a region (requires a contiguous last dim)."""
        d = self.head_size
        k = region[self.ksum_offset:self.ksum_offset + self.sum_slots].reshape(-1).view(torch.float32)[:d]
        v = region[self.vsum_offset:self.vsum_offset + self.sum_slots].reshape(-1).view(torch.float32)[:d]
        return k, v

    def meta(self, region: torch.Tensor) -> torch.Tensor:
        """int32 view of the meta slot; element 0 is the frontier F."""
        return region[self.meta_offset].view(torch.int32)
