"""`razor-vllm demo`: the whole production path on one machine, end to end.

1. fetch the model (cached after the first time);
2. use its shipped head config, or profile it once into the cache when none ships;
3. start `vllm serve MODEL --attention-backend razor --additional-config '{"razor": {...,
   "kv_layout": "paged"}}'` on 127.0.0.1 (a free port) and wait for /health;
4. send one long-context chat request through the `openai` client: a passkey hidden ~6k tokens deep
   in filler (razor_vllm.eval.tasks), far outside the 256-token window of the compressed heads;
5. print the answer, whether it is right, and the KV saving as the server reports it: razor's own
   gauges on /metrics (razor_vllm.vllm.metrics) and vLLM's KV capacity in tokens (`vllm:cache_config_info`);
6. stop the server (SIGTERM, bounded wait) and exit non-zero if anything failed: no answer, a wrong
   answer, missing metrics, or an unclean shutdown.

The prompt is prefilled in one step, compressed after it: razor's default (`whole_prompt_prefill`,
the protocol RazorAttention is defined in), so the razor server gets no chunking flag; the stock
server gets `--max-num-batched-tokens` = max_model_len, the same single step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEFAULT_SAMPLE = {"length": 6144, "depth": 0.25, "seed": 2}
"""A passkey prompt of 6,143 tokens that stock vLLM answers correctly with this model. SmolLM2-135M
is not reliable at 6k even with full attention (it misses seed 1 at depths 0.25 and 0.5: "The pass
key is 5 digits."), so the demo uses a prompt the uncompressed model gets right; a miss there
would say nothing about razor."""


def default_kv_space() -> float:
    return float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)


def resolve_heads(model_name: str, model_dir: Path, head_config: str | None, quiet: bool = False) -> tuple[str, str]:
    """(head config for --additional-config, where it came from). A name or path given by the user
    wins; else the config shipped for this model; else a profile cached under ~/.cache/razor-vllm/heads
    (made now if missing: minutes on a 2-core CPU for a 135M model)."""
    from razor_vllm.heads import load_head_config
    from razor_vllm.paths import cache_root, repo_configs_dir

    if head_config:
        load_head_config(head_config)  # fail here, with its message, rather than inside vLLM
        return head_config, "given"
    if (repo_configs_dir() / f"{model_name}.json").is_file():
        return model_name, "shipped"
    cached = cache_root() / "heads" / f"{model_name}.json"
    if cached.is_file():
        return str(cached), "cached profile"
    from razor_vllm.profile.profiler import ProfileOptions, run_profile

    print(f"no head config ships for {model_name}: profiling its retrieval heads into {cached} (one-off)")
    run_profile(model_dir, cached, ProfileOptions(progress=not quiet))
    return str(cached), "profiled now"


def _fmt_int(x: float | None) -> str:
    return "n/a" if x is None else f"{int(x):,}"


def run_demo(args: argparse.Namespace) -> int:
    import openai
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks
    from razor_vllm.fetch import resolve_model
    from razor_vllm.serve.process import RazorServer, ServerError

    failures: list[str] = []
    model_dir = resolve_model(args.model)
    name = Path(args.model).name if Path(args.model).expanduser().is_dir() else args.model
    print(f"[1/4] model {name}: {model_dir}")

    razor = None
    if args.backend == "razor":
        heads, origin = resolve_heads(name, model_dir, args.head_config, args.quiet)
        razor = {"head_config": heads, "window": args.window, "compensation": "single", "kv_layout": "paged"}
        print(f"[2/4] head config {heads} ({origin}); razor settings {json.dumps(razor)}")
    else:
        print("[2/4] --backend stock: vLLM's own attention, no head config")

    tok = AutoTokenizer.from_pretrained(model_dir)
    sample = tasks.make_sample("passkey", args.length, args.depth, args.seed, tok)

    log = Path(args.log)
    # The whole prompt is one engine step; vLLM kills the engine when a step outlives
    # VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300 s), which a 16k prompt on a small CPU does (measured:
    # Qwen2.5-0.5B, 16k tokens, 2 cores). The demo waits --request-timeout for its answer anyway.
    env = {} if "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS" in os.environ else {
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": str(max(300, int(args.request_timeout)))}
    server = RazorServer(model_dir, razor=razor, served_model_name=name, max_model_len=args.max_model_len,
                         max_num_batched_tokens=None if razor else args.max_model_len,
                         kv_cache_space_gib=args.kv_cache_space,
                         log_path=log, startup_timeout=args.startup_timeout, env=env)
    record: dict = {"model": name, "backend": args.backend, "razor": razor}
    try:
        server.start()
        print(f"[3/4] {server.display_command()}\n      log {log}", flush=True)
        server.wait_ready()
        print(f"      ready in {server.ready_s:.0f} s at {server.base_url}")
        client = openai.OpenAI(base_url=server.base_url, api_key="none", timeout=args.request_timeout)
        print(f"[4/4] passkey request: needle at depth {sample.depth} of a ~{sample.length:,}-token prompt ...",
              flush=True)
        t0 = time.monotonic()
        chat = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": sample.context + "\n\n" + sample.question}],
            max_tokens=sample.max_new_tokens, temperature=0)
        elapsed = time.monotonic() - t0
        answer = chat.choices[0].message.content or ""
        correct = tasks.is_correct(sample, answer)
        print(f"      prompt {chat.usage.prompt_tokens:,} tokens, answered in {elapsed:.0f} s: {answer!r}")
        print(f"      expected {' '.join(sample.answers)}: {'CORRECT' if correct else 'WRONG'}")
        if not correct:
            failures.append(f"wrong answer {answer!r} (expected {sample.answers})")
        record.update(prompt_tokens=chat.usage.prompt_tokens, answer=answer, expected=list(sample.answers),
                      correct=correct, seconds=round(elapsed, 1), ready_s=round(server.ready_s, 1))
        record.update(_report_kv(server, razor is not None, args, failures))
    except (ServerError, openai.OpenAIError) as e:
        failures.append(f"{type(e).__name__}: {e}")
        fatal = _engine_fatal_error(server.log_text())
        if fatal:
            failures.append(fatal)
    finally:  # also on Ctrl-C: never leave a server behind
        clean = server.stop()
    code = server.proc.returncode if server.proc else None
    print(f"server stopped {'cleanly' if clean else 'UNCLEANLY'} (SIGTERM, exit code {code})")
    if not clean:
        failures.append(f"unclean shutdown (exit code {code}); see {log}")
    record.update(clean_shutdown=clean, failures=failures)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if failures:
        print("demo FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("demo OK")
    return 0


def _engine_fatal_error(log: str) -> str | None:
    """Why the engine died, from the server log, with the fix where there is a known one."""
    if "EngineCore encountered a fatal error" not in log:
        return None
    if "shm_broadcast" in log and "No available shared memory broadcast block" in log:
        return ("the engine died: one model step outlived VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (a long prompt "
                "prefilled in one step on a slow CPU); raise it, e.g. VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS=1800, "
                "or use a shorter --length")
    line = next(ln for ln in log.splitlines() if "EngineCore encountered a fatal error" in ln)
    return f"the engine died: {line.strip()}"


def _report_kv(server, razor: bool, args: argparse.Namespace, failures: list[str]) -> dict:
    """Print the KV saving from the server's /metrics; returns the figures for the JSON record."""
    from razor_vllm.serve.process import metric_value

    samples = server.metrics()
    capacity = server.kv_capacity_tokens()
    g = {k: metric_value(samples, f"razor:{k}") for k in
         ("retrieval_head_fraction", "kv_bytes_per_token", "kv_bytes_per_token_full",
          "kv_bytes_per_request_fixed", "kv_fraction")}
    out = {"kv_capacity_tokens": capacity, **{f"razor_{k}": v for k, v in g.items()}}
    print("KV (read from the server's /metrics):")
    if razor:
        if any(v is None for v in g.values()):
            failures.append("razor:* metrics missing from /metrics (is the `vllm.stat_logger_plugins` entry "
                            "point installed? re-run `pip install -e .` / scripts/setup.sh)")
        else:
            print(f"  retrieval heads (full KV)       {100 * g['retrieval_head_fraction']:.1f} % of the KV heads")
            per_token, full_per_token = g["kv_bytes_per_token"], g["kv_bytes_per_token_full"]
            # no retrieval head (e.g. a StreamingLLM-like config): a token adds nothing to the KV
            less = f"{full_per_token / per_token:.1f}x less" if per_token else "only the fixed rings below"
            print(f"  KV bytes per token              {_fmt_int(per_token)} B vs {_fmt_int(full_per_token)} B "
                  f"full ({less})")
            print(f"  + fixed per request (rings)     {g['kv_bytes_per_request_fixed'] / 2**20:.1f} MiB")
            print(f"  {f'KV kept at {args.max_model_len:,} tokens':<32}{100 * g['kv_fraction']:.1f} % of full")
    full = g["kv_bytes_per_token_full"]
    stock = None
    if full:
        # Stock vLLM on CPU: one group of 128-token blocks holding every head of every layer.
        stock = int(args.kv_cache_space * 2**30 // (full * 128)) * 128
        out["stock_kv_capacity_tokens_computed"] = stock
    line = f"  vLLM KV capacity                {_fmt_int(capacity)} tokens"
    if capacity and stock:
        line += (f" vs {stock:,} stock at the same {args.kv_cache_space:g} GiB (computed) = "
                 f"{capacity / stock:.2f}x; {capacity / args.max_model_len:.1f} concurrent "
                 f"{args.max_model_len:,}-token requests")
    print(line)
    if capacity is None:
        failures.append("vllm:cache_config_info has no kv_cache_size_tokens on /metrics")
    return out


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="serve a model with razor through `vllm serve`, ask a 6k-token passkey, "
                                    "show the answer and the KV saving",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--model", default="smollm2-135m-instruct", help="fetchable model name or HF directory")
    d.add_argument("--head-config", help="head config name or path (default: shipped, else profiled once)")
    d.add_argument("--backend", choices=["razor", "stock"], default="razor",
                   help="stock: the same request through vLLM's own attention, for comparison")
    d.add_argument("--window", type=int, default=256)
    d.add_argument("--length", type=int, default=DEFAULT_SAMPLE["length"], help="prompt tokens (upper bound)")
    d.add_argument("--depth", type=float, default=DEFAULT_SAMPLE["depth"], help="needle depth, 0..1")
    d.add_argument("--seed", type=int, default=DEFAULT_SAMPLE["seed"], help="passkey sample seed")
    d.add_argument("--max-model-len", type=int, default=8192)
    d.add_argument("--kv-cache-space", type=float, default=default_kv_space(),
                   help="GiB for the KV cache (VLLM_CPU_KVCACHE_SPACE; default: that variable, else 1)")
    d.add_argument("--log", default="out/demo-serve.log", help="server log file")
    d.add_argument("--json", default="out/demo.json", help="result record ('' for none)")
    d.add_argument("--startup-timeout", type=float, default=600)
    d.add_argument("--request-timeout", type=float, default=1200)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=run_demo)
