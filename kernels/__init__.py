"""RazorAttention paged-attention operators (installed as ``razor_vllm.kernels``).

Two backends with identical signatures:

* :mod:`razor_vllm.kernels.torch_ops`: PyTorch, the CPU serving path and the test oracle;
* :mod:`razor_vllm.kernels.triton_ops`: Triton kernels for CUDA, imported lazily so that this
  package imports (and never imports Triton) on machines without Triton.

Operators (see ``torch_ops`` for the layouts and the exact semantics):

* ``reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)``
* ``compensation_sums(key_cache, value_cache, block_table, seq_lens, query_start_loc,
  head_is_local, sinks, window) -> (k_sum, v_sum, count)``
* ``razor_paged_attention(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
  *, scale, head_is_local, sinks, window, k_sum, v_sum, count, compensation, out) -> out``

The ring-page operators of the paged KV layout (RazorConfig.kv_layout="paged", CPU) are in
:mod:`razor_vllm.kernels.ring_ops` (PyTorch); its per-layer decode step also exists as one fused C++
op, :mod:`razor_vllm.kernels.cpu_ops` (``csrc/ring_decode.cpp``, built with g++ on first use and
cached), which serving uses when it builds and which is tested against ``ring_ops``.

Each is exported three ways: ``torch_<op>`` (PyTorch), ``triton_<op>`` (Triton, lazy) and ``<op>``,
which picks Triton for tensors on an accelerator and PyTorch for CPU tensors.
"""

from __future__ import annotations

import importlib
import importlib.util

from . import torch_ops
from .torch_ops import COMPENSATION_MODES
from .torch_ops import compensation_sums as torch_compensation_sums
from .torch_ops import razor_paged_attention as torch_razor_paged_attention
from .torch_ops import reshape_and_cache as torch_reshape_and_cache

_OPS = ("reshape_and_cache", "compensation_sums", "razor_paged_attention")

# find_spec looks the package up without importing it.
HAS_TRITON = importlib.util.find_spec("triton") is not None

# The lazy Triton names stay out of __all__: a star import must not import Triton.
__all__ = [
    "COMPENSATION_MODES",
    "HAS_TRITON",
    "compensation_sums",
    "razor_paged_attention",
    "reshape_and_cache",
    "torch_compensation_sums",
    "torch_ops",
    "torch_razor_paged_attention",
    "torch_reshape_and_cache",
]


def __getattr__(name: str):
    """Import ``triton_ops`` on first access to it or to a ``triton_<op>`` name."""
    if name == "triton_ops" or (name.startswith("triton_") and name[len("triton_"):] in _OPS):
        module = importlib.import_module(".triton_ops", __name__)
        return module if name == "triton_ops" else getattr(module, name[len("triton_"):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _backend(tensor):
    """The ops module for ``tensor``'s device: Triton off-CPU when available, else PyTorch."""
    if tensor.device.type != "cpu" and HAS_TRITON:
        return importlib.import_module(".triton_ops", __name__)
    return torch_ops


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    """Dispatching :func:`torch_ops.reshape_and_cache` / ``triton_ops.reshape_and_cache``."""
    return _backend(key_cache).reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def compensation_sums(key_cache, value_cache, block_table, seq_lens, query_start_loc,
                      head_is_local, sinks, window):
    """Dispatching :func:`torch_ops.compensation_sums` / ``triton_ops.compensation_sums``."""
    return _backend(key_cache).compensation_sums(
        key_cache, value_cache, block_table, seq_lens, query_start_loc, head_is_local, sinks,
        window,
    )


def razor_paged_attention(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                          **kwargs):
    """Dispatching :func:`torch_ops.razor_paged_attention` / ``triton_ops.razor_paged_attention``.

    Keyword arguments (``scale``, ``head_is_local``, ``sinks``, ``window``, ``k_sum``, ``v_sum``,
    ``count``, ``compensation``, ``out``) are passed through unchanged.
    """
    return _backend(query).razor_paged_attention(
        query, key_cache, value_cache, block_table, seq_lens, query_start_loc, **kwargs
    )
