#!/usr/bin/env bash
# The operating-point sweep behind docs/accuracy.md (SmolLM2-135M-Instruct, CPU, fp32).
# Two protocols (see razor_vllm/eval/run.py): exact-prefill (context + question prefilled exactly,
# answer decoded under compression: RazorAttention's own protocol and what vLLM does when the prompt
# fits one prefill chunk) and question-compressed (the question is a second chunk over the
# compressed context: kvpress's compress-then-ask). Results are checkpointed per sample.
set -euo pipefail
cd "$(dirname "$0")/.."
RV=${RV:-.venv/bin/razor-vllm}
mkdir -p out
common=(smollm2-135m-instruct --heads smollm2-135m-instruct --quiet --tasks passkey,niah_single --depths 2)
# 14 % induction heads (the paper's ratio) with W = 64 or 256 misses every 8k passkey on this
# 3-KV-head model (out/sweep_8k_exact_ir014.*), so the sweep raises the head ratio.
$RV eval "${common[@]}" --lengths 8192 --protocol exact-prefill --window 256 --compensation single,count \
  --induction-ratio 0.25,0.4 --json out/sweep_8k_exact.json --plot out/sweep_8k_exact.png
$RV eval "${common[@]}" --lengths 4096 --protocol exact-prefill --window 256 --compensation single,count \
  --induction-ratio 0.14,0.25,0.4 --json out/sweep_4k_exact.json --plot out/sweep_4k_exact.png
$RV eval "${common[@]}" --lengths 8192 --protocol question-compressed --window 256 --compensation single \
  --induction-ratio 0.25,0.4 --json out/sweep_8k_qc.json --plot out/sweep_8k_qc.png
