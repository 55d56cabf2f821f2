#!/usr/bin/env python
"""Serving benchmark: stock vLLM CPU attention vs `--attention-backend razor`, side by side.

What it does (one run):

* starts one real `vllm serve` per backend (`stock`: the stock CPU backend; `razor`: kv_layout
  "paged", the shipped head config, window 256; optionally `razor-uniform`), all resident at once on
  their own ports, each with its own VLLM_CPU_KVCACHE_SPACE (sized for the grid, capped);
* drives them with concurrent *streaming* `/v1/completions` requests from an asyncio/aiohttp client
  (random token-id prompts of exactly `L` tokens, `ignore_eos`, `max_tokens` = output length,
  greedy): one wave of `c` requests per cell (`c` = batch/concurrency), the same prompts for every
  backend, the backends alternating cell by cell (A B, then B A, ...) so that drifting load on this
  shared machine hits both sides equally;
* per run it records throughput (output tok/s, total tok/s = (prompt + output) / wall), TTFT, TPOT
  (vllm bench serve's definitions: TPOT = (latency - TTFT) / (output - 1)), the steady decode rate
  (tokens/s while all `c` requests are decoding, when such a window exists), the CPU seconds the
  server's processes used (`/proc`, a load-robust measure) and `os.getloadavg()` before and after;
* prints a table per cell with razor/stock ratios (> 1 = razor better, for every metric), writes
  out/bench_serving.json and out/bench_serving.png (`--docs` also copies both to docs/results/).

Why its own client rather than `vllm bench serve` (which exists in vllm-cpu 0.32: `python -m
razor_vllm.vllm_cli bench serve --dataset-name random ...`): one process drives all servers and
alternates them within one run, no tokenizer round trip (token-id prompts of exact length), token
arrival times per request (for the steady-decode window) and the server CPU time. The metric
definitions are vLLM's.

    VLLM_TARGET_DEVICE=cpu .venv/bin/python scripts/bench_serving.py --quick
    VLLM_TARGET_DEVICE=cpu .venv/bin/python scripts/bench_serving.py            # full grid (hours on 2 cores)
    ... --input-lens 1024,8000 --concurrency 8 --backends stock,razor,razor-uniform --reps 2

dtype: float32 by default (this CPU has no AVX512-BF16; bf16 is emulated and slower than fp32).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache" / "razor-vllm" / "models" / "smollm2-135m-instruct"
SERVED_NAME = "smol"
BACKENDS = ("stock", "razor", "razor-uniform")
FULL_LENS, FULL_CONC = (1024, 4096, 8000), (1, 8, 32)
QUICK_LENS, QUICK_CONC = (1024, 4096), (1, 8)
STOCK_BLOCK = 128  # vLLM's CPU default block size


# --------------------------------------------------------------------------------------------------
# machine and model facts
# --------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["mem_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads_client"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import importlib.metadata as md

        info["vllm"] = md.version("vllm-cpu")
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        info["git"] = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


def model_facts(model: Path, head_config: str, window: int, sinks: int, dtype_bytes: int,
                max_model_len: int) -> dict:
    """Shapes, parameter count and the razor head split (for the physical-limit formulas)."""
    cfg = json.loads((model / "config.json").read_text())
    layers, kv, q = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["num_attention_heads"]
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or hidden // q
    per_layer = hidden * q * hd + 2 * hidden * kv * hd + q * hd * hidden + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden
    lm_head = 0 if cfg.get("tie_word_embeddings") else vocab * hidden
    params = layers * per_layer + embed + lm_head + hidden
    # Weights streamed per decode step: everything but the embedding table (a row lookup), plus the
    # LM head (which is the embedding matrix when tied).
    step_weight_params = layers * per_layer + vocab * hidden + hidden
    from razor_vllm.head_config import load_head_config

    hc = load_head_config(head_config)  # a path or the name of a shipped config
    n_r = hc.num_retrieval
    facts = dict(layers=layers, kv_heads=kv, q_heads=q, head_dim=hd, hidden=hidden, vocab=vocab,
                 params=params, step_weight_params=step_weight_params, dtype_bytes=dtype_bytes,
                 retrieval_heads=n_r, local_heads=layers * kv - n_r, sinks=sinks, window=window,
                 head_config=head_config, max_model_len=max_model_len)
    return facts


def kv_bytes_per_token_stock(f: dict) -> int:
    return f["layers"] * f["kv_heads"] * 2 * f["head_dim"] * f["dtype_bytes"]


def decode_limits(f: dict, ctx: int, batch: int) -> dict:
    """Bytes and FLOPs of one decode step at context `ctx` for `batch` sequences (the physical
    limit the measurement is compared with)."""
    tok = 2 * f["head_dim"] * f["dtype_bytes"]  # K+V bytes of one token of one KV head
    stock_kv = f["layers"] * f["kv_heads"] * tok * ctx
    local_keep = min(ctx, f["sinks"] + f["window"] + 1)
    razor_kv = tok * (f["retrieval_heads"] * ctx + f["local_heads"] * local_keep)
    weights = f["step_weight_params"] * f["dtype_bytes"]
    g = f["q_heads"] // f["kv_heads"]
    attn_flops_stock = 4 * f["head_dim"] * g * f["layers"] * f["kv_heads"] * ctx
    attn_flops_razor = 4 * f["head_dim"] * g * (f["retrieval_heads"] * ctx + f["local_heads"] * (local_keep + 1))
    gemm_flops = 2 * f["step_weight_params"]
    return {
        "ctx": ctx, "batch": batch, "weights_bytes": weights,
        "kv_bytes_per_seq": {"stock": stock_kv, "razor": razor_kv},
        "bytes_per_step": {"stock": weights + batch * stock_kv, "razor": weights + batch * razor_kv},
        "flops_per_token": {"stock": gemm_flops + attn_flops_stock, "razor": gemm_flops + attn_flops_razor},
        "bound_speedup_bytes": (weights + batch * stock_kv) / (weights + batch * razor_kv),
        "bound_speedup_flops": (gemm_flops + attn_flops_stock) / (gemm_flops + attn_flops_razor),
        "kv_share_of_bytes_stock": batch * stock_kv / (weights + batch * stock_kv),
    }


def razor_paged_bytes_per_request(f: dict, tokens: int, dtype) -> int:
    """vLLM's accounting of one razor kv_layout="paged" request (the planner's figure)."""
    from razor_vllm import kv_layout as kvl
    from razor_vllm.head_config import load_head_config

    hc = load_head_config(f["head_config"])
    params = kvl.KVLayoutParams(retrieval_heads=tuple(tuple(r) for r in hc.retrieval_heads),
                                num_kv_heads=f["kv_heads"], head_size=f["head_dim"], dtype=dtype,
                                sinks=f["sinks"], window=f["window"], max_model_len=f["max_model_len"],
                                num_queries_per_kv=f["q_heads"] // f["kv_heads"])
    return kvl.plan_kv_layout(params).bytes_per_request(tokens)


# --------------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------------
@dataclass
class Server:
    backend: str
    """Display name (the part before '=' of a variant)."""
    spec: str
    """As given on the command line (NAME=BASE@SRC for a variant)."""
    port: int
    kv_space_gib: int
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    startup_s: float | None = None
    log_facts: dict = field(default_factory=dict)
    imports: dict | None = None
    """Variants: the files their razor_vllm modules are imported from (checked before start)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, env: dict) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(env, VLLM_CPU_KVCACHE_SPACE=str(self.kv_space_gib))
        _, src = split_backend(self.spec)
        cwd = REPO
        if src:
            # A variant: `python -m` puts the working directory first on sys.path (before
            # PYTHONPATH), so the server runs from SRC, whose razor_vllm then shadows the editable
            # install; PYTHONPATH carries it into vLLM's spawned processes.
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
            cwd = Path(src)
            self.imports = variant_imports(src, env)
        self._t0 = time.time()
        # Own session (process group): stop() signals exactly this server's processes.
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=open(self.log_path, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)

    def wait_ready(self, timeout: float) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.backend} server exited (rc={self.proc.returncode}); "
                                   f"log tail:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.startup_s = round(time.time() - self._t0, 1)
                        self.log_facts = parse_server_log(self.log_path)
                        return
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"{self.backend} server not ready after {timeout:.0f} s; log tail:\n"
                           f"{tail(self.log_path)}")

    def cpu_seconds(self) -> float:
        """utime + stime of every live process of this server's session (API server, engine core,
        worker): the CPU the server spent, whatever the machine's load."""
        if self.proc is None:
            return 0.0
        sid, total, tck = self.proc.pid, 0.0, os.sysconf("SC_CLK_TCK")
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields_ = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields_[3]) == sid:  # field 6 (session id) after pid and (comm)
                total += (int(fields_[11]) + int(fields_[12])) / tck
        return total

    def info(self) -> dict:
        """What the results record of this server (checkpoint and final JSON alike)."""
        return {"backend": self.backend, "spec": self.spec, "imports": self.imports, "port": self.port,
                "kv_space_gib": self.kv_space_gib, "cmd": self.cmd, "startup_s": self.startup_s, **self.log_facts}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def variant_imports(src: str, env: dict) -> dict:
    """Where a variant's server will import razor_vllm from (same cwd and environment); refuses a
    variant that would silently run the working tree."""
    code = ("import json, razor_vllm.backend as b, razor_vllm.kernels.ring_ops as r; "
            "print(json.dumps({'backend': b.__file__, 'ring_ops': r.__file__}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True,
                         timeout=300)
    try:
        files = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"variant {src}: cannot import razor_vllm there:\n{res.stderr[-2000:]}") from None
    root = str(Path(src).resolve())
    if not all(str(Path(f).resolve()).startswith(root) or str(Path(f)).startswith(src) for f in files.values()):
        raise RuntimeError(f"variant {src} would import {files}, not its own sources")
    return files


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def parse_server_log(path: Path) -> dict:
    import re

    text = path.read_text(errors="replace")
    out = {}
    if m := re.search(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                      r"request: ([\d.]+)x", text):
        out.update(kv_cache_tokens=int(m.group(1).replace(",", "")), max_concurrency=float(m.group(3)))
    if m := re.search(r"max_num_batched_tokens=(\d+)", text):
        out["max_num_batched_tokens"] = int(m.group(1))
    if m := re.search(r"(razor KV layout: .*)", text):
        out["layout"] = m.group(1).strip()
    if m := re.search(r"Reducing Torch threads from (\d+) to (\d+)", text):
        out["torch_threads"] = int(m.group(2))
    return out


