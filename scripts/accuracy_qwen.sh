#!/usr/bin/env bash
# The paired accuracy runs of issue #18 (Qwen2.5-Coder-0.5B-Instruct, CPU, fp32), with the harness of
# docs/accuracy.md. Every prompt is prefilled once and decoded by each method from a copy, so the
# settings are all run together: full; razor at the defaults (sinks 64, window 256, single, 14 %
# induction heads), with window 1024, and with 30 % induction heads; StreamingLLM and random heads
# at each of those three budgets. Both protocols. Rows are appended per prompt to
# docs/results/accuracy/<model>_<len>.jsonl; re-running resumes, and a larger N extends the same
# prompts (prompt i never changes). Run it alone on the machine.
# Screen (which tasks the full model answers above 30 %), all seven tasks:
#   N=5 LENGTH=4096 bash scripts/accuracy_qwen.sh
# Then the issue's n on the tasks that pass, per length:
#   TASKS=passkey,niah_single,... N=30 LENGTH=4096 bash scripts/accuracy_qwen.sh   # 8192, 16384
set -euo pipefail
cd "$(dirname "$0")/.."
# the eval invocation and its output paths live in one place: accuracy_smollm2.sh's `run`
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct} N=${N:-30} \
  TASKS=${TASKS:-passkey,niah_single,niah_multikey,niah_multivalue,vt,cwe,fwe} STAGE=qwen \
  exec bash scripts/accuracy_smollm2.sh
