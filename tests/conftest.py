"""Set once for the whole session, before any test module imports vLLM or Triton: the CPU platform
for vLLM and the Triton interpreter (kernels run on CPU tensors here). Plus the shared model fixture.
tests/ is on sys.path (this conftest's folder), so helpers import as `support.*`."""

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen when @triton.jit runs: before any import of it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import pytest  # noqa: E402

from razor_vllm.paths import default_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The default model's HF directory (`razor-vllm fetch-model`; `make test` fetches it)."""
    path = default_model_dir()
    if not (path / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct` first (make test does)")
    return path
