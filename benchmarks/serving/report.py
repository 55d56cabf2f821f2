"""The benchmark's outputs for readers: the per-cell console table (every backend's medians, the
razor/stock ratios, the load average), the markdown tables of docs/performance.md (the same cells
plus the physical limits of a decode step, and which run each cell of a merged grid came from), and
the four-panel plot (throughput, TPOT, TTFT per backend; the ratios against the targets)."""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.serving.grid import METRICS


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

