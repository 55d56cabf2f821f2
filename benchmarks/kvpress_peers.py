"""kvpress 0.5.5 presses on exactly the prompts of the HF harness (`razor-vllm eval`), as rows it reads.

    python -m benchmarks.kvpress_peers --tasks passkey,niah_single --length 4096 --n 100
    python -m benchmarks.kvpress_peers --tasks passkey --length 1024 --n 1 --presses full,snapkv,duo

Peers on the same prompts (issue #17, accuracy-protocols notes section 5). Two processes:

* this one (the project venv) builds the prompts as `razor-vllm eval` does (`sequence_suite`, seed 0,
  `build_prompt_ids`: chat template, context ids / question ids), sizes every press to razor's KV
  budget on that prompt, and writes / resumes / summarises the rows;
* `benchmarks/kvpress_child.py` in kvpress' own venv (kvpress==0.5.5 needs transformers<5.3, the
  project runs a newer 5.x), built and cached by `scripts/kvpress_venv.sh` on first use
  (~/.cache/razor-vllm/kvpress-venv). It gets token ids and press specs as a JSON file and streams an
  answer per (prompt, press) back; it never imports razor_vllm.

Protocol "kvpress question-agnostic": kvpress' pipeline (`KVPressTextGenerationPipeline._forward`):
the context is prefilled with the press's hooks on (each layer's cache compressed right after its
attention), then the question is fed at its true positions through the compressed cache and the answer
decoded greedily (max_new_tokens of the task, stop at the model's EOS). SmolLM2 in fp32, sdpa attention
(kvpress' head-wise masking refuses eager). `--prefill shared` (default) prefills each context once and
hands every layer's keys and values to each press's own `compress` (a press compresses a layer after
that layer's attention, so the prefill does not depend on it: kvpress' shared trick); `--prefill own`
runs kvpress' `_forward` per press, one prefill each; both give the same answers (the test checks it).
The `full` row (no press) runs in the same child, so every delta pairs within one harness.

Presses (`--presses`, default all), each at razor's budget on that prompt: compression_ratio =
1 - razor's kv_fraction(prompt tokens) with the shipped head config and SERVING_DEFAULTS
(`RazorPolicy.kv_fraction`; ~0.78 at 4k for SmolLM2), applied by kvpress to the context tokens:

* streaming          StreamingLLMPress(compression_ratio, n_sink=64)      (razor's sinks)
* snapkv             SnapKVPress(compression_ratio)                        (window_size 64, kernel 5)
* expected-attention ExpectedAttentionPress(compression_ratio)             (kvpress defaults)
* knorm              KnormPress(compression_ratio)
* duo                DuoAttentionPress with razor's profiled retrieval heads as its pattern (score 1 for
                     a retrieval KV head, 0 otherwise; head_compression_ratio = share of the others),
                     sink_size = razor's sinks (64), recent_size = razor's window (256), injected into
                     kvpress' pattern cache so nothing is fetched. Its budget follows from the heads;
                     the row's kv_fraction is kvpress' own effective figure (1 - press.compression_ratio).

Rows: the `razor-vllm eval` schema (sample, task, length, depth, seed, seq_len, protocol, method, label,
setting, sinks, window, compensation, kv_fraction, retrieval_fraction, correct, score, output, seconds)
plus press (class and arguments), compression_ratio, razor_kv_fraction, context_tokens, cache_tokens
(context tokens per KV head in the cache after the compressed prefill), kv_storage, frees_memory and
peer (versions), prefill. kv_fraction = what the press keeps of the context (1 - compression ratio).
frees_memory is False on every press row: kvpress compresses one request's HF DynamicCache and frees no
serving memory; the scorer presses ("kv_storage": "pruned") gather the kept tokens into smaller
per-layer tensors of that cache, while DuoAttention ("masked") keeps every key and overwrites the
streaming heads' evicted ones with a fake key at each attention call. Rows are appended per prompt; a
re-run skips every (sample, label) already in the file. Default file:
docs/results/accuracy/<model>_<length>_kvpress.jsonl (`benchmarks.accuracy_report` reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROTOCOL = "kvpress question-agnostic"
KVPRESS_VERSION = "0.5.5"
ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "kvpress_child.py"
VENV_SCRIPT = ROOT / "scripts" / "kvpress_venv.sh"
RESULTS = ROOT / "docs" / "results" / "accuracy"

# name -> (kvpress class, fixed kwargs, kv_storage); method = "kvpress-<name>". compression_ratio is added
# per prompt for every press but duo (whose budget follows from its heads).
PRESSES: dict[str, tuple[str, dict, str]] = {
    "streaming": ("StreamingLLMPress", {"n_sink": 64}, "pruned"),
    "snapkv": ("SnapKVPress", {}, "pruned"),
    "expected-attention": ("ExpectedAttentionPress", {}, "pruned"),
    "knorm": ("KnormPress", {}, "pruned"),
    "duo": ("DuoAttentionPress", {}, "masked"),
}
ALL = ("full",) + tuple(PRESSES)
PREFILL = ("shared", "own")


def kvpress_venv_dir() -> Path:
    """Where scripts/kvpress_venv.sh puts the venv ($KVPRESS_VENV, else <razor-vllm cache>/kvpress-venv)."""
    env = os.environ.get("KVPRESS_VENV")
    if env:
        return Path(env)
    cache = os.environ.get("RAZOR_VLLM_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "razor-vllm") / "kvpress-venv"


def kvpress_python() -> Path:
    """The kvpress venv's python, built by scripts/kvpress_venv.sh if missing or stale (a no-op otherwise)."""
    out = subprocess.run(["bash", str(VENV_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def razor_policy(heads: str, induction_ratio: float | None = None):
    """razor's serving policy: the head config with SERVING_DEFAULTS (what `vllm serve
    --attention-backend razor` runs without overrides). With `induction_ratio`, the retrieval heads are
    re-selected from the config's scores at that ratio (the serving defaults otherwise), exactly as
    `razor-vllm eval --induction-ratio` builds that setting: the presses are then sized to it."""
    from razor_vllm.config import RazorPolicy, parse_razor_config
    from razor_vllm.eval.run import RazorSetting
    from razor_vllm.heads import load_head_config

    head_cfg = load_head_config(heads)
    if induction_ratio is not None:
        return RazorSetting(induction_ratio=induction_ratio).policy(head_cfg), head_cfg
    return RazorPolicy.from_config(parse_razor_config({"razor": {"head_config": heads}}), head_cfg), head_cfg


def press_plan(names: list[str], policy, seq_len: int, nominal: int, induction_ratio: float | None = None) -> list[dict]:
    """The runs of one prompt: name, method, label (stable over a run: the ratio at the nominal length),
    and the press spec the child builds (compression ratio from razor's budget at this prompt's length).
    `induction_ratio`: the re-selection behind `policy`'s heads, if any (named in duo's label, whose
    heads it changes; the scorer presses' labels already differ by their ratio)."""
    ratio = 1.0 - policy.kv_fraction(seq_len)
    ratio_label = 1.0 - policy.kv_fraction(nominal)
    runs = []
    for name in names:
        if name == "full":
            runs.append({"name": "full", "method": "full", "label": "full", "press": None})
            continue
        cls, kwargs, _ = PRESSES[name]
        if name == "duo":
            kwargs = dict(kwargs)
            heads = "razor-heads" if induction_ratio is None else f"razor-heads r{induction_ratio:g}"
            label = f"kvpress duo {heads} s{policy.sinks} w{policy.window}"
        else:
            kwargs = {"compression_ratio": round(ratio, 6), **kwargs}
            label = f"kvpress {name} c{ratio_label:.2f}"
        runs.append({"name": name, "method": f"kvpress-{name}", "label": label,
                     "press": {"class": cls, "kwargs": kwargs}})
    return runs


def _row(sample, key: str, ctx: list[int], question: list[int], run: dict, res: dict, policy, induction_ratio: float,
         peer: str) -> dict:
    from razor_vllm.eval import tasks as suite

    seq_len = len(ctx) + len(question)
    name, text = run["name"], res["output"]
    base = {"sample": key, "task": sample.task, "length": sample.length, "depth": sample.depth, "seed": sample.seed,
            "seq_len": seq_len, "protocol": PROTOCOL, "method": run["method"], "label": run["label"]}
    if name == "full":
        fields = {"setting": None, "sinks": None, "window": None, "compensation": None, "kv_fraction": 1.0,
                  "retrieval_fraction": 1.0, "press": None, "compression_ratio": 0.0, "kv_storage": None,
                  "frees_memory": None}
    else:
        ratio = res["compression_ratio"]
        sinks = window = None
        setting = None
        if name == "streaming":
            sinks = run["press"]["kwargs"]["n_sink"]
            window = res["cache_tokens"] - sinks
        elif name == "duo":
            sinks, window = policy.sinks, policy.window
            setting = {"induction_ratio": induction_ratio}
        fields = {"setting": setting, "sinks": sinks, "window": window, "compensation": None,
                  "kv_fraction": 1.0 - ratio,
                  "retrieval_fraction": {"streaming": 0.0, "duo": policy.retrieval_fraction}.get(name),
                  "press": run["press"], "compression_ratio": ratio, "kv_storage": PRESSES[name][2],
                  "frees_memory": False}
    return {**base, **fields, "razor_kv_fraction": policy.kv_fraction(seq_len), "context_tokens": len(ctx),
            "cache_tokens": res["cache_tokens"], "correct": suite.is_correct(sample, text),
            "score": suite.score(sample, text), "output": text, "seconds": res["seconds"], "peer": peer}


def default_out(model_dir: Path, length: int) -> Path:
    return RESULTS / f"{Path(model_dir).name}_{length}_kvpress.jsonl"


def run(model_dir: Path, heads: str, tasks: list[str], length: int, n: int, presses: list[str], out: Path,
        seed: int = 0, threads: int | None = None, python: Path | None = None, prefill: str = "shared",
        induction_ratio: float | None = None, log=None) -> list[dict]:
    """Run every missing (prompt, press) and append its rows to `out`; returns every row in `out`.
    `induction_ratio` sizes the presses to razor with the heads re-selected at that ratio (default: the
    head config's own selection)."""
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks as suite
    from razor_vllm.eval.run import load_rows, sequence_suite

    log = log or sys.stderr
    bad = set(presses) - set(ALL)
    if bad:
        raise ValueError(f"unknown presses {sorted(bad)}; choose from {', '.join(ALL)}")
    if prefill not in PREFILL:
        raise ValueError(f"prefill must be one of {PREFILL}")
    policy, head_cfg = razor_policy(heads, induction_ratio)
    ratio = head_cfg.profile.induction_ratio if induction_ratio is None else induction_ratio
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out)
    if rows:  # a torn last line is dropped for good, so the file stays valid JSONL
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    have = {(r["sample"], r["label"]) for r in rows}
    prompts, meta = [], {}
    for i, sample in sequence_suite(tasks, [length], n, seed, tok):
        key = f"{sample.task}/{sample.length}/{i}"
        ctx, question = suite.build_prompt_ids(sample, tok)
        runs = [r for r in press_plan(presses, policy, len(ctx) + len(question), length, induction_ratio)
                if (key, r["label"]) not in have]
        if not runs:
            continue
        meta[key] = (sample, ctx, question, {r["name"]: r for r in runs})
        prompts.append({"key": key, "context_ids": ctx, "question_ids": question,
                        "max_new_tokens": sample.max_new_tokens,
                        "runs": [{"name": r["name"], "press": r["press"]} for r in runs]})
    if not prompts:
        print(f"all rows present in {out}", file=log, flush=True)
        return rows
    job = {"model_dir": str(model_dir), "dtype": "float32", "threads": threads, "prefill": prefill, "prompts": prompts,
           "duo": {"sink_size": policy.sinks, "recent_size": policy.window,
                   "retrieval_heads": policy.retrieval_heads} if "duo" in presses else None}
    python = python or kvpress_python()
    with tempfile.TemporaryDirectory() as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        rows += _drive(python, job_file, meta, policy, ratio, out, prefill, log)
    return rows


def _drive(python: Path, job_file: Path, meta: dict, policy, induction_ratio: float, out: Path, prefill: str,
           log) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)  # the child imports only its own venv's packages
    proc = subprocess.Popen([str(python), str(CHILD), str(job_file)], stdout=subprocess.PIPE, text=True, env=env)
    new_rows: list[dict] = []
    pending: dict[str, list] = {}
    peer, t_start, t0, done = "", None, None, 0
    total = len(meta)
    try:
        for line in proc.stdout:
            tag, _, body = line.rstrip("\n").partition(" ")
            if tag == "KVPRESS_READY":
                info = json.loads(body)
                if info["kvpress"] != KVPRESS_VERSION:
                    raise RuntimeError(f"{python} has kvpress {info['kvpress']}, the rows are for {KVPRESS_VERSION}")
                peer = f"kvpress {info['kvpress']}, transformers {info['transformers']}, torch {info['torch']}"
                print(f"[kvpress] {peer}; {total} prompts to run", file=log, flush=True)
                t_start = t0 = time.perf_counter()
            elif tag == "KVPRESS_ROW":
                res = json.loads(body)
                pending.setdefault(res["key"], []).append(res)
            elif tag == "KVPRESS_DONE":
                key = json.loads(body)
                sample, ctx, question, runs = meta[key]
                prompt_rows = [_row(sample, key, ctx, question, runs[res["name"]], res, policy, induction_ratio, peer)
                               | {"prefill": prefill} for res in pending.pop(key, [])]
                with out.open("a") as f:  # one prompt at a time: the resume unit
                    for r in prompt_rows:
                        f.write(json.dumps(r) + "\n")
                new_rows += prompt_rows
                done += 1
                now = time.perf_counter()
                el = now - t_start
                eta = el / done * (total - done)
                print(f"[{done}/{total}] {key} {len(ctx) + len(question)} tok, {len(prompt_rows)} runs in "
                      f"{now - t0:.0f}s; elapsed {el / 60:.1f} min, ETA {eta / 60:.1f} min", file=log, flush=True)
                t0 = now
            elif line.strip():
                print(line.rstrip("\n"), file=log, flush=True)
    except BaseException:  # an interrupt or a row that fails to build: stop the child too
        proc.kill()
        proc.wait()
        raise
    rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"kvpress child exited with {rc} after {done} of {total} prompts (rows so far are in {out})")
    return new_rows


