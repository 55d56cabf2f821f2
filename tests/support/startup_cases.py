"""The refusals `vllm serve ... --attention-backend razor` must give at engine start, shared by the
subprocess test (tests/serve/test_serve_startup.py: the literal command exits with the message) and
the in-process test (tests/vllm_backend/test_engine_checks.py: the same command line through vLLM's own
parser and `EngineArgs.create_engine_config`, where the config-time checks run)."""

from __future__ import annotations

import json

from razor_vllm.paths import default_model_dir

GEMMA_DIR = default_model_dir().parent / "gemma3-270m"
SHIPPED = "smollm2-135m-instruct"


def _other_model_config(tmp_path, model_dir=default_model_dir(), num_layers: int | None = None, name="other.json"):
    """A valid head config whose model identity is `model_dir`'s with `num_layers` changed (or
    exactly `model_dir`'s when None)."""
    from transformers import AutoConfig

    from razor_vllm.heads import HeadConfig, ProfileSettings, model_identity

    cfg = AutoConfig.from_pretrained(model_dir)
    text = getattr(cfg, "text_config", None) or cfg
    if num_layers is not None:
        text.num_hidden_layers = num_layers
    ident = model_identity(cfg)
    zeros = [[0.0] * ident.num_kv_heads for _ in range(ident.num_layers)]
    path = tmp_path / name
    HeadConfig(model=ident, profile=ProfileSettings(bos_token_id=1), echo_scores=zeros, induction_scores=zeros,
               retrieval_heads=[[]] * ident.num_layers).save(path)
    return str(path)


def _corrupt(tmp_path):
    path = tmp_path / "corrupt.json"
    path.write_text('{"schema_version": 1, "model": {"architecture": "LlamaForCausalLM", ')
    return str(path)


# id -> (razor settings (callable of tmp_path) or None, extra vllm args, model dir, expected substrings)
CASES = {
    "corrupt-head-config": (lambda t: {"head_config": _corrupt(t)}, [], default_model_dir(),
                            ["HeadConfigError", "corrupt.json is not valid JSON", "razor-vllm profile"]),
    "missing-head-config": (lambda t: {"head_config": str(t / "nowhere" / "heads.json")}, [], default_model_dir(),
                            ["HeadConfigError", "heads.json' not found", "razor-vllm profile"]),
    "head-config-of-another-model": (lambda t: {"head_config": _other_model_config(t, num_layers=12)}, [],
                                     default_model_dir(), ["HeadConfigMismatch", "was profiled for LlamaForCausalLM (12 layers",
                                                   "the model is LlamaForCausalLM (30 layers", "razor-vllm profile"]),
    "smollm2-config-on-gemma": (lambda t: {"head_config": SHIPPED}, [], GEMMA_DIR,
                                ["HeadConfigMismatch", "(30 layers", "the model is Gemma3ForCausalLM (18 layers",
                                 "razor-vllm profile"]),
    "no-razor-section": (None, ["--attention-backend", "razor"], default_model_dir(),
                         ["--attention-backend razor needs its settings", "--additional-config",
                          '{"razor": {"head_config"']),
    "invalid-razor-setting": (lambda t: {"head_config": SHIPPED, "window": 0, "kv_layuot": "paged"}, [],
                              default_model_dir(), ["invalid --additional-config razor settings", "window",
                                            "greater than or equal to 1", "kv_layuot"]),
    "prefix-caching": (lambda t: {"head_config": SHIPPED}, ["--enable-prefix-caching"], default_model_dir(),
                       ["prefix caching is enabled", "--no-enable-prefix-caching"]),
    "kv-cache-dtype-fp8": (lambda t: {"head_config": SHIPPED}, ["--kv-cache-dtype", "fp8"], default_model_dir(),
                           ["--kv-cache-dtype fp8", "use --kv-cache-dtype auto"]),
    "paged-without-hybrid-manager": (lambda t: {"head_config": SHIPPED, "kv_layout": "paged"},
                                     ["--disable-hybrid-kv-cache-manager"], default_model_dir(),
                                     ["needs the hybrid KV cache manager", "drop --disable-hybrid-kv-cache-manager",
                                      '"kv_layout": "uniform"']),
    "speculative-decoding": (lambda t: {"head_config": SHIPPED},
                             ["--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": 2,
                                                                   "prompt_lookup_max": 3})],
                             default_model_dir(), ["speculative decoding is not supported", "remove --speculative-config"]),
    "kv-connector": (lambda t: {"head_config": SHIPPED},
                     ["--kv-transfer-config", json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both"})],
                     default_model_dir(), ["KV connectors / KV transfer are not supported", "remove --kv-transfer-config"]),
    # (tensor parallel 2 and context parallel are refused by vLLM itself for this model before razor
    # looks: 9 attention heads are not divisible by 2, dcp must divide tp.)
    "paged-with-pipeline-parallel": (lambda t: {"head_config": SHIPPED, "kv_layout": "paged"},
                                     ["--pipeline-parallel-size", "2"], default_model_dir(),
                                     ["supports tensor/pipeline parallel size 1 only",
                                      "--pipeline-parallel-size 1", '"kv_layout": "uniform"']),
    # Passes the config-time checks (its head config fits gemma); refused in the worker, where the
    # attention layers exist: the error must still get out, and everything must exit.
    "gemma-sliding-window-in-worker": (lambda t: {"head_config": _other_model_config(t, GEMMA_DIR, name="gemma.json")},
                                       [], GEMMA_DIR, ["sliding", "without --attention-backend razor"]),
}

WORKER_SIDE = {"gemma-sliding-window-in-worker"}
"""Cases refused in the worker (they need the attention layers), not while the config is built."""