def split_backend(name: str) -> tuple[str, str | None]:
    """"NAME=BASE@SRC" (a variant: BASE's settings, razor_vllm imported from source tree SRC, e.g. an
    older snapshot for before/after comparisons in one run) -> (BASE, SRC); plain names -> (name, None)."""
    if "=" not in name:
        return name, None
    base_src = name.split("=", 1)[1]
    base, _, src = base_src.partition("@")
    return base, (src or None)


def server_cmd(args, backend: str, port: int) -> list[str]:
    backend, _ = split_backend(backend)
    cmd = [sys.executable, "-m", "razor_vllm.vllm_cli", "serve", str(args.model), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", args.dtype,
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(max(args.concurrency)),
           "--no-enable-prefix-caching", "--disable-uvicorn-access-log"]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if backend != "stock":
        razor = {"head_config": args.head_config, "window": args.window, "sinks": args.sinks,
                 "compensation": args.compensation,
                 "kv_layout": "uniform" if backend == "razor-uniform" else "paged"}
        cmd += ["--attention-backend", "razor", "--additional-config", json.dumps({"razor": razor})]
    return cmd + list(args.server_arg)


def auto_kv_space(args, facts: dict, backend: str) -> float:
    """GiB that hold max(concurrency) requests of max(input) + output tokens, capped by --kv-cap."""
    import torch

    tokens = max(args.input_lens) + args.output_len
    c = max(args.concurrency)
    if backend == "razor":
        need = c * razor_paged_bytes_per_request(facts, tokens, getattr(torch, args.dtype))
    else:
        need = c * math.ceil(tokens / STOCK_BLOCK) * STOCK_BLOCK * kv_bytes_per_token_stock(facts)
    gib = math.ceil(need * 1.05 / 2**30 + 0.1)  # vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer
    return int(min(max(gib, 1), args.kv_cap))