def table(rows: list[dict], model: str, length: int) -> str:
    """Accuracy, n, KV kept and the paired delta vs the kvpress `full` row (95 % bootstrap), per task
    and pooled: `razor_vllm.eval.run.summarize` (paired_bootstrap) on this protocol's rows."""
    from razor_vllm.eval.run import format_table, summarize

    mine = [r for r in rows if r["protocol"] == PROTOCOL and r["length"] == length]
    return format_table(summarize(mine, model), task=None)


def main(argv=None) -> int:
    from razor_vllm.paths import DEFAULT_MODEL, default_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="passkey,niah_single")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--n", type=int, default=100, help="prompts per task (prompt i is the HF harness's prompt i)")
    ap.add_argument("--presses", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
    ap.add_argument("--model-dir", type=Path, default=None, help="HF model dir (default: the default model's)")
    ap.add_argument("--heads", default=DEFAULT_MODEL, help="razor head config (shipped name or path)")
    ap.add_argument("--induction-ratio", type=float, default=None,
                    help="size the presses to razor with the retrieval heads re-selected at this ratio (e.g. "
                    "0.3, as `razor-vllm eval --induction-ratio`); default: the head config's selection")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="rows JSONL (default docs/results/accuracy/"
                    "<model>_<length>_kvpress.jsonl)")
    ap.add_argument("--prefill", choices=PREFILL, default="shared",
                    help="shared: one context prefill per prompt feeds every press's compress (default); own: "
                    "kvpress' pipeline._forward per press, one prefill each (the reference; same answers)")
    ap.add_argument("--kvpress-python", type=Path, default=None,
                    help="python of a kvpress 0.5.5 venv (default: build/reuse it with scripts/kvpress_venv.sh)")
    args = ap.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    out = args.out or default_out(model_dir, args.length)
    presses = [p for p in args.presses.split(",") if p]
    rows = run(model_dir, args.heads, [t for t in args.tasks.split(",") if t], args.length, args.n, presses, out,
               seed=args.seed, threads=args.threads, python=args.kvpress_python, prefill=args.prefill,
               induction_ratio=args.induction_ratio)
    print(table(rows, out.name.split("_")[0], args.length))
    print(f"rows: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
