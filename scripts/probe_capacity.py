#!/usr/bin/env python
"""Capacity probe (a prototype, not a test): does vLLM's own accounting give the razor layout's saving?

Starts `vllm.LLM` on SmolLM2-135M-Instruct twice, each in its own process:

* ``stock``: the stock CPU backend;
* ``razor``: a throw-away backend defined here (a `CPUAttentionBackend` subclass registered as CUSTOM)
  whose `customize_spec` returns `razor_vllm.vllm.layout`'s ring-page spec and whose impl registers the
  layout's sibling layers and then *ignores correctness* (writes zeros). Generated text is garbage;
  only the KV cache plumbing and accounting are real: vLLM's planner, managers, block tables, cache
  views and metadata for every group.

and prints, for both, vLLM's "KV cache size: N tokens" / "Maximum concurrency" figures (read from
`cache_config` and from the log), the KV cache groups, and in razor mode what the forward context
offers one layer (cache views, block tables, slot mappings), after running a few long prompts
through chunked prefill and decode.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python scripts/probe_capacity.py            # both + ratio
    .venv/bin/python scripts/probe_capacity.py --mode razor --window 256           # one engine

The razor run uses VLLM_PLUGINS to keep the real razor plugin out and runs the engine in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so that this script's backend class is the one vLLM resolves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from razor_vllm.paths import default_model_dir
from razor_vllm.serve.process import parse_kv_capacity_log

REPO = Path(__file__).resolve().parents[1]
MODEL = default_model_dir()
HEADS = REPO / "razor_vllm" / "configs" / "smollm2-135m-instruct.json"
RESULT = "PROBE_RESULT "

# -------------------------------------------------------------------------------------------------
# razor-mode engine pieces (only imported/used in the child process)
# -------------------------------------------------------------------------------------------------
LAYOUT = None
SEEN: dict = {}


def _build_layout(vllm_config):
    from razor_vllm.vllm import layout as kvl

    retrieval = json.loads(HEADS.read_text())["retrieval_heads"]
    params = kvl.params_from_vllm(vllm_config, retrieval, sinks=int(os.environ["PROBE_SINKS"]),
                                  window=int(os.environ["PROBE_WINDOW"]),
                                  heads_per_page=int(os.environ["PROBE_K"]) or None)
    return kvl.plan_kv_layout(params)


def _define_backend():
    from vllm.config import get_current_vllm_config
    from vllm.forward_context import get_forward_context
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    from razor_vllm.vllm import layout as kvl

    class ProbeImpl(CPUAttentionBackendImpl):
        def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                     kv_cache_dtype, logits_soft_cap=None, attn_type="decoder",
                     kv_sharing_target_layer_name=None, sinks=None, **_):
            super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                             kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name)
            global LAYOUT
            self._vllm_config = get_current_vllm_config()
            if LAYOUT is None:
                LAYOUT = _build_layout(self._vllm_config)
            self.layer_name = None

        def process_weights_after_loading(self, act_dtype):
            super().process_weights_after_loading(act_dtype)
            ctx = self._vllm_config.compilation_config.static_forward_context
            self.layer_name = next(n for n, m in ctx.items() if getattr(m, "impl", None) is self)
            added = kvl.register_siblings(self._vllm_config, LAYOUT)
            if added:
                print(f"probe: registered {len(added)} razor KV siblings", flush=True)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None,
                    output_scale=None, output_block_scale=None):
            output.zero_()  # correctness ignored on purpose
            if attn_metadata is None or self.layer_name is None:
                return output
            fc = get_forward_context()
            L = LAYOUT.layer(kvl_index(self.layer_name))
            rec = SEEN.setdefault(self.layer_name, {"steps": 0, "max_seq": 0})
            rec["steps"] += 1
            rec["max_seq"] = max(rec["max_seq"], int(attn_metadata.seq_lens.max()))
            if "main_cache" not in rec:
                rec["main_cache"] = list(kv_cache.shape)
                rec["main_block_table"] = list(attn_metadata.block_table.shape)
                rec["retrieval"] = [
                    {"head": r.kv_head, "name": r.name,
                     "cache": list(fc.no_compile_layers[r.name].kv_cache.shape),
                     "metadata": type(fc.attn_metadata[r.name]).__name__,
                     "block_table": list(fc.attn_metadata[r.name].block_table.shape),
                     "slot_mapping": list(fc.slot_mapping[r.name].shape)}
                    for r in L.retrieval]
                rec["local"] = [
                    {"head": x.kv_head, "page": x.page, "offset": x.offset,
                     "page_cache": list((kv_cache if x.page == self.layer_name
                                         else fc.no_compile_layers[x.page].kv_cache).shape),
                     "block_table": list(fc.attn_metadata[x.page].block_table.shape)}
                    for x in L.local]
            # every request owns one ring page per page layer, distinct across requests
            for x in L.local:
                md = attn_metadata if x.page == self.layer_name else fc.attn_metadata[x.page]
                ids = md.block_table[:, 0].tolist()
                assert all(i > 0 for i in ids) and len(set(ids)) == len(ids), ids
            return output

    def kvl_index(name):
        from vllm.model_executor.models.utils import extract_layer_index

        return extract_layer_index(name)

    class ProbeBackend(CPUAttentionBackend):
        forward_includes_kv_cache_update = True

        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return ProbeImpl

        @classmethod
        def customize_spec(cls, spec):
            if LAYOUT is None:
                return spec
            return LAYOUT.customize(spec)

    return ProbeBackend


def _register_probe_backend():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    backend = _define_backend()
    mod = sys.modules[__name__]
    mod.ProbeBackend = backend
    register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.ProbeBackend")
    original = CpuPlatform.__dict__["get_attn_backend_cls"].__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend == AttentionBackendEnum.CUSTOM:
            return f"{__name__}.ProbeBackend"
        return original(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


# -------------------------------------------------------------------------------------------------
# one engine
# -------------------------------------------------------------------------------------------------
def run_engine(mode: str, args) -> dict:
    from vllm import LLM, SamplingParams, TokensPrompt

    kw = dict(model=str(MODEL), dtype="bfloat16", max_model_len=args.max_model_len, enforce_eager=True,
              enable_prefix_caching=False, max_num_seqs=8, seed=0, max_num_batched_tokens=args.chunk)
    if mode == "razor":
        _register_probe_backend()
        kw["attention_backend"] = "CUSTOM"
    t0 = time.time()
    llm = LLM(**kw)
    vc = llm.llm_engine.vllm_config
    out = {"mode": mode, "start_s": round(time.time() - t0, 1),
           "kv_cache_size_tokens": vc.cache_config.kv_cache_size_tokens,
           "max_concurrency": vc.cache_config.kv_cache_max_concurrency,
           "num_gpu_blocks": vc.cache_config.num_gpu_blocks,
           "block_size": vc.cache_config.block_size,
           "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens}
    if args.prompt_len:
        import random

        rng = random.Random(0)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 40000) for _ in range(args.prompt_len)])
                   for _ in range(args.num_prompts)]
        t0 = time.time()
        res = llm.generate(prompts, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True), use_tqdm=False)
        out["generate_s"] = round(time.time() - t0, 1)
        out["generated"] = [len(r.outputs[0].token_ids) for r in res]
    if mode == "razor":
        out["layout"] = LAYOUT.describe()
        out["predicted_capacity"] = LAYOUT.capacity(int(float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * (1 << 30)))
        pick = [n for n in SEEN if any(s in n for s in (".7.", ".24.", ".0."))]
        out["forward_context"] = {n: SEEN[n] for n in pick}
    return out


def child(args) -> None:
    res = run_engine(args.mode, args)
    print(RESULT + json.dumps(res), flush=True)
    os._exit(0)  # skip engine teardown (in-process engine, nothing to flush)


GROUP_RE = re.compile(r"kv cache group sizes (.*)")


def driver(args) -> None:
    results = {}
    for mode in ("stock", "razor"):
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   VLLM_PLUGINS="razor_probe_no_plugins", PROBE_WINDOW=str(args.window),
                   PROBE_SINKS=str(args.sinks), PROBE_K=str(args.heads_per_page or 0),
                   PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        print(f"== {mode}: VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']} ...", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        log = proc.stdout + proc.stderr
        res = None
        for line in log.splitlines():
            if line.startswith(RESULT):
                res = json.loads(line[len(RESULT):])
            elif parse_kv_capacity_log(line) or GROUP_RE.search(line):
                print("   vLLM log:", line.split("] ", 1)[-1].strip())
        if res is None:
            print(log[-6000:])
            raise SystemExit(f"{mode} engine failed (rc={proc.returncode})")
        for k, v in res.items():
            if k != "forward_context":
                print(f"   {k}: {v}")
        for name, rec in res.get("forward_context", {}).items():
            print(f"   {name}: {rec['steps']} forwards, max seq_len {rec['max_seq']}, own cache "
                  f"{rec['main_cache']}, own block table {rec['main_block_table']}")
            for r in rec["retrieval"]:
                print(f"     retrieval head {r['head']}: {r['name']} cache {r['cache']} {r['metadata']} "
                      f"block_table {r['block_table']} slot_mapping {r['slot_mapping']}")
            for x in rec["local"]:
                print(f"     local head {x['head']}: page {x['page']} @ slot {x['offset']} cache {x['page_cache']} "
                      f"block_table {x['block_table']}")
        results[mode] = res
    ratio = results["razor"]["kv_cache_size_tokens"] / results["stock"]["kv_cache_size_tokens"]
    print(f"\nKV cache capacity razor/stock in vLLM's accounting: {ratio:.2f}x "
          f"({results['razor']['kv_cache_size_tokens']:,} vs {results['stock']['kv_cache_size_tokens']:,} tokens; "
          f"max concurrency {results['razor']['max_concurrency']:.2f} vs {results['stock']['max_concurrency']:.2f} "
          f"at {args.max_model_len} tokens)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["stock", "razor"], help="run one engine in this process")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--heads-per-page", type=int, default=0, help="0 = planner's choice")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--prompt-len", type=int, default=1500, help="0: start the engine only")
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=1200)
    args = ap.parse_args()
    if args.mode:
        os.environ.setdefault("PROBE_WINDOW", str(args.window))
        os.environ.setdefault("PROBE_SINKS", str(args.sinks))
        os.environ.setdefault("PROBE_K", str(args.heads_per_page))
        child(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