# --------------------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------------------
async def one_request(session, url: str, prompt: list[int], output_len: int) -> dict:
    import aiohttp

    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    rec = {"t_send": time.perf_counter(), "arrivals": [], "usage": None, "error": None}
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            buf = b""
            async for raw in resp.content:
                buf += raw
                if not buf.endswith(b"\n"):
                    continue
                line, buf = buf.strip(), b""
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                now = time.perf_counter()
                for ch in msg.get("choices") or ():
                    ids = ch.get("token_ids")
                    n = len(ids) if ids is not None else (1 if ch.get("text") is not None else 0)
                    if n:
                        rec["arrivals"].append((now, n))
                if msg.get("usage"):
                    rec["usage"] = msg["usage"]
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        rec["error"] = repr(e)
    rec["t_end"] = time.perf_counter()
    return rec


async def run_wave(url: str, prompts: list[list[int]], output_len: int, concurrency: int) -> list[dict]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        async def guarded(p):
            async with sem:
                return await one_request(s, url, p, output_len)

        return await asyncio.gather(*(guarded(p) for p in prompts))


def summarize(recs: list[dict], output_len: int) -> dict:
    ok = [r for r in recs if not r["error"] and r["arrivals"]]
    errors = [r["error"] for r in recs if r["error"]]
    t0 = min(r["t_send"] for r in recs)
    t1 = max(r.get("t_end", r["t_send"]) for r in recs)
    dur = t1 - t0
    n_out = sum((r["usage"] or {}).get("completion_tokens", sum(n for _, n in r["arrivals"])) for r in ok)
    n_in = sum((r["usage"] or {}).get("prompt_tokens", 0) for r in ok)
    ttft = [r["arrivals"][0][0] - r["t_send"] for r in ok]
    tpot, itl = [], []
    for r in ok:
        toks = sum(n for _, n in r["arrivals"])
        if toks > 1:
            tpot.append((r["arrivals"][-1][0] - r["arrivals"][0][0]) / (toks - 1))
        prev = r["arrivals"][0][0]
        for t, n in r["arrivals"][1:]:
            itl += [(t - prev) / n] * n
            prev = t
    # Steady decode: from the moment every request has its first token to the first request's last
    # token, all of them are decoding (no prefill in the batch): tokens arriving in that window / its
    # length is the batch's pure decode rate at this context.
    a = max(r["arrivals"][0][0] for r in ok) if ok else 0.0
    b = min(r["arrivals"][-1][0] for r in ok) if ok else 0.0
    steady = None
    if ok and b - a > 0:
        n = sum(k for r in ok for t, k in r["arrivals"] if a < t <= b)
        if n >= 8 * len(ok):  # at least 8 tokens per request: a meaningful window
            steady = {"tok_s": n / (b - a), "window_s": b - a, "tokens": n}

    def pct(xs, q):
        if not xs:
            return None
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]

    return {
        "completed": len(ok), "errors": errors[:5], "num_errors": len(errors), "duration_s": dur,
        "input_tokens": n_in, "output_tokens": n_out,
        "output_tok_s": n_out / dur if dur > 0 else None,
        "total_tok_s": (n_in + n_out) / dur if dur > 0 else None,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "ttft_median_s": pct(ttft, 0.5), "ttft_p90_s": pct(ttft, 0.9),
        "tpot_mean_ms": 1e3 * statistics.fmean(tpot) if tpot else None,
        "tpot_median_ms": 1e3 * pct(tpot, 0.5) if tpot else None,
        "itl_median_ms": 1e3 * pct(itl, 0.5) if itl else None,
        "steady_decode_tok_s": steady["tok_s"] if steady else None,
        "steady_decode_window_s": steady["window_s"] if steady else None,
        "short_outputs": sum(1 for r in ok if (r["usage"] or {}).get("completion_tokens", output_len) != output_len),
    }


