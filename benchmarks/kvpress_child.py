"""The kvpress side of `benchmarks.kvpress_peers`: runs in the kvpress venv (scripts/kvpress_venv.sh).

    <kvpress-venv>/bin/python benchmarks/kvpress_child.py JOB.json

Self-contained on purpose: the kvpress venv has kvpress 0.5.5 and its transformers (<5.3), not
razor_vllm, so nothing here imports the project. The parent builds the prompts and the rows; this file
only turns token ids into answers.

JOB.json:
    {"model_dir": str, "dtype": "float32", "threads": int | null, "prefill": "shared" | "own",
     "duo": {"sink_size": 64, "recent_size": 256, "retrieval_heads": [[kv head, ...] per layer]},
     "prompts": [{"key": str, "context_ids": [int], "question_ids": [int], "max_new_tokens": int,
                  "runs": [{"name": str, "press": null | {"class": str, "kwargs": {...}}}]}]}

Protocol (kvpress' question-agnostic pipeline, `KVPressTextGenerationPipeline._forward` with a single
question): the context ids are prefilled with the press's hooks registered (`with press(model):
model.model(context)`), each attention layer's cache compressed right after that layer's attention;
then the question is fed at its true positions through the compressed cache and the answer decoded
greedily until an EOS of the model's generation config or max_new_tokens. "prefill": "own" runs
exactly kvpress' code per press (`pipeline._forward` on the parent's token ids; `preprocess`, which
would tokenise strings, is skipped), one prefill per (prompt, press); "shared" (default) prefills the
context once and hands each layer's keys and values to every press's own `compress` (see
`_shared_prefill`), then decodes each press with kvpress' `generate_answer`.

DuoAttentionPress gets the profiled retrieval heads of the razor head config as its pattern: scores
1.0 for a retrieval (KV) head, 0.0 for the others, with head_compression_ratio = share of non-retrieval
heads, so its streaming mask is exactly the complement of razor's retrieval heads. The pattern goes into
kvpress' own `load_attention_pattern` cache (a cachetools LRUCache keyed by
`model.config.name_or_path`) before the press is used, so kvpress never calls the network; the
`requests` calls are also disabled in this process to make sure of it.

Output: one stdout line per run, "KVPRESS_ROW " + JSON {"key", "name", "output", "seconds",
"compression_ratio", "cache_tokens"}; "KVPRESS_READY " + versions once the model is loaded;
"KVPRESS_DONE " + key after each prompt. Everything else goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _emit(tag: str, obj) -> None:
    sys.stdout.write(f"{tag} {json.dumps(obj)}\n")
    sys.stdout.flush()


def _no_network() -> None:
    import requests

    def refuse(*args, **kwargs):
        raise RuntimeError("kvpress_child: network access attempted (a press tried to fetch something)")

    for name in ("get", "post", "head", "request"):
        setattr(requests, name, refuse)
    requests.Session.request = refuse


def _duo_pattern(model, duo: dict):
    """Pre-fill DuoAttentionPress.load_attention_pattern's cache for this model; returns
    head_compression_ratio (share of KV heads that become streaming heads)."""
    import numpy as np
    from kvpress.presses import duo_attention_press as duo_mod

    n_layers = model.config.num_hidden_layers
    n_kv = model.config.num_key_value_heads
    heads = duo["retrieval_heads"]
    if len(heads) != n_layers:
        raise ValueError(f"retrieval_heads has {len(heads)} layers, the model {n_layers}")
    scores = np.zeros((n_layers, n_kv), dtype=float)
    for layer, hs in enumerate(heads):
        for h in hs:
            scores[layer, h] = 1.0
    duo_mod.cache[model.config.name_or_path] = (int(duo["sink_size"]), int(duo["recent_size"]), scores)
    return 1.0 - scores.sum() / scores.size


def _press(spec: dict | None, duo_ratio: float | None):
    if spec is None:
        return None
    import kvpress

    cls = getattr(kvpress, spec["class"])
    kwargs = dict(spec.get("kwargs") or {})
    if spec["class"] == "DuoAttentionPress":
        kwargs = {"head_compression_ratio": duo_ratio, **kwargs}
    return cls(**kwargs)


def main(argv: list[str]) -> int:
    job = json.loads(open(argv[1]).read())
    _no_network()
    import importlib.metadata as md

    import torch
    import transformers
    from kvpress import KVPressTextGenerationPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    dtype = getattr(torch, job.get("dtype", "float32"))
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype, attn_implementation="sdpa")
    model.eval()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok, device=torch.device("cpu"))
    duo_ratio = _duo_pattern(model, job["duo"]) if job.get("duo") else None
    _emit("KVPRESS_READY", {"kvpress": md.version("kvpress"), "transformers": transformers.__version__,
                            "torch": torch.__version__, "duo_head_compression_ratio": duo_ratio,
                            "eos_token_id": model.generation_config.eos_token_id})
    shared = job.get("prefill", "shared") == "shared"
    for p in job["prompts"]:
        ctx = torch.tensor([p["context_ids"]])
        question = torch.tensor([p["question_ids"]])
        runs = [(run["name"], _press(run["press"], duo_ratio)) for run in p["runs"]]
        with torch.inference_mode():
            if shared:
                results = _shared_prefill(pipe, model, ctx, question, p["max_new_tokens"], runs)
            else:
                results = []
                for name, press in runs:
                    _clear_masks(model)  # a head-wise press's mask must not outlive its run
                    t = time.perf_counter()
                    answer, cache_tokens = _forward(pipe, ctx, question, p["max_new_tokens"], press)
                    results.append((name, press, answer, cache_tokens, time.perf_counter() - t))
                _clear_masks(model)
        for name, press, answer, cache_tokens, seconds in results:
            _emit("KVPRESS_ROW", {"key": p["key"], "name": name, "output": answer, "seconds": round(seconds, 3),
                                  "compression_ratio": None if press is None else float(press.compression_ratio),
                                  "cache_tokens": cache_tokens})
        _emit("KVPRESS_DONE", p["key"])
    return 0


def _clear_masks(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


def _shared_prefill(pipe, model, ctx, question, max_new_tokens: int, runs: list) -> list:
    """Every press of `runs` from one context prefill (kvpress' "shared" trick).

    A press compresses layer l's cache in a hook right after layer l's attention, and no later layer
    reads layer l's cache during the prefill, so the prefill itself does not depend on the press. One
    prefill without compression is run with one hook per layer that hands the layer's full keys and
    values to every press's own `compress` (the call `BasePress.forward_hook` makes) and stores the
    result in that press's own DynamicCache; a head-wise press's mask (`masked_key_indices`, set on
    the module by `compress`) is kept per press and put back on the modules only while that press
    decodes. Then each press answers with kvpress' `generate_answer` from its own cache (the `full`
    run from the uncompressed one). Seconds per run: its decode plus an equal share of the prefill.
    """
    from kvpress.utils import extract_keys_and_values
    from transformers import DynamicCache

    lm = model.model
    pressed = [(name, press) for name, press in runs if press is not None]
    for _, press in pressed:
        press.post_init_from_model(model)
    caches = {name: DynamicCache() for name, _ in pressed}
    masks: dict = {name: {} for name, _ in pressed}

    def hook(module, args, kwargs, output):
        idx = module.layer_idx
        keys, values = extract_keys_and_values(kwargs["past_key_values"], idx)
        for name, press in pressed:
            module.masked_key_indices = None
            k, v = press.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
            caches[name].update(k, v, idx)
            masks[name][idx] = module.masked_key_indices
        module.masked_key_indices = None
        return output

    hooks = []
    try:
        for layer in lm.layers:
            layer.self_attn.rotary_emb = lm.rotary_emb  # as BasePress.__call__ sets it
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        full = DynamicCache()
        t = time.perf_counter()
        lm(input_ids=ctx, past_key_values=full)
        prefill_share = (time.perf_counter() - t) / max(1, len(runs))
    finally:
        for h in hooks:
            h.remove()
    context_length = ctx.shape[1]
    out = []
    for name, press in runs:
        cache = full if press is None else caches.pop(name)
        for layer in lm.layers:
            layer.self_attn.masked_key_indices = None if press is None else masks[name].get(layer.self_attn.layer_idx)
        cache_tokens = int(cache.get_seq_length(0))
        t = time.perf_counter()
        try:
            answer = pipe.generate_answer(question_ids=question, cache=cache, context_length=context_length,
                                          max_new_tokens=max_new_tokens)
        finally:
            _clear_masks(model)
        out.append((name, press, answer, cache_tokens, time.perf_counter() - t + prefill_share))
        del cache
    return out


def _forward(pipe, ctx, question, max_new_tokens: int, press):
    """kvpress' `KVPressTextGenerationPipeline._forward` for one question, plus the context tokens the
    cache holds per KV head after the compressed prefill (layer 0; a scorer press prunes every layer to
    the same count, DuoAttention keeps all of them and masks)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    seen = {}
    orig = pipe.generate_answer

    def generate_answer(question_ids, cache, context_length, max_new_tokens):
        seen["cache_tokens"] = int(cache.get_seq_length(0))
        return orig(question_ids=question_ids, cache=cache, context_length=context_length,
                    max_new_tokens=max_new_tokens)

    pipe.generate_answer = generate_answer
    try:
        answers = pipe._forward({"context_ids": ctx, "questions_ids": [question]}, max_new_tokens=max_new_tokens,
                                press=press, cache=cache)
    finally:
        del pipe.generate_answer
    return answers[0], seen["cache_tokens"]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
