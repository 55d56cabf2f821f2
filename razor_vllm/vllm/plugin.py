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
4. The platform's `check_and_update_config` (called at the end of `VllmConfig.__post_init__`, in
   the process that builds the config: `vllm serve`'s API server, the `LLM(...)` process) is
   wrapped to run razor's engine-start checks there too when razor is selected. A refused flag or
   an unusable head config then fails in seconds, with one traceback naming the problem and the
   fix, instead of after the engine core and worker have been spawned with
   the error buried in three processes' logs. The worker runs the same checks again
   (`RazorAttentionImpl.__init__`), which stay authoritative; the model-level ones (sliding window,
   ALiBi, ...) need the attention layers and are only done there.
5. `EngineArgs` fills in vLLM's defaults for flags the user did not give. When razor is requested
   and the user said nothing about prefix caching, razor turns vLLM's default (on) off and logs
   why, so that `vllm serve MODEL --attention-backend razor` starts as typed; an explicit
   `--enable-prefix-caching` is still refused by 4.
6. The same hooks give razor its prefill protocol (`RazorConfig.whole_prompt_prefill`, default on):
   where the user passed neither a chunked-prefill flag nor `--max-num-batched-tokens`, chunked
   prefill is turned off and the token budget raised to max_model_len + max_num_seqs, so that every
   prompt is prefilled in one step and compressed after it, as RazorAttention is defined and
   measured; the log says so. Explicit flags are kept; when they let a prompt be split, the log says
   what that costs.
"""

from __future__ import annotations

from vllm.logger import init_logger

BACKEND_PATH = "razor_vllm.vllm.backend.RazorAttentionBackend"
ALIAS = "RAZOR"

# Under the "vllm" logger hierarchy so the lines get vLLM's handler, format and
# VLLM_LOGGING_LEVEL (a logger outside it has no handler and drops INFO).
logger = init_logger(f"vllm.{__name__}")
# The local window that recovered the question-compressed loss at 8k for SmolLM2 (n = 100: -4 points
# against -29 with 256; docs/accuracy.md "Budget search at 8k") but not for Qwen2.5-Coder-0.5B at 16k
# (docs/accuracy.md, "Second model"): named to servers that keep chunking, as a model-dependent datum.
CHUNKED_PREFILL_WINDOW = 1024


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
    _patch_platform_config_check()
    _patch_engine_defaults()


def _razor_requested(engine_args) -> bool:
    """Whether EngineArgs ask for razor (`--attention-backend razor`, or CUSTOM pointing at razor)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for value in (getattr(engine_args, "attention_backend", None),
                  getattr(getattr(engine_args, "attention_config", None), "backend", None)):
        if value is None:
            continue
        name = value.name if isinstance(value, AttentionBackendEnum) else str(value).upper()
        if name == ALIAS or (name == AttentionBackendEnum.CUSTOM.name and _custom_is_razor()):
            return True
    return False


