#!/usr/bin/env python
"""Time and peak memory of `razor-vllm profile` on SmolLM2-135M-Instruct, per scoring variant.

Each variant runs in its own process (so peak RSS is that run's own), one after the other in the same
invocation, and must select the same retrieval heads:

* ``fused-fp32``   the default: scores from the flash-attention pass's row log-sum-exps, fp32 forward;
* ``chunked-fp32`` a separate chunked QK^T pass per layer for the log-sum-exps (the unfused path);
* ``chunked-bf16`` the unfused path with a bf16 forward (the first release's default).

Prints a table, writes out/bench_profiler.json and out/bench_profiler.png.

    .venv/bin/python benchmarks/profiler.py [--variants fused-fp32,chunked-fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"fused-fp32": (True, "float32"), "chunked-fp32": (False, "float32"),
            "chunked-bf16": (False, "bfloat16")}
RESULT = "BENCH_RESULT "


def child(variant: str, model: str) -> None:
    import resource

    import torch

    from razor_vllm.fetch import resolve_model
    from razor_vllm.profile.profiler import ProfileOptions, run_profile

    fused, dtype = VARIANTS[variant]
    model_dir = resolve_model(model)
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = run_profile(model_dir, None, ProfileOptions(fused=fused, dtype=dtype, progress=False))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(RESULT + json.dumps({"variant": variant, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                               "peak_rss_mib": round(peak_mib), "threads": torch.get_num_threads(),
                               "retrieval_heads": cfg.retrieval_heads}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=Path("out/bench_profiler.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model)
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    rows = []
    for v in variants:
        load_before = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--child", v, "--model", args.model],
                              capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"variant {v} failed with exit code {proc.returncode}")
        row = json.loads(lines[-1][len(RESULT):])
        row["loadavg_1m_before"], row["loadavg_1m_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
        rows.append(row)
        print(f"{v}: {row['wall_s']} s wall, {row['peak_rss_mib']} MiB peak", flush=True)

    same_heads = all(r["retrieval_heads"] == rows[0]["retrieval_heads"] for r in rows)
    base = rows[0]["wall_s"]
    print(f"\n{'variant':<14} {'wall s':>7} {'cpu s':>7} {'peak MiB':>9} {'vs first':>9} {'load 1m':>12}")
    for r in rows:
        print(f"{r['variant']:<14} {r['wall_s']:>7} {r['cpu_s']:>7} {r['peak_rss_mib']:>9} "
              f"{r['wall_s'] / base:>8.2f}x {r['loadavg_1m_before']:>5}->{r['loadavg_1m_after']:<5}")
    print(f"same retrieval heads in every variant: {same_heads}")

    result = {"model": args.model, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                               "processor": platform.processor()},
              "same_retrieval_heads": same_heads,
              "rows": [{k: v for k, v in r.items() if k != "retrieval_heads"} for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [r["variant"] for r in rows]
    axes[0].bar(names, [r["wall_s"] for r in rows], color="tab:blue")
    axes[0].axhline(120, color="red", ls="--", lw=1, label="2 min target")
    axes[0].set_ylabel("wall time (s)")
    axes[0].legend()
    axes[1].bar(names, [r["peak_rss_mib"] for r in rows], color="tab:orange")
    axes[1].set_ylabel("peak RSS (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"razor-vllm profile, {args.model}, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {args.out} and {png}")
    return 0 if same_heads else 1


if __name__ == "__main__":
    sys.exit(main())
