"""`python -m benchmarks.serving`: argument parsing and the run itself. It starts one `vllm serve` per
backend (`stock`: the stock CPU backend; `razor`: kv_layout "paged", the shipped head config,
window 256; optionally `razor-uniform`), all resident at once on their own ports, each with its own
VLLM_CPU_KVCACHE_SPACE (sized for the grid, capped); sends one wave of `c` requests per cell
(`c` = batch/concurrency), the same prompts for every backend, the backends alternating cell by cell
(A B, then B A, ...) so that drifting load on this shared machine hits both sides equally; records
per run the throughput (output tok/s, total tok/s = (prompt + output) / wall), TTFT, TPOT
(vllm bench serve's definitions: TPOT = (latency - TTFT) / (output - 1)), the steady decode rate
(tokens/s while all `c` requests are decoding, when such a window exists), the CPU seconds the
server's processes used (`/proc`, a load-robust measure) and `os.getloadavg()` before and after,
checkpointing after every run; then prints a table per cell with razor/stock ratios (> 1 = razor
better, for every metric) and writes out/bench_serving.json, .md and .png (`--docs` also copies them
to docs/results/). `--render` rebuilds those outputs from measured runs without measuring. dtype:
float32 by default (this CPU has no AVX512-BF16; bf16 is emulated and slower than fp32).

    VLLM_TARGET_DEVICE=cpu .venv/bin/python -m benchmarks.serving --quick
    VLLM_TARGET_DEVICE=cpu .venv/bin/python -m benchmarks.serving            # full grid (hours on 2 cores)
    ... --input-lens 1024,8000 --concurrency 8 --backends stock,razor,razor-uniform --reps 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
from pathlib import Path

from benchmarks.serving import REPO
from benchmarks.serving.client import make_prompts, run_wave
from benchmarks.serving.grid import build_cells, load_run, merge_runs, summarize
from benchmarks.serving.limits import auto_kv_space, decode_limits, machine_info, model_facts
from benchmarks.serving.report import fmt, markdown, plot, print_table
from benchmarks.serving.servers import BACKENDS, BenchServer, make_server, split_backend, tail
from razor_vllm.config import SERVING_DEFAULTS
from razor_vllm.paths import default_model_dir

FULL_LENS, FULL_CONC = (1024, 4096, 8000), (1, 8, 32)
QUICK_LENS, QUICK_CONC = (1024, 4096), (1, 8)


def parse_ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def backend_specs(args) -> list[str]:
    """--backends as a list of specs (NAME or NAME=BASE@SRC)."""
    return [b.strip() for b in args.backends.split(",") if b.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model_dir())
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
    # razor's serving defaults (one source: razor_vllm.config); the committed grid in
    # docs/performance.md predates sinks 64 and was run with --sinks 4
    ap.add_argument("--window", type=int, default=SERVING_DEFAULTS["window"])
    ap.add_argument("--sinks", type=int, default=SERVING_DEFAULTS["sinks"])
    ap.add_argument("--compensation", default=SERVING_DEFAULTS["compensation"])
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
    args = ap.parse_args(argv)
    args.input_lens = args.input_lens or (QUICK_LENS if args.quick else FULL_LENS)
    args.concurrency = args.concurrency or (QUICK_CONC if args.quick else FULL_CONC)
    try:
        args.skip_cells = sorted({tuple(int(x) for x in cell.split(":")) for cell in args.skip.split(",") if cell})
    except ValueError:
        ap.error(f"--skip {args.skip!r}: expected INPUT_LEN:CONCURRENCY pairs, e.g. 8000:32,4096:32")
    specs = backend_specs(args)
    if any(split_backend(b)[0] not in BACKENDS for b in specs) or specs[0] != "stock":
        ap.error(f"--backends: names from {BACKENDS} (or NAME=BASE@SRC variants), starting with stock")
    if max(args.input_lens) + args.output_len > args.max_model_len:
        ap.error(f"input {max(args.input_lens)} + output {args.output_len} > --max-model-len {args.max_model_len}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
    specs = backend_specs(args)
    backends = [b.split("=", 1)[0] for b in specs]
    servers = []
    for i, (b, spec) in enumerate(zip(backends, specs)):
        gib = int(kv_override[b]) if b in kv_override else auto_kv_space(args, facts, split_backend(spec)[0])
        servers.append(make_server(args, b, spec, args.base_port + i, gib,
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
    runs, timing = measure(args, servers, backends, specs, machine, facts)
    finish(args, backends, specs, [s.info() for s in servers], runs, machine, facts, timing)


def measure(args, servers: list[BenchServer], backends: list[str], specs: list[str], machine: dict,
            facts: dict) -> tuple[list[dict], dict]:
    """Start the servers, run the grid (alternating the servers cell by cell, a checkpoint after every
    run), stop them; -> (the runs, the timing)."""
    t_start = time.time()
    runs = []
    try:
        for s in servers:  # one at a time: two compile warm-ups at once would only slow each other
            print(f"starting {s.backend} on :{s.server.port} (VLLM_CPU_KVCACHE_SPACE={s.kv_space_gib} GiB) ...",
                  flush=True)
            s.start(args.ready_timeout)
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
    return runs, {"total_s": t_end - t_start, "startup_s": t_ready - t_start, "grid_s": t_end - t_ready}


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
