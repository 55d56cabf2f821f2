"""Where razor-vllm caches downloads and converted models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$RAZOR_VLLM_CACHE`, else `~/.cache/razor-vllm` (CI keeps ~/.cache between runs)."""
    env = os.environ.get("RAZOR_VLLM_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "razor-vllm"
    root.mkdir(parents=True, exist_ok=True)
    return root


DEFAULT_MODEL = "smollm2-135m-instruct"
"""The default model: fetched by `make test` and `make demo`, shipped head config of the same name."""


def model_dir(name: str) -> Path:
    """Where `razor-vllm fetch-model NAME` puts a converted model (under `cache_root()`)."""
    return cache_root() / "models" / name


def default_model_dir() -> Path:
    """`model_dir(DEFAULT_MODEL)`: the model the tests, the demo and the benchmarks use."""
    return model_dir(DEFAULT_MODEL)


def repo_configs_dir() -> Path:
    """The shipped head masks (`configs/`, installed as `razor_vllm.configs`)."""
    from razor_vllm import configs

    return Path(configs.__file__).parent
