"""Paired accuracy through the real vLLM engine, in both serving protocols.

    python -m benchmarks.protocol_accuracy --tasks passkey,niah_single --length 8192 --n 25 \\
        --configs stock,razor-s64 --protocols chunked-2048,whole-prompt

Every configuration answers the same generated prompts (`razor_vllm.eval.tasks`, chat template,
greedy), one configuration and protocol at a time:

* `--engine serve` (default): `vllm serve MODEL [--attention-backend razor --additional-config ...]`
  through this environment's `vllm` console script, queried with the `openai` client, one request at
  a time (so every request is chunked the same way). The server is what users run.
* `--engine offline`: vLLM's `LLM` class in a child process (how the first 4k run was made).

Protocols (`--protocols`):

* `chunked-2048`: `--max-num-batched-tokens 2048`, vLLM's chunking on CPU and on GPUs under 70 GiB
  (H100/H200: 8192, `chunked-8192`). A longer prompt is prefilled in chunks, and the question of a
  long prompt reads razor's compressed context (kvpress' protocol). Razor keeps an explicit budget.
* `whole-prompt`: `--max-num-batched-tokens` = `--max-model-len`: one prefill chunk per prompt (the
  requests go one at a time), RazorAttention's own protocol (exact prefill, then compression).
* `defaults`: no flag: what a user gets (razor: `whole_prompt_prefill`; stock: vLLM's chunking). The
  record keeps the budget vLLM ran with.

Prompts: `--suite sequence` (default) is the HF harness's `razor-vllm eval` suite (prompt i of a task
is the same prompt there, seed 0), so the vLLM rows pair with the HF rows; `--suite depths --seed 11`
rebuilds the first 4k run's prompts. fp32, eager, the paged layout, `SERVING_DEFAULTS` except what a
configuration names. Records go to a JSONL file, one line per (config, protocol, prompt), written as
each answer arrives; a re-run skips what is there (resume). The summary gives accuracy, n and the
paired difference to `stock` in the same protocol, with a 95 % bootstrap interval, per task and pooled.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# the one paired statistic of every accuracy table; the harness's row reader (a cut last line re-runs)
from razor_vllm.eval.run import load_rows as _load, paired_bootstrap

CONFIGS = {
    "stock": None,
    "razor-s4": {"sinks": 4},
    "razor-s16": {"sinks": 16},
    "razor-s64": {"sinks": 64},
    "razor-s128": {"sinks": 128},
}
PROTOCOLS = ("chunked-2048", "chunked-8192", "whole-prompt", "defaults")
ENGINES = ("serve", "offline")
MARGIN = 64  # max_model_len = length + MARGIN: room for the answer after a `length`-token prompt


def position_overrides(model_dir: Path, max_model_len: int) -> dict:
    """An 8k suite prompt fills SmolLM2's 8192 positions, so its answer runs past them, as it does in
    the HF harness, whose RoPE is computed per position. vLLM precomputes RoPE for
    max_position_embeddings positions only: past them it decodes garbage (measured: every 8k answer
    of stock vLLM was "The-----..."). For plain RoPE a longer table is the same function, so raise
    max_position_embeddings to max_model_len (hf_overrides); scaled RoPE variants are refused."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if max_model_len <= cfg["max_position_embeddings"]:
        return {}
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise SystemExit(f"{model_dir.name}: prompts + answers of {max_model_len} tokens exceed its "
                         f"{cfg['max_position_embeddings']} positions and its RoPE is scaled; use a shorter --length")
    return {"max_position_embeddings": max_model_len}


def _batched_tokens(protocol: str, max_model_len: int) -> int | None:
    """The --max-num-batched-tokens a protocol passes (None: vLLM's own default)."""
    return {"chunked-2048": 2048, "chunked-8192": 8192, "whole-prompt": max_model_len, "defaults": None}[protocol]


def _razor(config: str, model: str) -> dict | None:
    if CONFIGS[config] is None:
        return None
    return {"head_config": model, "kv_layout": "paged", **CONFIGS[config]}


