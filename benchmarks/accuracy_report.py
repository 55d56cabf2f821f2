"""Render accuracy tables (markdown) and the combined summary from `razor-vllm eval` row files.

    python -m benchmarks.accuracy_report docs/results/accuracy/*.jsonl \\
        --summary docs/results/accuracy_summary.json --plot docs/results/accuracy/pareto.png > tables.md

Every input is a JSONL of per-prompt rows (`razor_vllm.eval.run`); the model is the file name's part
before the first "_". The summary JSON is the list of `SummaryRecord`s (model, task, length,
protocol, method, n, accuracy, kv_fraction, delta_vs_full, delta_ci95, flip_share, settings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from razor_vllm.eval.run import SummaryRecord, load_rows, pareto, plot, summarize, write_summary


def markdown(records: list[SummaryRecord]) -> str:
    out = []
    for model, protocol, length in sorted({(r.model, r.protocol, r.length) for r in records}):
        cell = [r for r in records if (r.model, r.protocol, r.length) == (model, protocol, length)]
        means = sorted((r for r in cell if r.task == "mean"), key=lambda r: (r.label != "full", r.kv_fraction))
        if not means:
            continue
        front = {r.label for r in pareto([r for r in means if r.method == "razor"])}
        tasks = means[0].tasks or []
        out += [f"### {model}, {length} tokens, {protocol}", "",
                f"Mean over {', '.join(tasks)}; n = the prompts each method ran (a staged sweep runs the "
                f"candidates on more prompts than the coarse grid), its accuracy on those, its delta paired "
                f"with full on the same prompts (95 % paired-bootstrap interval); * = on razor's Pareto front.",
                "", "| method | n | KV kept | accuracy | delta vs full [95 % CI] | flips |",
                "|---|---:|---|---|---|---|"]
        for r in means:
            delta = (f"{100 * r.delta_vs_full:+.1f} [{100 * r.delta_ci95[0]:+.1f}, {100 * r.delta_ci95[1]:+.1f}]"
                     if r.delta_vs_full is not None else "")
            flips = f"{100 * r.flip_share:.1f} %" if r.flip_share is not None else ""
            star = " *" if r.label in front else ""
            out.append(f"| {r.label}{star} | {r.n} | {100 * r.kv_fraction:.1f} % | {100 * r.accuracy:.1f} % | {delta} "
                       f"| {flips} |")
        per_task = sorted((r for r in cell if r.task != "mean" and r.label == "full"), key=lambda r: r.task)
        out += ["", "Full attention per task (tasks below 30 % are reported, not averaged): " +
                ", ".join(f"{r.task} {100 * r.accuracy:.0f} % (n = {r.n}){' (excluded)' if r.excluded else ''}"
                          for r in per_task), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", type=Path)
    ap.add_argument("--summary", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    records: list[SummaryRecord] = []
    for path in args.rows:
        records += summarize(load_rows(path), path.name.split("_")[0])
    print(markdown(records))
    if args.summary:
        write_summary(records, args.summary)
        print(f"wrote {args.summary}", file=sys.stderr)
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