def _custom_is_razor() -> bool:
    """Whether vLLM's single CUSTOM backend slot points at razor (another plugin may claim it)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    return custom.is_overridden() and custom.get_path() == BACKEND_PATH


def _razor_settings(engine_args):
    """The `razor` section of EngineArgs' additional_config as a RazorConfig; None when it is absent or
    invalid (the engine-start check refuses it then, with its own message)."""
    from razor_vllm.config import parse_razor_config

    try:
        return parse_razor_config(getattr(engine_args, "additional_config", None))
    except ValueError:
        return None


def _patch_engine_defaults() -> None:
    """See 5. and 6. above. Never double-wraps; a vLLM without the hooks keeps the refusal of 4 and
    vLLM's own chunking (checked by tests/cuda/test_conformance.py against the production wheel)."""
    try:
        from vllm.engine.arg_utils import EngineArgs

        chunked_original = EngineArgs._set_default_chunked_prefill_and_prefix_caching_args
        batch_original = EngineArgs._set_default_max_num_seqs_and_batched_tokens_args
    except (ImportError, AttributeError):
        logger.warning("razor-vllm: this vLLM has no EngineArgs default hooks: prefix caching and chunked "
                       "prefill keep vLLM's defaults")
        return
    if getattr(chunked_original, "_razor_wrapped", False):
        return

    def set_chunked_and_prefix_defaults(self, model_config, *args, **kwargs):
        # razor's prefill protocol, decided here from the flags as the user gave them (the next hook
        # sees them resolved): None (razor not requested, or its opt-out), "whole" (razor sets it),
        # "flags" (the user's chunking flags stand; warn if they split prompts)
        self._razor_prefill = None
        if _razor_requested(self):
            if self.enable_prefix_caching is None:
                # None = the user passed neither --enable-prefix-caching nor --no-enable-prefix-caching.
                self.enable_prefix_caching = False
                logger.info("razor-vllm: prefix caching turned off (vLLM's default is on): a cached prefix "
                            "would skip the prefill that builds razor's compressed KV state and change the "
                            "output. Passing --enable-prefix-caching explicitly is refused.")
            cfg = _razor_settings(self)
            if cfg is not None and cfg.whole_prompt_prefill:
                if self.enable_chunked_prefill is None and self.max_num_batched_tokens is None:
                    # Chunked prefill off (not only a large budget): with it on, a prompt that arrives
                    # while others run gets what is left of the budget and is split after all.
                    self.enable_chunked_prefill = False
                    self._razor_prefill = "whole"
                else:
                    self._razor_prefill = "flags"
        return chunked_original(self, model_config, *args, **kwargs)

    def set_batch_defaults(self, usage_context, model_config, *args, **kwargs):
        result = batch_original(self, usage_context, model_config, *args, **kwargs)
        max_len = model_config.max_model_len
        prefill = getattr(self, "_razor_prefill", None)
        if prefill == "whole":
            # + max_num_seqs: a max_model_len prompt still fits beside a full batch of decodes, so
            # it is never held back waiting for the running requests to finish.
            budget = max(self.max_num_batched_tokens, max_len + self.max_num_seqs)
            self.max_num_batched_tokens = budget
            logger.info("razor-vllm: whole-prompt prefill (RazorAttention's protocol): chunked prefill off, "
                        "max_num_batched_tokens %d (max_model_len %d + max_num_seqs %d), so every prompt is "
                        "prefilled in one step and compressed after it. Long prompts cost a long step and "
                        "its activation memory; to keep vLLM's chunking pass --max-num-batched-tokens or "
                        "--enable-chunked-prefill, or razor's \"whole_prompt_prefill\": false "
                        "(docs/accuracy.md, \"The serving default\").", budget, max_len, self.max_num_seqs)
        elif prefill == "flags" and self.enable_chunked_prefill:
            split = (f"prompts longer than {self.max_num_batched_tokens} tokens are prefilled in chunks"
                     if self.max_num_batched_tokens < max_len else
                     "a prompt that arrives while others run can be split")
            # What recovers the loss depends on the model: the measured data, and how to measure yours.
            remedy = (f"; to keep chunking, a wider window or more retrieval heads recover part of the loss, by "
                      f"an amount that depends on the model (\"window\": {CHUNKED_PREFILL_WINDOW} recovered most "
                      "of it for SmolLM2-135M at 8k, not for Qwen2.5-Coder-0.5B at 16k): measure yours with "
                      "`razor-vllm eval --protocols question-compressed`")
            logger.warning("razor-vllm: chunked prefill with max_num_batched_tokens %d: %s, and the chunks "
                           "after the first (a long prompt's question) read razor's compressed context, "
                           "which costs accuracy (docs/accuracy.md, \"The serving default\"). For "
                           "RazorAttention's own protocol leave both flags out (razor then prefills every "
                           "prompt in one step)%s.", self.max_num_batched_tokens, split, remedy)
        return result

    for fn, orig in ((set_chunked_and_prefix_defaults, chunked_original), (set_batch_defaults, batch_original)):
        fn._razor_wrapped = True  # type: ignore[attr-defined]
        fn.__wrapped__ = orig  # type: ignore[attr-defined]
    EngineArgs._set_default_chunked_prefill_and_prefix_caching_args = set_chunked_and_prefix_defaults
    EngineArgs._set_default_max_num_seqs_and_batched_tokens_args = set_batch_defaults


def _patch_platform_config_check() -> None:
    """Wrap the current platform's `check_and_update_config` (see 4. above). Never double-wraps."""
    try:
        from vllm.platforms import current_platform

        cls = type(current_platform)
        original = cls.check_and_update_config.__func__
    except Exception:  # no resolvable platform in this process: the worker checks still run
        return
    if getattr(original, "_razor_wrapped", False):
        return

    def check_and_update_config(klass, vllm_config) -> None:
        original(klass, vllm_config)
        if _razor_selected(vllm_config):
            from razor_vllm.vllm.engine_state import check_engine_config, paged_layout, razor_policy
            from razor_vllm.config import parse_razor_config

            try:
                check_engine_config(vllm_config)
                policy = razor_policy(vllm_config)  # reads the head config, checks it fits the model
                if parse_razor_config(vllm_config.additional_config).kv_layout == "paged":
                    paged_layout(vllm_config, policy)
            except ValueError as e:
                # VllmConfig is a pydantic dataclass: it re-raises a ValueError as "1 validation
                # error for VllmConfig / Value error, <message>", dropping the class. Keep its name
                # (RazorConfigError, HeadConfigMismatch, ...) in the message.
                raise ValueError(f"{type(e).__name__}: {e}") from e

    check_and_update_config._razor_wrapped = True  # type: ignore[attr-defined]
    check_and_update_config.__wrapped__ = original  # type: ignore[attr-defined]
    check_and_update_config.__doc__ = original.__doc__
    cls.check_and_update_config = classmethod(check_and_update_config)


def _razor_selected(vllm_config) -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return backend == AttentionBackendEnum.CUSTOM and _custom_is_razor()


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