def build_samples(model_dir: Path, tasks: list[str], length: int, n: int, seed: int, suite: str) -> list:
    """[(prompt index, Sample)] for the suite (see the module docstring)."""
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks as suite_mod
    from razor_vllm.eval.run import sequence_suite

    tok = AutoTokenizer.from_pretrained(model_dir)
    if suite == "sequence":
        return sequence_suite(tasks, [length], n, seed, tok)
    samples = suite_mod.make_suite(tasks, [length], n, seed, tok)
    index = {t: 0 for t in tasks}
    out = []
    for s in samples:  # make_suite nests depths inside tasks: number them per task
        out.append((index[s.task], s))
        index[s.task] += 1
    return out


def _record(i: int, s, text: str, prompt_tokens: int) -> dict:
    from razor_vllm.eval import tasks

    return {"i": i, "task": s.task, "depth": s.depth, "seed": s.seed, "answers": list(s.answers),
            "prompt_tokens": prompt_tokens, "output": text, "correct": tasks.is_correct(s, text),
            "score": tasks.score(s, text)}


@functools.lru_cache(maxsize=None)
def _policy(config: str, model: str):
    """(razor's policy for a razor configuration: the shipped head config, SERVING_DEFAULTS plus the
    configuration's overrides; the config's induction ratio), read once per configuration."""
    from razor_vllm.config import RazorPolicy, parse_razor_config
    from razor_vllm.heads import load_head_config

    razor = _razor(config, model)
    head_cfg = load_head_config(razor["head_config"])
    return RazorPolicy.from_config(parse_razor_config({"razor": razor}), head_cfg), head_cfg.profile.induction_ratio


def method_fields(config: str, model: str, seq_len: int) -> dict:
    """The row fields `razor-vllm eval` writes for a method, so that `benchmarks.accuracy_report` reads
    both harnesses' rows: stock vLLM is the `full` method; razor's label and KV fraction come from its
    policy."""
    if CONFIGS[config] is None:
        return {"method": "full", "label": "full", "setting": None, "sinks": None, "window": None,
                "compensation": None, "kv_fraction": 1.0, "retrieval_fraction": 1.0}
    p, ratio = _policy(config, model)
    return {"method": "razor", "label": f"razor s{p.sinks} w{p.window} {p.compensation} r{ratio:g}",
            "setting": {"induction_ratio": ratio}, "sinks": p.sinks, "window": p.window,
            "compensation": p.compensation, "kv_fraction": p.kv_fraction(seq_len),
            "retrieval_fraction": p.retrieval_fraction}


def _message(s) -> list[dict]:
    return [{"role": "user", "content": s.context + "\n\n" + s.question}]


def _job_samples(job: dict) -> list:
    """[(prompt index, Sample)] of the job's pending prompts (rebuilt where the job runs: the offline
    engine's child process cannot be handed Sample objects)."""
    pending = {(t, i) for t, i in job["pending"]}
    return [(i, s) for i, s in build_samples(Path(job["model_dir"]), job["tasks"], job["length"], job["n"],
                                             job["seed"], job["suite"]) if (s.task, i) in pending]


