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
# Stage 3 (STAGE=3): the budget search, razor only (full already ran on these prompts): two
# one-at-a-time waves, around the defaults and around window 1024 (the first wave's best setting when
# the question reads a compressed context), heads up to 50 %, windows up to 2048, sinks, weighting.
#   STAGE=3 TASKS=passkey,niah_single N=10 LENGTH=8192 bash scripts/accuracy_smollm2.sh
# Stage 4 (STAGE=4): the budget search's candidates at the full n: windows 1024 and 2048.
#   STAGE=4 TASKS=passkey,niah_single N=50 LENGTH=8192 bash scripts/accuracy_smollm2.sh
# STAGE=qwen: issue #18's settings, all from one prefill per prompt, controls at each setting's budget
# (scripts/accuracy_qwen.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
RV=${RV:-.venv/bin/razor-vllm}
MODEL=${MODEL:-smollm2-135m-instruct}
LENGTH=${LENGTH:-4096}
N=${N:-100}
TASKS=${TASKS:-passkey,niah_single,niah_multikey,niah_multivalue}
OUT=docs/results/accuracy/${MODEL}_${LENGTH}.jsonl
run() {
  $RV eval "$MODEL" --heads "$MODEL" --tasks "$TASKS" --lengths "$LENGTH" --n "$N" "$@" \
    --out "$OUT" --summary "docs/results/accuracy/${MODEL}_${LENGTH}.summary.json" \
    --plot "docs/results/accuracy/${MODEL}_${LENGTH}.png"
}
# shellcheck disable=SC2054  # the commas are the eval's value lists, not array separators
case "${STAGE:-1}" in
  1) run --sinks 64,4,16,128 --window 256,128,512,1024 --compensation single,none,count \
       --induction-ratio 0.14,0.2,0.3 --one-at-a-time --controls first ;;
  2) run --sinks 64,4 --window 256 --compensation single --induction-ratio 0.14 --one-at-a-time --controls first ;;
  3) run --methods razor --sinks 64 --window 256,512,1024 --compensation single --induction-ratio 0.14,0.2,0.25,0.3 \
       --one-at-a-time
     run --methods razor --sinks 64 --window 512 --compensation single --induction-ratio 0.2
     run --methods razor --sinks 64,4 --window 1024,2048 --compensation single,none,count --induction-ratio 0.14,0.2,0.5 \
       --one-at-a-time ;;
  4) run --methods razor --sinks 64 --window 1024,2048 --compensation single --induction-ratio 0.14 ;;
  # controls at every setting's budget: the best operating point (30 % heads at 16k) needs its own
  qwen) run --dtype float32 --sinks 64 --window 256,1024 --compensation single --induction-ratio 0.14,0.3 \
       --one-at-a-time --controls all ;;
  *) echo "STAGE must be 1, 2, 3, 4 or qwen" >&2; exit 2 ;;
esac
