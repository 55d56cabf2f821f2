"""Render docs/accuracy.md tables from `razor-vllm eval --json` outputs.

Usage: python benchmarks/accuracy_report.py docs/results/*.json > docs/accuracy-tables.md
Each input is a list of records (task, length, method, accuracy, kv_fraction, n, ...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from razor_vllm.eval.run import Record, label


def table(path: Path) -> str:
    records = [Record(**r) for r in json.loads(path.read_text())]
    if not records:
        return f"### {path.name}\n\n(no records)\n"
    proto = records[0].protocol
    lines = [f"### {path.stem}", "", f"Protocol: {proto}; dtype {records[0].dtype}; sinks {records[0].sinks}.", "",
             "| task | length | method | accuracy | KV kept | retrieval heads | n |", "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r.length, r.task, r.method != "full", label(r))):
        lines.append(f"| {r.task} | {r.length} | {label(r)} | {r.accuracy:.2f} | {r.kv_fraction:.3f} | "
                     f"{r.retrieval_fraction:.3f} | {r.n} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(table(Path(p)) for p in sys.argv[1:] if not p.endswith(".samples.json")))
