#!/usr/bin/env bash
# The <= 5-minute GPU check (the device tool's H100/H200 machine: torch + triton, no vLLM, no
# pydantic, no pytest, no network). Run from the repository root with the wheels from
# `make gpu-wheels` carried in .whl/ (pydantic for razor_vllm.config, pytest + pluggy + iniconfig):
#     run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=330)
# Three steps, each under a timeout (120 + 80 + 75 s; ~5 s of setup), writing into $OUT (default
# out/gpu): gpu.txt (device, driver, torch/triton versions);
# 1) kernels.log + kernels.xml: the Triton kernel tests compiled (TRITON_INTERPRET=0) on CUDA
#    against the PyTorch oracles: the capture-safe ring kernels (test_ring_rows.py, incl. a
#    CUDA-graph replay), uniform paged attention, ring decode, cache ops;
# 2) graph_check.json + graph.log: scripts/gpu_graph_check.py, a FULL CUDA-graph capture and replay
#    of one paged-layout layer's padded decode step (retrieval siblings + ring_decode_rows) against
#    eager runs and CPU references, with replay vs eager time per step;
# 3) bench_kernels.json (+ .png, bench.log) at 4k and 32k, batch 1 and 32;
# and summary.json (every step's rc and key numbers). Commit summary.json, graph_check.json and
# bench_kernels.json under docs/results/gpu/<device>/.
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
# 1) compiled Triton kernels vs the PyTorch oracles: the capture-safe ring kernels first (every test
# of test_ring_rows.py: "ring_rows" matches its module name), then the `triton` backend's cases of
# uniform paged attention, ring decode and cache ops
timeout 120 "$PY" -m pytest -q -x -p no:cacheprovider --junitxml "$OUT/kernels.xml" \
  tests/kernels/test_ring_rows.py tests/kernels/test_razor_paged_attention.py tests/kernels/test_ring_decode.py \
  tests/kernels/test_razor_cache_ops.py -k "triton or ring_rows" 2>&1 | tail -25 | tee "$OUT/kernels.log"
kernels_rc=${PIPESTATUS[0]}
# 2) FULL CUDA-graph capture + replay of one paged layer's padded decode step (rc 0 ok, 1 a check
# failed, 2 no CUDA, 3 an import missing; 124 timeout)
timeout 80 "$PY" scripts/gpu_graph_check.py --out "$OUT/graph_check.json" 2>&1 | tail -30 | tee "$OUT/graph.log"
graph_rc=${PIPESTATUS[0]}
# 3) bandwidth: razor vs full-cache decode at 4k and 32k, batch 1 and 32 (Llama-3.1-8B layer shape)
timeout 75 "$PY" benchmarks/kernels.py --contexts 4096,32768 --batches 1,32 --iters 10 \
  --out "$OUT/bench_kernels.json" 2>&1 | tail -30 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
"$PY" - "$OUT" "$kernels_rc" "$graph_rc" "$bench_rc" <<'PYEOF'
import json, pathlib, sys
out, krc, grc, brc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def last_line(name):
    p = out / name
    return p.read_text().strip().splitlines()[-1:] if p.exists() else None

graph = None
try:  # a summary even if graph_check.json is missing or partial
    g = json.loads((out / "graph_check.json").read_text())
    steps = g.get("steps", [])
    graph = {"ok": g.get("ok"), "failures": g.get("failures"), "capture_launched_nothing": g.get("capture_launched_nothing"),
             "steps": len(steps), "timing": g.get("timing"),
             "max_rel_err": {k: max((s.get("rel_err", {}).get(k, float("nan")) for s in steps), default=None)
                             for k in ("graph_vs_eager", "ring_vs_ring_step", "retrieval_vs_dense")},
             "all_true": {k: all(s.get(k) for s in steps) for k in (
                 "out_bit_equal_graph_vs_eager", "state_bit_equal_graph_vs_eager", "ring_kv_frontier_bit_equal",
                 "ring_sums_bit_equal", "sibling_caches_bit_equal", "null_blocks_untouched", "padding_rows_untouched",
                 "live_rows_written")}}
except (OSError, ValueError, TypeError, AttributeError) as e:
    graph = {"error": repr(e)}
summary = {"device": (out / "gpu.txt").read_text().strip(), "kernel_tests_rc": krc, "graph_check_rc": grc,
           "bench_rc": brc, "kernel_tests": last_line("kernels.log"), "graph_check": graph,
           "graph_check_log": last_line("graph.log")}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
PYEOF
exit $(( kernels_rc || graph_rc || bench_rc ))
