"""From request records to the grid: one wave's summary (throughput, TTFT, TPOT as `vllm bench
serve` defines them, the steady decode rate), then per cell (input length x concurrency) each
backend's medians and the razor/stock ratios, paired only across runs measured side by side; also
reading a run back from its checkpoint or finished JSON and merging several runs of the same servers
into one grid (`--render`)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

# metric -> (label, higher is better)
METRICS = {
    "output_tok_s": ("out tok/s", True),
    "total_tok_s": ("total tok/s", True),
    "ttft_mean_s": ("TTFT s", False),
    "tpot_mean_ms": ("TPOT ms", False),
    "steady_decode_tok_s": ("decode tok/s", True),
    "out_tok_per_cpu_s": ("out tok/CPU-s", True),
}


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