# -- offline engine (a child process per configuration) -----------------------------------------------
def _engine_child(job: dict) -> None:
    from vllm import LLM, SamplingParams

    model_dir = Path(job["model_dir"])
    samples = _job_samples(job)
    max_model_len = job["length"] + MARGIN
    args = dict(model=str(model_dir), dtype="float32", max_model_len=max_model_len, enforce_eager=True, seed=0,
                max_num_seqs=4, hf_overrides=position_overrides(model_dir, max_model_len) or None)
    chunk = _batched_tokens(job["protocol"], max_model_len)
    if chunk is not None:
        args["max_num_batched_tokens"] = chunk
    if job["razor"] is not None:
        args.update(attention_backend="razor", additional_config={"razor": job["razor"]})
    llm = LLM(**args)
    try:
        batched = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        # each task's own answer length (a UUID-keyed needle takes ~30 tokens to repeat before its value)
        params = [SamplingParams(temperature=0.0, max_tokens=s.max_new_tokens) for _, s in samples]
        outs = llm.chat([_message(s) for _, s in samples], params, use_tqdm=False)
        for (i, s), o in zip(samples, outs):
            rec = _record(i, s, o.outputs[0].text, len(o.prompt_token_ids))
            print("RECORD " + json.dumps({**rec, "max_num_batched_tokens": batched}), flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()


def _run_offline(job: dict, emit) -> None:
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="2", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    res = subprocess.run([sys.executable, "-m", "benchmarks.protocol_accuracy", "--child", json.dumps(job)],
                         env=env, capture_output=True, text=True)
    recs = [json.loads(ln[7:]) for ln in res.stdout.splitlines() if ln.startswith("RECORD ")]
    if res.returncode or len(recs) != len(job["pending"]):
        raise RuntimeError(f"offline engine failed (exit {res.returncode}, {len(recs)} of "
                           f"{len(job['pending'])} answers)\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    for r in recs:
        emit(r)


# -- serve engine (`vllm serve` + the openai client) --------------------------------------------------
# the budget of a server started without the flag: razor's start-up line, else vLLM's (at INFO)
_BATCHED_RE = re.compile(r"(?:whole-prompt prefill.*max_num_batched_tokens |max_num_batched_tokens=)(\d+)")


def _run_serve(job: dict, emit, log_path: Path) -> None:
    import openai

    from razor_vllm.serve.process import RazorServer

    model_dir = Path(job["model_dir"])
    samples = _job_samples(job)
    max_model_len = job["length"] + MARGIN
    # One whole-prompt step of a long prompt can outlive vLLM's 300 s step limit on a small CPU.
    env = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1800")}
    overrides = position_overrides(model_dir, max_model_len)
    batched = _batched_tokens(job["protocol"], max_model_len)
    server = RazorServer(model_dir, razor=job["razor"], served_model_name="model", max_model_len=max_model_len,
                         max_num_batched_tokens=batched, kv_cache_space_gib=2, log_path=log_path, env=env,
                         extra_args=["--hf-overrides", json.dumps(overrides)] if overrides else [])
    try:  # not `with server`: its exit discards stop()'s verdict on the shutdown
        server.start()
        server.wait_ready()
        print(f"   {server.display_command()}  (ready in {server.ready_s:.0f} s; log {log_path})", flush=True)
        if batched is None:
            m = _BATCHED_RE.search(server.log_text())
            batched = int(m.group(1)) if m else None
        client = openai.OpenAI(base_url=server.base_url, api_key="none", timeout=3600)
        t0 = time.monotonic()
        for k, (i, s) in enumerate(samples):
            chat = client.chat.completions.create(model="model", messages=_message(s), temperature=0,
                                                  max_tokens=s.max_new_tokens)
            emit({**_record(i, s, chat.choices[0].message.content or "", chat.usage.prompt_tokens),
                  "max_num_batched_tokens": batched})
            el = time.monotonic() - t0
            print(f"   [{k + 1}/{len(samples)}] {s.task}/{i} {chat.usage.prompt_tokens} tok; "
                  f"{el / 60:.1f} min, ETA {el / (k + 1) * (len(samples) - k - 1) / 60:.1f} min", flush=True)
    finally:  # also on an error or Ctrl-C: never leave a server behind
        clean = server.stop()
    if not clean:
        raise RuntimeError(f"vllm serve did not stop cleanly; see {log_path}")


def main(argv=None) -> int:
    from razor_vllm.paths import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a `razor-vllm fetch-model` name; its shipped head "
                    "config is used")
    ap.add_argument("--tasks", default="passkey,niah_single")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--n", type=int, default=15, help="prompts per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--suite", choices=("sequence", "depths"), default="sequence")
    ap.add_argument("--engine", choices=ENGINES, default="serve")
    ap.add_argument("--configs", default="stock,razor-s64")
    ap.add_argument("--protocols", default="chunked-2048,whole-prompt")
    ap.add_argument("--out", type=Path, help="JSONL of records (default "
                    "docs/results/accuracy/<model>_<length>_vllm-<engine>.jsonl, beside the HF rows: "
                    "accuracy_report reads the model from the name's part before the first '_')")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _engine_child(json.loads(args.child))
        return 0
    from razor_vllm.fetch import resolve_model

    for c in args.configs.split(","):
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    for p in args.protocols.split(","):
        if p not in PROTOCOLS:
            ap.error(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    out = args.out or Path(f"docs/results/accuracy/{args.model}_{args.length}_vllm-{args.engine}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    tasks = args.tasks.split(",")
    done = {(r["config"], r.get("vllm_protocol", r["protocol"]), r["task"], r["i"]) for r in _load(out)}
    for protocol in args.protocols.split(","):
        for config in args.configs.split(","):
            pending = [(t, i) for i in range(args.n) for t in tasks if (config, protocol, t, i) not in done]
            if not pending:
                continue
            print(f"== {config} / {protocol}: {len(pending)} prompts ({args.engine})", flush=True)
            job = dict(model_dir=str(model_dir), tasks=tasks, length=args.length, n=args.n, seed=args.seed,
                       suite=args.suite, pending=pending, protocol=protocol, razor=_razor(config, args.model))
            meta = {"model": args.model, "engine": args.engine, "config": config, "protocol": protocol,
                    "length": args.length, "suite": args.suite, "seed": args.seed, "razor": job["razor"]}

            def emit(rec: dict, meta=meta, config=config, protocol=protocol) -> None:
                # The HF harness's row schema (accuracy_report reads both): its protocol names say
                # which engine and chunking, its sample key is the HF suite's for --suite sequence.
                row = {**meta, **rec, **method_fields(config, args.model, rec["prompt_tokens"]),
                       "sample": f"{rec['task']}/{args.length}/{rec['i']}",
                       "protocol": f"vllm-{args.engine} {protocol}", "vllm_protocol": protocol,
                       "seq_len": rec["prompt_tokens"]}
                with out.open("a") as f:  # one answer at a time: the resume unit
                    f.write(json.dumps(row) + "\n")

            if args.engine == "offline":
                _run_offline(job, emit)
            else:
                _run_serve(job, emit, Path("out") / f"{out.stem}.{config}.{protocol}.log")
    summarize(out)
    return 0


def summarize(path: Path) -> list[dict]:
    """Print and return one record per (protocol, config, task or "all"): n, accuracy and, for razor,
    the paired difference to stock in the same protocol with its 95 % interval and the share of
    prompts whose correctness flips."""
    by: dict[tuple[str, str], dict[tuple[str, int], bool]] = {}
    for r in _load(path):
        by.setdefault((r.get("vllm_protocol", r["protocol"]), r["config"]), {})[(r["task"], r["i"])] = r["correct"]
    out = []
    print(f"{'protocol':14s} {'config':11s} {'task':12s} {'n':>4s} {'acc':>6s}  {'delta vs stock [95% CI]':>26s} flips")
    for (protocol, config), res in sorted(by.items()):
        tasks = sorted({t for t, _ in res})
        for task in tasks + (["all"] if len(tasks) > 1 else []):
            keys = sorted(k for k in res if task in ("all", k[0]))
            rec = {"protocol": protocol, "config": config, "task": task, "n": len(keys),
                   "accuracy": sum(res[k] for k in keys) / len(keys)}
            line = f"{protocol:14s} {config:11s} {task:12s} {len(keys):4d} {rec['accuracy']:6.3f}"
            stock = by.get((protocol, "stock"))
            if stock and config != "stock":
                common = [k for k in keys if k in stock]
                d, lo, hi = paired_bootstrap([res[k] for k in common], [stock[k] for k in common])
                flips = sum(res[k] != stock[k] for k in common) / len(common)
                rec.update(n_paired=len(common), delta_vs_stock=d, delta_ci95=[lo, hi], flip_rate=flips)
                line += f"  {d:+.3f} [{lo:+.3f}, {hi:+.3f}]  {flips:.2f}"
            out.append(rec)
            print(line)
    return out


if __name__ == "__main__":
    sys.exit(main())
