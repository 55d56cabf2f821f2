"""Paired accuracy through the real vLLM engine, in both serving protocols.

    python -m benchmarks.protocol_accuracy --tasks passkey,niah_single --length 4096 --n 15 \\
        --configs stock,razor-s4,razor-s64 --out out/protocol_accuracy.jsonl

Every configuration answers the same generated prompts (`razor_vllm.eval.tasks`, chat template,
greedy) with vLLM's offline engine (fp32, eager, paged layout for razor), once with vLLM's default
chunked prefill (`--max-num-batched-tokens 2048`: the question of a 4k prompt reads a compressed
context) and once with the whole prompt in one prefill chunk (RazorAttention's own protocol). Each
engine runs in a child process, one at a time. Records go to a JSONL file, one line per (config,
protocol, prompt), and a finished (config, protocol) is skipped on a re-run (resume). The summary
table gives accuracy, n and the paired difference to `stock` with a 95 % bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from razor_vllm.eval.run import paired_bootstrap  # the one paired statistic of every accuracy table

CONFIGS = {
    "stock": None,
    "razor-s4": {"sinks": 4},
    "razor-s16": {"sinks": 16},
    "razor-s64": {"sinks": 64},
    "razor-s128": {"sinks": 128},
}
PROTOCOLS = {"chunked-2048": 2048, "whole-prompt": None}


def _engine_child(job: dict) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from razor_vllm.eval import tasks
    from razor_vllm.paths import default_model_dir

    model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    samples = tasks.make_suite(job["tasks"], [job["length"]], job["n"], job["seed"], tok)
    chunk = job["chunk"]
    args = dict(model=model, dtype="float32", max_model_len=job["length"] + 64, enforce_eager=True, seed=0,
                max_num_seqs=4, max_num_batched_tokens=chunk or job["length"] + 64,
                enable_chunked_prefill=chunk is not None)
    if job["razor"] is not None:
        razor = {"head_config": "smollm2-135m-instruct", "window": 256, **job["razor"]}
        args.update(attention_backend="razor", additional_config={"razor": razor})
    llm = LLM(**args)
    try:
        # each task's own answer length (a UUID-keyed needle takes ~30 tokens to repeat before its value)
        params = [SamplingParams(temperature=0.0, max_tokens=s.max_new_tokens) for s in samples]
        msgs = [[{"role": "user", "content": s.context + "\n\n" + s.question}] for s in samples]
        outs = llm.chat(msgs, params, use_tqdm=False)
        for i, (s, o) in enumerate(zip(samples, outs)):
            text = o.outputs[0].text
            print("RECORD " + json.dumps({"i": i, "task": s.task, "depth": s.depth, "answers": list(s.answers),
                                          "prompt_tokens": len(o.prompt_token_ids), "output": text,
                                          "correct": tasks.is_correct(s, text)}), flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="passkey,niah_single")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--n", type=int, default=15, help="prompts per task (depths spread evenly)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--configs", default="stock,razor-s4,razor-s64")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--out", type=Path, default=Path("out/protocol_accuracy.jsonl"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _engine_child(json.loads(args.child))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        done = {(r["config"], r["protocol"]) for r in map(json.loads, args.out.read_text().splitlines())}
    for protocol in args.protocols.split(","):
        for config in args.configs.split(","):
            if (config, protocol) in done:
                continue
            job = dict(tasks=args.tasks.split(","), length=args.length, n=args.n, seed=args.seed,
                       chunk=PROTOCOLS[protocol], razor=CONFIGS[config])
            env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="2",
                       VLLM_ENABLE_V1_MULTIPROCESSING="0")
            print(f"== {config} / {protocol}", flush=True)
            res = subprocess.run([sys.executable, "-m", "benchmarks.protocol_accuracy", "--child", json.dumps(job)],
                                 env=env, capture_output=True, text=True)
            recs = [json.loads(ln[7:]) for ln in res.stdout.splitlines() if ln.startswith("RECORD ")]
            if res.returncode or not recs:
                print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
                return 1
            with args.out.open("a") as f:  # a finished (config, protocol) at a time: the resume unit
                for r in recs:
                    f.write(json.dumps({"config": config, "protocol": protocol, "length": args.length, **r}) + "\n")
    summarize(args.out)
    return 0


def summarize(path: Path) -> None:
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault((r["config"], r["protocol"]), {})[(r["task"], r["i"])] = r["correct"]
    print(f"{'protocol':14s} {'config':12s} {'n':>4s} {'acc':>6s}  {'delta vs stock [95% CI]':>28s}")
    for (config, protocol), res in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        keys = sorted(res)
        acc = sum(res[k] for k in keys) / len(keys)
        line = f"{protocol:14s} {config:12s} {len(keys):4d} {acc:6.3f}"
        stock = by.get(("stock", protocol))
        if stock and config != "stock":
            common = [k for k in keys if k in stock]
            d, lo, hi = paired_bootstrap([res[k] for k in common], [stock[k] for k in common])
            line += f"  {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
