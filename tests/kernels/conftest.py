"""Shared fixtures of the kernel tests: the backend under test (torch_ops always; triton_ops under
the Triton interpreter on CPU, or compiled on CUDA with TRITON_INTERPRET=0) and a single-thread
torch setting for tiny shapes."""

import os

# Before anything imports Triton: the interpreter is chosen when @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from razor_vllm.kernels import uniform_torch as torch_ops  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The shapes are tiny: OpenMP fan-out costs more than it saves, a lot on a busy machine."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@dataclass
class Backend:
    ops: object
    device: str


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "torch":
        return Backend(torch_ops, "cpu")
    pytest.importorskip("triton", reason="triton is not installed")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("compiled Triton (TRITON_INTERPRET=0) needs a CUDA device")
    from razor_vllm.kernels import uniform_triton as triton_ops

    return Backend(triton_ops, "cpu" if INTERPRET else "cuda")
