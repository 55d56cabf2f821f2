"""`RingDecoder`: the one place that chooses a `ring_decode` implementation (flashinfer's wrapper
pattern: choose at construction, plan once per step, run once per layer).

    decoder = RingDecoder(ring, "single", impl="auto", device="cpu", query_dtype=torch.float32)
    plan = decoder.plan(starts)                     # per step: shared by every layer
    decoder.run(plan, pages, offsets, blocks, q, k, v, scale=s, out=o)   # per layer
"""

from __future__ import annotations

import importlib

import torch

from . import RING_DECODE_IMPLS
from .ring_layout import RingLayout
from .ring_torch import RingDecodePlan, ring_decode_plan


class RingDecoder:
    """Decode steps of the local heads on their ring regions, with one implementation chosen here.

    impl: "torch" (`ring_torch`, the oracle), "cpp" (the fused CPU op, `ring_cpp`), "triton"
    (`ring_triton`), or "auto": on CPU the fused op when it loads and the cache holds the query's
    dtype (its contract), else PyTorch; off CPU Triton.
    """

    def __init__(self, ring: RingLayout, compensation: str, *, impl: str = "auto",
                 device: torch.device | str = "cpu", query_dtype: torch.dtype | None = None) -> None:
        device = torch.device(device)
        requested = impl
        if impl == "auto":
            if device.type != "cpu":
                impl = "triton"
            else:
                from . import ring_cpp

                same_dtype = query_dtype is None or query_dtype == ring.dtype
                impl = "cpp" if same_dtype and ring_cpp.load() else "torch"
        if impl not in RING_DECODE_IMPLS:
            raise ValueError(f"unknown ring_decode implementation {impl!r}; choose one of {RING_DECODE_IMPLS}")
        if requested == "cpp":  # "auto" chose cpp only after it loaded
            from . import ring_cpp

            if not ring_cpp.load():
                raise RuntimeError("the fused CPU ring_decode op is not available (see the log's warning)")
        self.ring, self.compensation, self.impl = ring, compensation, impl
        self._ring_decode = importlib.import_module(f".ring_{impl}", __package__).ring_decode

    def plan(self, starts: torch.Tensor) -> RingDecodePlan:
        """The step's plan: `starts` int `[B]`, tokens cached before this step (all >= 1)."""
        return ring_decode_plan(self.ring, starts, self.compensation)

    def run(self, plan: RingDecodePlan, pages, offsets, blocks, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, *, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """One layer's decode step; arguments as `ring_torch.ring_decode`."""
        return self._ring_decode(pages, offsets, blocks, plan, query, key, value, scale=scale, out=out)

    def describe(self) -> str:
        return {"torch": "the PyTorch ring ops (kernels/ring_torch.py)",
                "cpp": "the fused C++ op (kernels/csrc/ring_decode.cpp)",
                "triton": "the Triton kernel (kernels/ring_triton.py)"}[self.impl]
