#!/usr/bin/env python
"""KV capacity of stock vLLM vs RazorAttention kv_layout="paged", as vLLM itself reports it.

Starts SmolLM2-135M-Instruct twice at max_model_len 8192 with the same VLLM_CPU_KVCACHE_SPACE, each
engine in its own process: the stock CPU backend, then `--attention-backend razor` with the shipped
head config and kv_layout="paged". Parses vLLM's own log lines

    CPU KV cache size: N tokens, Maximum concurrency for T tokens per request: Cx

prints a table (tokens, concurrency, KV bytes per token = KV space / tokens) and writes
out/bench_capacity.json (`capacity_ratio` = razor / stock tokens) and out/bench_capacity.png.
Optionally (--prompt-len > 0) generates a few tokens on one random prompt to show the engine runs.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/capacity.py --window 256
    # another fetched model and length, with its shipped head config:
    VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python benchmarks/capacity.py --model qwen2.5-coder-0.5b-instruct \
        --head-config qwen2.5-coder-0.5b-instruct --max-model-len 16384 --out out/capacity_qwen_16k.json
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
from razor_vllm.config import SERVING_DEFAULTS
from razor_vllm.paths import default_model_dir
from razor_vllm.serve.process import parse_kv_capacity_log

REPO = Path(__file__).resolve().parents[1]
MODEL = default_model_dir()
RESULT = "BENCH_RESULT "
LAYOUT_RE = re.compile(r"(razor KV layout: .*)")


def _model_dir(model: str) -> Path:
    """A fetched model's name (under the cache) or a directory."""
    p = Path(model).expanduser()
    return p if p.is_dir() else MODEL.parent / model


def child(args) -> None:
    """One engine in this process; prints RESULT json."""
    from vllm import LLM, SamplingParams, TokensPrompt

    kw = dict(model=str(_model_dir(args.model)), dtype="bfloat16", max_model_len=args.max_model_len, enforce_eager=True,
              enable_prefix_caching=False, max_num_seqs=4, seed=0)
    if args.mode == "razor":
        kw.update(attention_backend="razor", additional_config={"razor": {
            "head_config": args.head_config, "window": args.window, "sinks": args.sinks,
            "kv_layout": "paged"}})
    t0 = time.time()
    llm = LLM(**kw)
    out = {"mode": args.mode, "start_s": round(time.time() - t0, 1)}
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        out.update(num_blocks=cc.num_gpu_blocks, block_size=cc.block_size)
        if args.prompt_len:
            import random

            rng = random.Random(0)
            prompt = TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(args.prompt_len)])
            t0 = time.time()
            res = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                               use_tqdm=False)
            out["generate_s"] = round(time.time() - t0, 1)
            out["tokens"] = list(res[0].outputs[0].token_ids)
    finally:
        llm.llm_engine.engine_core.shutdown()
    print(RESULT + json.dumps(out), flush=True)


def run_mode(mode: str, args) -> dict:
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--window", str(args.window),
           "--sinks", str(args.sinks),
           "--max-model-len", str(args.max_model_len), "--prompt-len", str(args.prompt_len),
           "--head-config", args.head_config]
    print(f"== {mode}: VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']} GiB ...", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    log = proc.stdout + proc.stderr
    res, tokens, layout = None, None, None
    for line in log.splitlines():
        if line.startswith(RESULT):
            res = json.loads(line[len(RESULT):])
        elif cap := parse_kv_capacity_log(line):
            tokens = cap
        elif m := LAYOUT_RE.search(line):
            layout = m.group(1)
    if res is None or tokens is None or "kv_cache_tokens" not in tokens:
        print(log[-5000:])
        raise SystemExit(f"{mode} engine failed or logged no KV cache size (rc={proc.returncode})")
    res.update(tokens)
    if layout:
        res["layout"] = layout
    space = float(env["VLLM_CPU_KVCACHE_SPACE"]) * (1 << 30)
    res["kv_space_bytes"] = int(space)
    res["kv_bytes_per_token"] = space / res["kv_cache_tokens"]
    print(f"   vLLM log: {res['log_line']}")
    return res


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "kv_cache_tokens", "KV cache size (tokens, vLLM log)"),
                           (axes[1], "max_concurrency", "max concurrency at max_model_len")):
        vals = [results[m][key] for m in modes]
        bars = ax.bar(modes, vals, color=["#888888", "#c0392b"][:len(modes)])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if key == "kv_cache_tokens" else f"{v:.2f}x" for v in vals])
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle(f"{title}, same VLLM_CPU_KVCACHE_SPACE: stock vs razor kv_layout=paged", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def driver(args) -> None:
    results = {m: run_mode(m, args) for m in ("stock", "razor")}
    ratio = results["razor"]["kv_cache_tokens"] / results["stock"]["kv_cache_tokens"]
    print(f"\n{'':8} {'KV tokens':>12} {'concurrency':>12} {'KV B/token':>11} {'blocks':>7} {'block':>6}")
    for m, r in results.items():
        print(f"{m:8} {r['kv_cache_tokens']:>12,} {r['max_concurrency']:>11.2f}x {r['kv_bytes_per_token']:>11,.0f} "
              f"{r['num_blocks']:>7} {r['block_size']:>6}")
    print(f"capacity_ratio (razor/stock): {ratio:.2f}x")
    if "layout" in results["razor"]:
        print(results["razor"]["layout"])
    out_json = args.out or REPO / "out" / "bench_capacity.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    summary = {"model": _model_dir(args.model).name, "max_model_len": args.max_model_len, "window": args.window,
               "sinks": args.sinks, "head_config": args.head_config,
               "VLLM_CPU_KVCACHE_SPACE_GiB": float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")),
               "capacity_ratio": ratio, "stock": results["stock"], "razor": results["razor"]}
    out_json.write_text(json.dumps(summary, indent=2))
    plot(results, out_json.with_suffix(".png"), f"{summary['model']} at {args.max_model_len}")
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["stock", "razor"], help=argparse.SUPPRESS)
    ap.add_argument("--model", default=MODEL.name, help="a fetched model's name or a model directory")
    ap.add_argument("--window", type=int, default=SERVING_DEFAULTS["window"])
    ap.add_argument("--sinks", type=int, default=SERVING_DEFAULTS["sinks"])
    ap.add_argument("--head-config", default="smollm2-135m-instruct")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=0, help="> 0: also generate 8 tokens on one prompt")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", type=Path, help="JSON to write (default out/bench_capacity.json; a PNG beside it)")
    args = ap.parse_args()
    if args.mode:
        child(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
