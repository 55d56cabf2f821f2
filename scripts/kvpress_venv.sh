#!/usr/bin/env bash
# Builds the kvpress peer venv that `python -m benchmarks.kvpress_peers` runs its child in, and prints
# its python's path on the last line of stdout.
#
#     scripts/kvpress_venv.sh            # -> ~/.cache/razor-vllm/kvpress-venv/bin/python
#
# Its own venv because kvpress==0.5.5 requires transformers<5.3 and the project runs a newer 5.x
# (accuracy-protocols notes, section 5). Location: $KVPRESS_VENV, else $RAZOR_VLLM_CACHE/kvpress-venv,
# else ~/.cache/razor-vllm/kvpress-venv (next to the models; CI keeps ~/.cache).
#
# Idempotent like scripts/setup.sh: a stamp (hash of this script) makes a second run return in well
# under a second without touching the network. Order matters, as in setup.sh:
#   1. torch==2.13.0 first, on its own, so pip takes the CPU wheel (this machine's pip config finds
#      torch-2.13.0+cpu in its local wheel folder); resolved through kvpress, plain `torch` would be
#      a multi-GB CUDA build. The build is checked.
#   2. kvpress==0.5.5 with torch pinned to the installed build (a constraint), so its resolution
#      cannot swap torch; it brings transformers<5.3, accelerate, datasets, peft, ...
#   3. remove torchvision/torchaudio/torchcodec should anything have pulled them in: a CUDA build of
#      torchvision that does not match torch makes `transformers` fail to import.
#   4. an import check of kvpress and of the presses the peer runner uses.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${RAZOR_VLLM_CACHE:-$HOME/.cache/razor-vllm}
VENV=${KVPRESS_VENV:-$CACHE/kvpress-venv}
KVPRESS_VERSION=0.5.5
TORCH_VERSION=2.13.0
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null 2>&1 && { PY=$c; break; }; done
fi
stamp=$(sha256sum < scripts/kvpress_venv.sh | cut -c1-16)
if [ -f "$VENV/.kvpress-setup" ] && [ "$(cat "$VENV/.kvpress-setup")" = "$stamp" ] && [ -x "$VENV/bin/python" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
echo "[kvpress-venv] building $VENV with $($PY --version)" >&2
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# This machine's pip config lists local index mirrors that may be absent; drop their noise only.
pip_() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
pip_ install -q -U "pip>=25" "setuptools>=68" wheel >&2
pip_ install -q "torch==$TORCH_VERSION" >&2
torch_build=$("$VENV/bin/python" -W ignore::UserWarning - <<'PY'
import sys

import torch

if torch.version.cuda is not None or "+cpu" not in torch.__version__:
    sys.exit(f"kvpress-venv: expected the CPU build of torch, got {torch.__version__} (cuda {torch.version.cuda})")
print(torch.__version__)
PY
)
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "torch==$torch_build" > "$pin"
pip_ install -q -c "$pin" "kvpress==$KVPRESS_VERSION" >&2
pip_ uninstall -y -q torchvision torchaudio torchcodec >&2 2>/dev/null || true
"$VENV/bin/python" - <<PY >&2
import importlib.metadata as md

import torch
import transformers
from kvpress import (DuoAttentionPress, ExpectedAttentionPress, KnormPress, SnapKVPress,  # noqa: F401
                     StreamingLLMPress)

assert md.version("kvpress") == "$KVPRESS_VERSION", md.version("kvpress")
assert torch.version.cuda is None, torch.__version__
print(f"[kvpress-venv] kvpress {md.version('kvpress')}, transformers {transformers.__version__}, torch {torch.__version__}")
PY
echo "$stamp" > "$VENV/.kvpress-setup"
echo "[kvpress-venv] done: $VENV" >&2
echo "$VENV/bin/python"