def make_prompts(seed: int, length: int, count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    hi = min(vocab, 40000)
    return [[rng.randrange(1000, hi) for _ in range(length)] for _ in range(count)]


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
# metric -> (label, higher is better)
METRICS = {
    "output_tok_s": ("out tok/s", True),
    "total_tok_s": ("total tok/s", True),
    "ttft_mean_s": ("TTFT s", False),
    "tpot_mean_ms": ("TPOT ms", False),
    "steady_decode_tok_s": ("decode tok/s", True),
    "out_tok_per_cpu_s": ("out tok/CPU-s", True),
}


def ratio(metric: str, razor: float | None, stock: float | None) -> float | None:
    """razor vs stock with > 1 meaning razor is better (throughputs: razor / stock; latencies:
    stock / razor)."""
    if not razor or not stock:
        return None
    return razor / stock if METRICS[metric][1] else stock / razor


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def build_cells(runs: list[dict], backends: list[str]) -> list[dict]:
    cells = {}
    for r in runs:
        cells.setdefault((r["input_len"], r["concurrency"]), []).append(r)
    out = []
    for (length, conc), rs in sorted(cells.items()):
        cell = {"input_len": length, "concurrency": conc, "backends": {}, "ratios": {}}
        for b in backends:
            mine = [r for r in rs if r["backend"] == b]
            if not mine:
                continue
            cell["backends"][b] = {m: statistics.median([r[m] for r in mine if r.get(m) is not None])
                                   if any(r.get(m) is not None for r in mine) else None for m in METRICS}
            cell["backends"][b]["loadavg_1m"] = [r["loadavg_before"][0] for r in mine]
        for b in backends:
            if b == "stock" or b not in cell["backends"] or "stock" not in cell["backends"]:
                continue
            # Per repetition (razor run and the stock run next to it), then the geometric mean.
            per_rep = {}
            for m in METRICS:
                vals = []
                # A repetition is (source run, rep): only runs measured side by side are paired.
                for key in {(r.get("source"), r["rep"]) for r in rs}:
                    rr = [r for r in rs if (r.get("source"), r["rep"]) == key and r["backend"] == b]
                    ss = [r for r in rs if (r.get("source"), r["rep"]) == key and r["backend"] == "stock"]
                    if rr and ss:
                        vals.append(ratio(m, rr[0].get(m), ss[0].get(m)))
                per_rep[m] = geomean(vals)
            cell["ratios"][b] = per_rep
        out.append(cell)
    return out


def load_run(path: Path) -> dict:
    """One measured run, from its checkpoint (OUT.partial.json) or its finished OUT.json, in the
    checkpoint's shape."""
    d = json.loads(Path(path).read_text())
    if "config" in d:  # a finished run
        d = {"backends": d["config"]["backends"], "specs": d["config"]["backend_specs"], "servers": d["servers"],
             "runs": d["runs"], "machine": d["machine"], "model": d["model"], "timing": d["timing"]}
    else:  # a checkpoint: the run was interrupted (or is still going)
        d["timing"] = {**d["timing"], "interrupted": True}
    return d


def server_identity(srv: dict) -> tuple:
    """What makes two servers' numbers comparable: backend spec, command line without the port (and
    the interpreter path), KV space."""
    cmd = list(srv["cmd"])[1:]
    if "--port" in cmd:
        i = cmd.index("--port")
        del cmd[i:i + 2]
    return srv["backend"], srv["spec"], tuple(cmd), srv["kv_space_gib"]


def merge_runs(parts: list[dict], names: list) -> dict:
    """Several runs of the same servers as one grid (e.g. the cells an earlier run could not fit,
    measured in a later run). Each run record keeps its `source` (the file), so ratios pair only runs
    taken side by side in the same run. A later file's runs replace an earlier file's runs of the same
    cell (input_len, concurrency). Refuses runs of servers started differently: their cells would not
    be comparable."""
    first = parts[0]
    for name, part in zip(names[1:], parts[1:]):
        if part["backends"] != first["backends"]:
            raise SystemExit(f"--render: {name} measured backends {part['backends']}, {names[0]} {first['backends']}")
        a = sorted(server_identity(s) for s in first["servers"])
        b = sorted(server_identity(s) for s in part["servers"])
        if a != b:
            raise SystemExit(f"--render: {name} ran servers started differently from {names[0]}'s "
                             f"(backend, spec, command line, KV GiB):\n  {b}\nvs\n  {a}")
    runs: dict[tuple, list] = {}
    sources = []
    for name, part in zip(names, parts):
        tagged = [{**r, "source": str(name)} for r in part["runs"]]
        for cell in {(r["input_len"], r["concurrency"]) for r in tagged}:
            runs[cell] = [r for r in tagged if (r["input_len"], r["concurrency"]) == cell]
        sources.append({"file": str(name), "git": part["machine"].get("git"), "timing": part["timing"],
                        "cells": sorted({(r["input_len"], r["concurrency"]) for r in tagged})})
    merged = sorted((r for rs in runs.values() for r in rs), key=lambda r: r["wall_clock"])
    timing = {"total_s": sum(s["timing"].get("total_s", 0) for s in sources),
              "startup_s": sum(s["timing"].get("startup_s", 0) for s in sources),
              "grid_s": sum(s["timing"].get("grid_s", 0) for s in sources), "sources": sources}
    return {**first, "runs": merged, "timing": timing}


def fmt(x, nd=2):
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def print_table(cells: list[dict], backends: list[str]) -> str:
    lines = []
    head = f"{'L':>5} {'c':>3} {'backend':<14}" + "".join(f"{METRICS[m][0]:>14}" for m in METRICS) + f"{'load1':>7}"
    lines.append(head)
    lines.append("-" * len(head))
    for cell in cells:
        for b in backends:
            v = cell["backends"].get(b)
            if v is None:
                continue
            lines.append(f"{cell['input_len']:>5} {cell['concurrency']:>3} {b:<14}"
                         + "".join(f"{fmt(v[m]):>14}" for m in METRICS)
                         + f"{fmt(statistics.fmean(v['loadavg_1m']), 1):>7}")
        for b, rat in cell["ratios"].items():
            lines.append(f"{'':>5} {'':>3} {b + '/stock':<14}"
                         + "".join(f"{(fmt(rat[m]) + 'x') if rat[m] else '-':>14}" for m in METRICS))
    text = "\n".join(lines)
    print(text)
    print("ratios: > 1 means razor is better (throughputs razor/stock, latencies stock/razor)")
    return text


def markdown(result: dict) -> str:
    """The per-cell table of docs/performance.md: every backend's metrics, the ratios against
    stock, the load average, and the physical limits of a decode step (bytes and FLOPs)."""
    backends, cells = result["config"]["backends"], result["cells"]
    out = ["| prompt | c | backend | out tok/s | total tok/s | TTFT s | TPOT ms | steady decode tok/s "
           "| out tok/CPU-s | load 1m |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        for b in backends:
            v = c["backends"].get(b)
            if v is None:
                continue
            cap = " (KV-limited)" if v.get("kv_capacity_limited") else ""
            out.append(f"| {c['input_len']} | {c['concurrency']} | {b}{cap} | {fmt(v['output_tok_s'])} | "
                       f"{fmt(v['total_tok_s'])} | {fmt(v['ttft_mean_s'])} | {fmt(v['tpot_mean_ms'])} | "
                       f"{fmt(v['steady_decode_tok_s'])} | {fmt(v['out_tok_per_cpu_s'])} | "
                       f"{', '.join(f'{x:.1f}' for x in v['loadavg_1m'])} |")
        for b, rat in c["ratios"].items():
            out.append(f"| | | **{b}/stock** | **{fmt(rat['output_tok_s'])}x** | {fmt(rat['total_tok_s'])}x | "
                       f"{fmt(rat['ttft_mean_s'])}x | **{fmt(rat['tpot_mean_ms'])}x** | "
                       f"{fmt(rat['steady_decode_tok_s'])}x | {fmt(rat['out_tok_per_cpu_s'])}x | |")
    sources = result.get("timing", {}).get("sources") or []
    if len(sources) > 1:  # a grid merged from several runs (--render A B ...): say which cell is from which
        out += ["", "Merged from several runs (a later run's cells replace an earlier run's):", ""]
        for src in sources:
            kept = sorted({(c["input_len"], c["concurrency"]) for c in cells
                           for r in result["runs"] if r.get("source") == src["file"]
                           and (r["input_len"], r["concurrency"]) == (c["input_len"], c["concurrency"])})
            out.append(f"* `{Path(src['file']).name}` (git {src.get('git')}"
                       + (", interrupted" if src["timing"].get("interrupted") else "") + "): "
                       + (", ".join(f"{length} x {conc}" for length, conc in kept) or "no cell kept"))
    out += ["", "Physical limits of one decode step at context T = prompt + 64 (mid-generation), batch c "
            "(weights streamed once per step; `razor` KV = retrieval heads x T + local heads x (S + W + 1)):", "",
            "| prompt | c | weights MB | KV MB stock | KV MB razor | bytes bound razor/stock | FLOPs/token stock "
            "| FLOPs/token razor | KV share of stock bytes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        lim = c["limits"]
        out.append(f"| {c['input_len']} | {c['concurrency']} | {lim['weights_bytes'] / 1e6:,.0f} | "
                   f"{lim['batch'] * lim['kv_bytes_per_seq']['stock'] / 1e6:,.0f} | "
                   f"{lim['batch'] * lim['kv_bytes_per_seq']['razor'] / 1e6:,.0f} | "
                   f"{lim['bound_speedup_bytes']:.2f}x | {lim['flops_per_token']['stock'] / 1e6:,.0f} M | "
                   f"{lim['flops_per_token']['razor'] / 1e6:,.0f} M | {100 * lim['kv_share_of_bytes_stock']:.0f} % |")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cells, backends = result["cells"], result["config"]["backends"]
    labels = [f"{c['input_len']}\nc={c['concurrency']}" for c in cells]
    colors = {"stock": "#7f7f7f", "razor": "#c0392b", "razor-uniform": "#e67e22"}
    panels = [("output_tok_s", "output tok/s (higher is better)"), ("tpot_mean_ms", "TPOT ms (lower is better)"),
              ("ttft_mean_s", "TTFT s (lower is better)")]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    width = 0.8 / len(backends)
    for ax, (m, title) in zip(axes, panels):
        for i, b in enumerate(backends):
            ys = [(c["backends"].get(b) or {}).get(m) or 0 for c in cells]
            ax.bar([k + (i - (len(backends) - 1) / 2) * width for k in range(len(cells))], ys, width,
                   label=b, color=colors.get(b, "#8e44ad"))
        ax.set_xticks(range(len(cells)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    ax = axes[3]
    ratio_metrics = [("output_tok_s", "o"), ("tpot_mean_ms", "s"), ("steady_decode_tok_s", "^")]
    for b in backends:
        if b == "stock":
            continue
        for m, marker in ratio_metrics:
            ys = [(c["ratios"].get(b) or {}).get(m) for c in cells]
            ax.plot(range(len(cells)), [y if y else float("nan") for y in ys], marker=marker,
                    linestyle="-" if b == "razor" else "--", color=colors.get(b, "#8e44ad"),
                    label=f"{b}: {METRICS[m][0]}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.95, color="#2980b9", lw=0.8, ls=":", label="target 0.95x (1k)")
    ax.axhline(1.5, color="#27ae60", lw=0.8, ls=":", label="target 1.5x (8k, c=8)")
    ax.set_xticks(range(len(cells)), labels, fontsize=8)
    ax.set_title("razor vs stock (>1 = razor better)", fontsize=10)
    ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"SmolLM2-135M {result['config']['dtype']}, vllm serve on {m.get('cpus')} CPU cores "
                 f"({m.get('cpu_model', '?')}), 128 output tokens, one wave of c requests per cell; "
                 f"W={result['config']['window']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def parse_ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--backends", default="stock,razor",
                    help=f"comma list of {BACKENDS}, stock first (default stock,razor). NAME=BASE@SRC adds a "
                         "variant: BASE's settings with razor_vllm imported from the source tree SRC "
                         "(before/after comparisons in one alternating run)")
    ap.add_argument("--input-lens", type=parse_ints, default=None, help="default 1024,4096,8000")
    ap.add_argument("--concurrency", type=parse_ints, default=None, help="default 1,8,32")
    ap.add_argument("--skip", default="", metavar="L:C,...",
                    help="cells of the grid not to run, e.g. 8000:32 (the stock 8k x 32 cell alone is ~1 h on 2 cores)")
    ap.add_argument("--quick", action="store_true", help=f"input lens {QUICK_LENS}, concurrency {QUICK_CONC}")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--waves", type=int, default=1, help="requests per cell = waves x concurrency")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of the whole grid (alternating order)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--head-config", default="smollm2-135m-instruct")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--compensation", default="single")
    ap.add_argument("--kv-space", action="append", default=[], metavar="BACKEND=GIB",
                    help="VLLM_CPU_KVCACHE_SPACE per backend (default: sized for the grid, capped)")
    ap.add_argument("--kv-cap", type=int, default=6, help="cap of the automatic KV space per server (GiB)")
    ap.add_argument("--enforce-eager", action="store_true", help="pass --enforce-eager to vllm serve")
    ap.add_argument("--server-arg", action="append", default=[], help="extra vllm serve argument (repeat)")
    ap.add_argument("--base-port", type=int, default=8410)
    ap.add_argument("--ready-timeout", type=float, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_serving.json")
    ap.add_argument("--docs", action="store_true", help="also copy JSON and PNG to docs/results/")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--render", type=Path, nargs="+", metavar="RUN_JSON",
                    help="no measurement: build table/JSON/plot from measured runs: the checkpoint of an "
                         "interrupted run (OUT.partial.json) or a finished run's OUT.json. Several files are "
                         "merged into one grid (same servers required; a later file's cells replace an "
                         "earlier file's); give the grid options of those runs")
    args = ap.parse_args()
    args.input_lens = args.input_lens or (QUICK_LENS if args.quick else FULL_LENS)
    args.concurrency = args.concurrency or (QUICK_CONC if args.quick else FULL_CONC)
    try:
        args.skip_cells = sorted({tuple(int(x) for x in cell.split(":")) for cell in args.skip.split(",") if cell})
    except ValueError:
        ap.error(f"--skip {args.skip!r}: expected INPUT_LEN:CONCURRENCY pairs, e.g. 8000:32,4096:32")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if any(split_backend(b)[0] not in BACKENDS for b in backends) or backends[0] != "stock":
        ap.error(f"--backends: names from {BACKENDS} (or NAME=BASE@SRC variants), starting with stock")
    if max(args.input_lens) + args.output_len > args.max_model_len:
        ap.error(f"input {max(args.input_lens)} + output {args.output_len} > --max-model-len {args.max_model_len}")

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if args.render:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        part = merge_runs([load_run(f) for f in args.render], args.render)
        finish(args, part["backends"], part["specs"], part["servers"], part["runs"], part["machine"],
               part["model"], part["timing"])
        return
    import torch

    dtype_bytes = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    facts = model_facts(args.model, args.head_config, args.window, args.sinks, dtype_bytes, args.max_model_len)
    kv_override = dict(kv.split("=", 1) for kv in args.kv_space)
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    servers = []
    specs, backends = backends, [b.split("=", 1)[0] for b in backends]
    for i, (b, spec) in enumerate(zip(backends, specs)):
        gib = int(kv_override[b]) if b in kv_override else auto_kv_space(args, facts, split_backend(spec)[0])
        servers.append(Server(b, spec, args.base_port + i, gib, server_cmd(args, spec, args.base_port + i),
                              out_dir / "bench_serving_logs" / f"{b}.log"))
    machine = machine_info()
    print(f"machine: {machine.get('cpus')} cores, {machine.get('cpu_model')}, ISA {machine.get('isa')}, "
          f"{machine.get('mem_gib')} GiB; loadavg {os.getloadavg()}")
    print(f"model: {args.model.name} {args.dtype}, {facts['params'] / 1e6:.1f} M params; head config "
          f"{args.head_config}: {facts['retrieval_heads']}/{facts['retrieval_heads'] + facts['local_heads']} "
          f"retrieval KV heads; W={args.window} S={args.sinks}")
    print(f"grid: input {args.input_lens} x concurrency {args.concurrency}, output {args.output_len}, "
          f"{args.waves} wave(s), {args.reps} rep(s), backends {backends}"
          + (f", skipping {args.skip_cells}" if args.skip_cells else ""))

    t_start = time.time()
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    runs = []
    try:
        for s in servers:  # one at a time: two compile warm-ups at once would only slow each other
            print(f"starting {s.backend} on :{s.port} (VLLM_CPU_KVCACHE_SPACE={s.kv_space_gib} GiB) ...", flush=True)
            s.start(env)
            s.wait_ready(args.ready_timeout)
            print(f"  ready in {s.startup_s} s: {s.log_facts}", flush=True)
            # warm-up request (first-request overheads, allocator), not measured
            asyncio.run(run_wave(s.url, make_prompts(999, 64, 1, facts["vocab"]), 8, 1))
        t_ready = time.time()
        k = 0
        for rep in range(args.reps):
            for length in args.input_lens:
                for conc in args.concurrency:
                    if (length, conc) in args.skip_cells:
                        continue
                    n = args.waves * conc
                    prompts = make_prompts(hash((args.seed, rep, length, conc)) & 0xFFFFFFFF, length, n,
                                           facts["vocab"])
                    order = servers if k % 2 == 0 else servers[::-1]
                    k += 1
                    for s in order:
                        load0, cpu0 = os.getloadavg(), s.cpu_seconds()
                        recs = asyncio.run(run_wave(s.url, prompts, args.output_len, conc))
                        load1, cpu1 = os.getloadavg(), s.cpu_seconds()
                        summ = summarize(recs, args.output_len)
                        summ.update(backend=s.backend, input_len=length, concurrency=conc, rep=rep,
                                    num_prompts=n, loadavg_before=load0, loadavg_after=load1,
                                    server_cpu_s=cpu1 - cpu0, wall_clock=time.time())
                        summ["out_tok_per_cpu_s"] = (summ["output_tokens"] / summ["server_cpu_s"]
                                                     if summ["server_cpu_s"] > 0 else None)
                        runs.append(summ)
                        print(f"[{time.time() - t_start:7.0f}s] L={length:<5} c={conc:<3} {s.backend:<14} "
                              f"out {fmt(summ['output_tok_s'])} tok/s, total {fmt(summ['total_tok_s'])} tok/s, "
                              f"TTFT {fmt(summ['ttft_mean_s'])} s, TPOT {fmt(summ['tpot_mean_ms'])} ms, "
                              f"decode {fmt(summ['steady_decode_tok_s'])} tok/s, cpu {summ['server_cpu_s']:.0f} s, "
                              f"load {load0[0]:.1f}->{load1[0]:.1f}"
                              + (f", {summ['num_errors']} ERRORS: {summ['errors'][:1]}" if summ["num_errors"] else ""),
                              flush=True)
                        if summ["num_errors"]:
                            print(tail(s.log_path, 20))
                        # checkpoint: a long grid interrupted keeps what it measured
                        args.out.with_suffix(".partial.json").write_text(json.dumps(
                            {"machine": machine, "model": facts, "runs": runs, "backends": backends,
                             "specs": specs, "timing": {"startup_s": t_ready - t_start,
                                                        "grid_s": time.time() - t_ready,
                                                        "total_s": time.time() - t_start},
                             "servers": [x.info() for x in servers]},
                            indent=1, default=str))
    finally:
        for s in servers:
            s.stop()
    t_end = time.time()
    servers_info = [s.info() for s in servers]
    timing = {"total_s": t_end - t_start, "startup_s": t_ready - t_start, "grid_s": t_end - t_ready}
    finish(args, backends, specs, servers_info, runs, machine, facts, timing)


def finish(args, backends, specs, servers_info, runs, machine, facts, timing) -> dict:
    """Cells, ratios, limits, table, JSON (+ .md, .png, docs copies) from the measured runs."""
    cells = build_cells(runs, backends)
    for c in cells:
        c["limits"] = decode_limits(facts, c["input_len"] + args.output_len // 2, c["concurrency"])
        for b in backends:
            srv = next((s for s in servers_info if s["backend"] == b), {})
            cap = srv.get("kv_cache_tokens")
            need = c["concurrency"] * (c["input_len"] + args.output_len)
            if cap and b in c["backends"]:
                c["backends"][b]["kv_capacity_limited"] = need > cap
    print()
    table = print_table(cells, backends)
    result = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "backends": backends, "backend_specs": specs},
        "machine": machine, "model": facts, "servers": servers_info, "timing": timing,
        "cells": cells, "runs": runs, "table": table,
    }
    result["markdown"] = markdown(result)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    args.out.with_suffix(".md").write_text(result["markdown"] + "\n")
    print(f"\nwall: {timing.get('total_s', 0):.0f} s (servers {timing.get('startup_s', 0):.0f} s, grid "
          f"{timing.get('grid_s', 0):.0f} s); wrote {args.out}")
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        plot(result, png)
        print(f"wrote {png}")
    if args.docs:
        dst = REPO / "docs" / "results"
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.out, dst / args.out.name)
        shutil.copy(args.out.with_suffix(".md"), dst / args.out.with_suffix(".md").name)
        if not args.no_plot:
            shutil.copy(args.out.with_suffix(".png"), dst / args.out.with_suffix(".png").name)
        print(f"copied to {dst}")
    return result

if __name__ == "__main__":
    main()
