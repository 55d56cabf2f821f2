#!/usr/bin/env bash
# The staged accuracy sweep behind docs/accuracy.md (SmolLM2-135M-Instruct, CPU, fp32; issue #17).
# Stage 1 (coarse): one factor at a time around the serving defaults (sinks 64, window 256, single,
# 14 % induction heads), StreamingLLM and random heads at the defaults' budget, both protocols.
# Rows are appended per prompt to docs/results/accuracy/<model>_<len>.jsonl; re-running resumes, and
# a larger N extends the same prompts (prompt i never changes). Run it alone on the machine.
#   N=100 LENGTH=4096 bash scripts/accuracy_smollm2.sh
# Stage 2 (STAGE=2): the full n on the candidates only, appended to the same rows (a prompt's finished
# methods are never re-run, so stage-1 prompts keep their rows): full, the defaults (sinks 64), the
# paper's sinks 4 (the setting the chunked protocol punished, docs/accuracy.md "Serving protocols"),
# and StreamingLLM / random heads at the defaults' budget.
#   STAGE=2 TASKS=passkey,niah_single N=100 LENGTH=4096 bash scripts/accuracy_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RV=${RV:-.venv/bin/razor-vllm}
MODEL=${MODEL:-smollm2-135m-instruct}
LENGTH=${LENGTH:-4096}
N=${N:-100}
TASKS=${TASKS:-passkey,niah_single,niah_multikey,niah_multivalue}
OUT=docs/results/accuracy/${MODEL}_${LENGTH}.jsonl
# shellcheck disable=SC2054  # the commas are the eval's value lists, not array separators
if [ "${STAGE:-1}" = 2 ]; then
  GRID=(--sinks 64,4 --window 256 --compensation single --induction-ratio 0.14)
else
  GRID=(--sinks 64,4,16,128 --window 256,128,512,1024 --compensation single,none,count --induction-ratio 0.14,0.2,0.3)
fi
$RV eval "$MODEL" --heads "$MODEL" --tasks "$TASKS" --lengths "$LENGTH" --n "$N" \
  "${GRID[@]}" --one-at-a-time --controls first \
  --out "$OUT" --summary "docs/results/accuracy/${MODEL}_${LENGTH}.summary.json" \
  --plot "docs/results/accuracy/${MODEL}_${LENGTH}.png"
