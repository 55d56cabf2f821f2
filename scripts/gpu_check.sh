#!/usr/bin/env bash
# The <= 5-minute GPU check (the device tool's H100/H200 machine: torch + triton, no vLLM, no
# pydantic, no pytest, no network). Run from the repository root with the wheels from
# `make gpu-wheels` carried in .whl/:
#     run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=420)
# Writes into $OUT (default out/gpu): gpu.txt (device, driver, torch/triton versions),
# kernels.log + kernels.xml (the Triton kernel tests compiled, TRITON_INTERPRET=0, against the
# PyTorch oracles), bench_kernels.json (+ .png) at 4k and 32k, batch 1 and 32, and summary.json.
# Commit summary.json and bench_kernels.json under docs/results/gpu/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
T=$(mktemp -d)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
# the carried wheels, unpacked (no pip needed): those built for this interpreter, plus pure ones
"$PY" - "$T/site" <<'PYEOF'
import pathlib, sys, zipfile
site = pathlib.Path(sys.argv[1]); site.mkdir(parents=True, exist_ok=True)
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
for whl in sorted(pathlib.Path(".whl").glob("*.whl")):
    if "-none-any" in whl.name or f"-{tag}-" in whl.name:
        zipfile.ZipFile(whl).extractall(site)
print("unpacked for", tag, ":", sorted(p.name for p in site.iterdir() if p.suffix != ".dist-info")[:20])
PYEOF
export PYTHONPATH="$PWD:$T/site"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'device', torch.cuda.get_device_name())"
} | tee "$OUT/gpu.txt"
# 1) compiled Triton kernels vs the PyTorch oracles (uniform paged attention, ring decode, cache ops)
timeout 200 "$PY" -m pytest -q -x -p no:cacheprovider --junitxml "$OUT/kernels.xml" \
  tests/kernels/test_razor_paged_attention.py tests/kernels/test_ring_decode.py tests/kernels/test_razor_cache_ops.py \
  -k "triton" 2>&1 | tail -25 | tee "$OUT/kernels.log"
kernels_rc=${PIPESTATUS[0]}
# 2) bandwidth: razor vs full-cache decode at 4k and 32k, batch 1 and 32 (Llama-3.1-8B layer shape)
timeout 150 "$PY" benchmarks/kernels.py --contexts 4096,32768 --batches 1,32 --iters 10 \
  --out "$OUT/bench_kernels.json" 2>&1 | tail -30 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
"$PY" - "$OUT" "$kernels_rc" "$bench_rc" <<'PYEOF'
import json, pathlib, sys
out, krc, brc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
summary = {"device": (out / "gpu.txt").read_text().strip(), "kernel_tests_rc": krc, "bench_rc": brc,
           "kernel_tests": (out / "kernels.log").read_text().strip().splitlines()[-1:] if (out / "kernels.log").exists() else None}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
PYEOF
exit $(( kernels_rc || bench_rc ))
