#!/usr/bin/env bash
# `make check-cuda`: razor against the production CUDA vLLM wheel (vllm==0.33.0), on this CPU machine.
# The wheel is installed with --no-deps into a side venv cached under ~/.cache/razor-vllm (336 MB,
# downloaded once); every other dependency (torch CPU, transformers, ...) and razor itself come from
# the project's .venv through a .pth, rewritten on every run so the side venv follows this checkout.
# What runs here is what the CUDA wheel's code does on CPU tensors: its planner, its config checks,
# its interfaces. Nothing here compiles or runs a CUDA kernel (see README, "What was verified where").
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CUDA_VERSION=${VLLM_CUDA_VERSION:-0.33.0}
CACHE=${RAZOR_CACHE:-$HOME/.cache/razor-vllm}
SIDE=$CACHE/venv-vllm-$VLLM_CUDA_VERSION
PY=.venv/bin/python
[ -x "$PY" ] || bash scripts/setup.sh
if [ ! -x "$SIDE/bin/python" ] || ! "$SIDE/bin/python" -c "import importlib.metadata as m; assert m.version('vllm') == '$VLLM_CUDA_VERSION'" 2>/dev/null; then
  mkdir -p "$CACHE/wheels"
  ls "$CACHE/wheels/vllm-$VLLM_CUDA_VERSION"-*.whl >/dev/null 2>&1 || \
    "$PY" -m pip download -q --no-deps "vllm==$VLLM_CUDA_VERSION" -d "$CACHE/wheels"
  rm -rf "$SIDE"
  "$(readlink -f "$PY")" -m venv --without-pip "$SIDE"
  "$PY" -m pip install -q --no-deps --no-compile --target "$SIDE/lib/python3.11/site-packages" \
    "$CACHE/wheels/vllm-$VLLM_CUDA_VERSION"-*.whl
fi
SITE=$(cd .venv/lib/python3.11/site-packages && pwd)
echo "import site; site.addsitedir('$SITE')" > "$SIDE/lib/python3.11/site-packages/razor_project_venv.pth"
# CUDA_VISIBLE_DEVICES="": with no device to count, vLLM keeps its own Triton kernels on (HAS_TRITON), so
# the retrieval siblings run vLLM's unified_attention as on a GPU (interpreted)
export VLLM_TARGET_DEVICE=cuda TRITON_INTERPRET=1 RAZOR_EXPECT_VLLM="$VLLM_CUDA_VERSION" CUDA_VISIBLE_DEVICES=""
mkdir -p out
export RAZOR_CHECK_CUDA_REPORT=out/check_cuda_cudagraph.json
rm -f "$RAZOR_CHECK_CUDA_REPORT"
rc=0
"$SIDE/bin/python" -m pytest -q -ra -p no:cacheprovider --junitxml out/check_cuda.xml tests/cuda \
  tests/vllm_backend/test_layout.py "$@" || rc=$?  # the planner tests, against 0.33's planner (compat.py)
"$SIDE/bin/python" -m benchmarks.capacity_shapes --out "out/capacity_shapes_vllm$VLLM_CUDA_VERSION.json" || rc=$((rc ? rc : 1))
# the last line: test counts and the CUDA-graph mode vLLM 0.33's resolver keeps for razor's builders
"$SIDE/bin/python" - "$VLLM_CUDA_VERSION" <<'PYEOF'
import json, pathlib, sys
import xml.etree.ElementTree as ET
suite = ET.parse("out/check_cuda.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
cg = pathlib.Path("out/check_cuda_cudagraph.json")
mode = json.loads(cg.read_text()) if cg.exists() else {"cudagraph_mode": "not resolved", "min_cg_support": "?"}
print(f"check-cuda (vllm {sys.argv[1]} wheel, CPU, Triton interpreted): {n - f - e - s} passed, {f} failed, "
      f"{e} errors, {s} skipped; cudagraph mode {mode['cudagraph_mode']} (razor's weakest builder: "
      f"{mode['min_cg_support']})")
PYEOF
exit $rc
