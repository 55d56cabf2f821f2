"""RazorAttention's operators: two families, each with twin implementations tested against each other.

* **Uniform layout** (every head in vLLM's stock paged cache; compression applied when reading):
  ``reshape_and_cache``, ``compensation_sums``, ``razor_paged_attention``. Implementations:
  `uniform_torch` (CPU, and the docstrings that define the contract) and `uniform_triton` (CUDA).
* **Ring family** (kv_layout="paged": local heads in per-request ring regions, `ring_layout.RingLayout`):
  ``ring_reset/attend/fold/write/step`` in `ring_torch` (the oracle), and the per-layer decode step
  ``ring_decode`` in three implementations: `ring_torch`, `ring_cpp` (fused C++ op for CPU serving,
  csrc/ring_decode.cpp) and `ring_triton` (CUDA). `decoder.RingDecoder` picks one, once.

This package imports nothing from razor_vllm's integration layers (`razor_vllm.vllm`, ...); it reads
the core only (`razor_vllm.config.COMPENSATION_MODES`, `razor_vllm.paths`). Importing it never
imports Triton: the Triton modules are imported only when chosen.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

UNIFORM_IMPLS = ("torch", "triton")
"""Implementations of the uniform-layout operators (module `uniform_<impl>`)."""
RING_DECODE_IMPLS = ("torch", "cpp", "triton")
"""Implementations of `ring_decode` (module `ring_<impl>`)."""


def has_triton() -> bool:
    """Whether Triton is installed (looked up without importing it)."""
    return importlib.util.find_spec("triton") is not None


def uniform_impl_for(device: torch.device | str) -> str:
    """The uniform-layout implementation for tensors on `device`: Triton off CPU, PyTorch on CPU."""
    return "torch" if torch.device(device).type == "cpu" else "triton"


def uniform_ops(impl: str) -> ModuleType:
    """The module implementing the uniform-layout operators as `impl` (one of UNIFORM_IMPLS)."""
    if impl not in UNIFORM_IMPLS:
        raise ValueError(f"unknown uniform-layout implementation {impl!r}; choose one of {UNIFORM_IMPLS}")
    return importlib.import_module(f".uniform_{impl}", __name__)
