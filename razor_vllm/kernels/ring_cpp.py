"""Fused C++ CPU operators (``torch.ops.razor_cpu``), built on first use and cached.

``ring_decode`` (razor_vllm/kernels/csrc/ring_decode.cpp) is the one-call twin of
:func:`razor_vllm.kernels.ring_torch.ring_decode`, which stays the oracle of its tests. Why it exists:
a decode step's ring work per layer is tiny, and in PyTorch it costs ~25 op dispatches per layer
(docs/performance.md, "What was optimised").

Build: ``g++`` against the installed torch's headers and libraries (no ninja, no build isolation:
nothing is compiled at ``pip install`` time, so the project installs with the machine's CPU torch
untouched). The library lands in ``~/.cache/razor-vllm/ops/<hash>/`` (``RAZOR_VLLM_CACHE`` moves the
root), keyed by the source, the torch version, the compiler flags and the CPU's ISA flags, so a
cache shared between machines never loads code built for another CPU. Concurrent builders (vLLM
spawns a worker per rank) write to temporary names and rename atomically.

``RAZOR_VLLM_CPU_FUSED=0`` turns the fused op off (the PyTorch ops run instead, same semantics); a
failed build raises, naming the compiler command and its output, unless the variable is ``auto``
(the default), in which case the error is logged once as a warning and the PyTorch ops run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

from razor_vllm.paths import cache_root

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "ring_decode.cpp"
ENV = "RAZOR_VLLM_CPU_FUSED"
_lock = threading.Lock()
_state: dict[str, object] = {}




def _isa_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _compile_cmd(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "g++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    libdirs = cpp_extension.library_paths()
    return [cxx, "-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fopenmp",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, str(SOURCE),
            *[f"-L{p}" for p in libdirs], *[f"-Wl,-rpath,{p}" for p in libdirs],
            "-lc10", "-ltorch_cpu", "-ltorch", "-o", str(out)]


def library_path() -> Path:
    """Where the built library for this source, torch, compiler flags and CPU lives."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(torch.__version__.encode())
    key.update(" ".join(_compile_cmd(Path("x"))).encode())
    key.update(_isa_flags().encode())
    key.update(sys.version.encode())
    return cache_root() / "ops" / key.hexdigest()[:16] / "razor_cpu_ops.so"


def build(verbose: bool = False) -> Path:
    """Compile the library if it is not cached yet; returns its path. Raises RuntimeError with the
    compiler's command line and output if the build fails."""
    lib = library_path()
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = _compile_cmd(Path(tmp))
    if shutil.which(cmd[0]) is None:
        os.unlink(tmp)
        raise RuntimeError(f"razor-vllm fused CPU ops: C++ compiler {cmd[0]!r} not found (install g++, or set "
                           f"CXX; {ENV}=0 runs the PyTorch ops instead)")
    logger.info("razor-vllm: building the fused CPU ring_decode op (once per machine) into %s", lib)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"razor-vllm fused CPU ops: build failed ({ENV}=0 runs the PyTorch ops instead)\n"
                           f"$ {' '.join(cmd)}\n{res.stdout[-4000:]}{res.stderr[-4000:]}")
    if verbose:
        print(res.stderr)
    os.replace(tmp, lib)  # atomic: a concurrent builder's copy is identical
    return lib


def load() -> bool:
    """Load ``torch.ops.razor_cpu`` (building it first if needed). Returns whether the fused ops are
    available; see the module docstring for ``RAZOR_VLLM_CPU_FUSED``."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return False
    with _lock:
        if "loaded" in _state:
            return bool(_state["loaded"])
        try:
            lib = build()
            torch.ops.load_library(str(lib))
            _state["loaded"] = True
            logger.info("razor-vllm: decode runs the fused CPU ring_decode op (%s)", lib)
        except (RuntimeError, OSError) as e:
            if mode != "auto":
                raise
            logger.warning("razor-vllm: the fused CPU ring_decode op is unavailable, decode runs the "
                           "PyTorch ring ops (same results, slower at small batch): %s", e)
            _state["loaded"] = False
        return bool(_state["loaded"])


def ring_decode(pages, offsets, blocks, plan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`razor_vllm.kernels.ring_torch.ring_decode` (same arguments, same result up to fp32
    summation order). query `[B, X, G, D]`, key/value `[B, X, D]`, out `[B, X, G, D]` (any strides);
    pages: X `[num_blocks, P, 2*D]` caches of the query's dtype with contiguous rows; blocks: X int32
    or int64 `[B]` (any stride: a block table's column)."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype)
    s, w = plan.geometry[0], plan.geometry[1]
    torch.ops.razor_cpu.ring_decode(list(pages), list(offsets), list(blocks), plan.mask, plan.n, plan.fold,
                                    plan.fold_row, plan.f_new, plan.write, plan.token_slot, query, key, value,
                                    float(scale), s, w, *plan.state_offsets, out)
    return out
