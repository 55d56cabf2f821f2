"""Serving benchmark: stock vLLM CPU attention vs `--attention-backend razor`, side by side (run it as
`python -m benchmarks.serving` from the repository root; `--help` says how). One run starts a real
`vllm serve` per backend (`servers`), drives them all with the same concurrent streaming requests,
alternating the backends cell by cell (`client`, `__main__`), reduces the runs to per-cell medians
and razor/stock ratios (`grid`), sets them beside the physical limits of a decode step (`limits`)
and writes the table, markdown and plot (`report`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (git describe, out/, docs/results/, the working tree's servers' cwd)."""
