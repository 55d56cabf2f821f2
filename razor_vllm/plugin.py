"""vLLM general plugin: makes `--attention-backend razor` select RazorAttention.

vLLM calls `register()` (entry point `vllm.general_plugins: razor`) in every process it starts:
the front end, the engine core and each worker, sometimes several times per process. Everything
here is therefore idempotent, and nothing changes unless razor is explicitly requested:

1. `register_backend(AttentionBackendEnum.CUSTOM, ...)` points vLLM's static placeholder member at
   our backend class. CUSTOM (not a dynamic `register_backend("RAZOR", ...)` member) because a
   VllmConfig holding a dynamic member cannot be unpickled in a *spawned* engine/worker process,
   which unpickles its config before it loads plugins.
2. An enum alias `RAZOR -> CUSTOM`, so that `--attention-backend razor` (parsed by
   `AttentionBackendEnum[value.upper()]`) yields CUSTOM, which pickles as a static member.
3. On CPU, `CpuPlatform.get_attn_backend_cls` ignores the requested backend and always returns
   CPU_ATTN; we wrap it so that CUSTOM is honoured (after the same `validate_configuration` check
   the CUDA platform performs) and every other request falls through to the original unchanged.
   The CUDA platform already honours an explicitly selected backend, so it needs no patch.
"""

from __future__ import annotations

from vllm.logger import init_logger

BACKEND_PATH = "razor_vllm.backend.RazorAttentionBackend"
ALIAS = "RAZOR"

# Under the "vllm" logger hierarchy so the lines get vLLM's handler, format and
# VLLM_LOGGING_LEVEL (a logger outside it has no handler and drops INFO).
logger = init_logger(f"vllm.{__name__}")


def register() -> None:
    """Entry point of `vllm.general_plugins`. Safe to call any number of times."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        # Another plugin also claims the single CUSTOM slot. Last one wins in vLLM; say so
        # instead of silently serving someone else's attention under --attention-backend razor.
        logger.warning("razor-vllm: AttentionBackendEnum.CUSTOM was registered to %s; "
                       "re-registering it to %s", custom.get_path(), BACKEND_PATH)
    register_backend(custom, BACKEND_PATH)
    # An alias in the member map only: AttentionBackendEnum["RAZOR"] is CUSTOM, iteration over the
    # enum and pickling are unchanged.
    AttentionBackendEnum._member_map_.setdefault(ALIAS, custom)
    _patch_cpu_selector()


def _patch_cpu_selector() -> None:
    """Make the CPU platform honour an explicit CUSTOM (= razor) backend. Never double-wraps."""
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:  # a vLLM build without the CPU platform: nothing to patch
        return
    current = CpuPlatform.__dict__.get("get_attn_backend_cls")
    original = current.__func__ if isinstance(current, classmethod) else current
    if original is None or getattr(original, "_razor_wrapped", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if selected_backend is not None and selected_backend == AttentionBackendEnum.CUSTOM:
            return _select_custom_on_cpu(selected_backend, attn_selector_config)
        return original(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._razor_wrapped = True  # type: ignore[attr-defined]
    get_attn_backend_cls.__wrapped__ = original  # type: ignore[attr-defined]
    get_attn_backend_cls.__doc__ = original.__doc__
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _select_custom_on_cpu(selected_backend, attn_selector_config) -> str:
    """What CudaPlatform.get_attn_backend_cls does for an explicitly selected backend: check the
    backend's `supports_*` flags against this layer, fail with the reasons, else return its path."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    path = selected_backend.get_path()
    backend_cls = resolve_obj_by_qualname(path)
    reasons = backend_cls.validate_configuration(device_capability=None,
                                                 **attn_selector_config._asdict())
    if reasons:
        raise ValueError(f"Selected attention backend {selected_backend.name} ({path}) cannot run "
                         f"this model's attention layers: {'; '.join(reasons)}")
    logger.info("Using %s attention backend on CPU -> %s", selected_backend.name, path)
    return path
