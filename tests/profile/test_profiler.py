"""Tests of the retrieval-head profiler (RazorAttention §3.2, arXiv 2407.15891).

The profiler never forms the attention matrix: it hooks the attention call, reads post-RoPE Q/K, and
gathers a few entries of each softmax row in query chunks. That is exactly the kind of code where an
off-by-one in a column index, a wrong GQA mapping or a chunk-boundary mask bug gives plausible-looking
but wrong scores, so the tests check it three independent ways:

1. against brute force: attention weights computed by transformers' own eager attention, scored with
   explicit Python loops (and `head_scores` against a dense softmax on random tensors);
2. against ground truth: a hand-built model with one exact induction head and one exact echo head
   (tests/support/planted.py) whose selection is known by construction;
3. on the real shipped head mask for SmolLM2-135M (slow; skips until the file is produced).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch

from razor_vllm.heads import (HeadConfig, HeadConfigError, HeadConfigMismatch, ProfileSettings,
                                    load_head_config, model_identity)
from razor_vllm.profile.profiler import (ProfileOptions, UnsupportedModelError, calibration_ids, flash_head_scores,
                                 head_scores, load_model, max_over_groups, profile_model, select_retrieval_heads)

# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

TINY_OPTS = ProfileOptions(num_random_tokens=40, repeats=4, id_low=10, id_high=500, dtype="float32",
                           progress=False)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer GQA Llama saved with save_pretrained.

    The default init (std 0.02) gives near-uniform attention, where every score is ~1/position and a
    wrong column would still agree to 1e-5. Q/K weights are re-drawn with std 0.5 so attention rows are
    peaked and the echo/induction columns carry distinguishable mass.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0, 0.5)
            layer.self_attn.k_proj.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    return load_model(tiny_llama_dir, "float32")


# --------------------------------------------------------------------------------------------------
# 1. Brute force
# --------------------------------------------------------------------------------------------------


def brute_force_scores(probs: torch.Tensor, n: int, offset: int) -> list[float]:
    """probs: [Hq, T, T] attention weights of one layer. For each query head, the mean over queries i
    in copies 2.. of sum_m probs[i, i - m*n + offset], m >= 1 with i - m*n >= 1 (offset 0 = echo,
    1 = induction), by explicit loops."""
    hq, t, _ = probs.shape
    scores = []
    for h in range(hq):
        total, count = 0.0, 0
        for i in range(1 + n, t):
            m = 1
            while i - m * n >= 1:
                total += float(probs[h, i, i - m * n + offset])
                m += 1
            count += 1
        scores.append(total / count)
    return scores


def group_max(per_q_head: list[float], num_kv_heads: int) -> list[float]:
    """Query heads g*k .. g*k+g-1 share KV head k (transformers' repeat_kv layout)."""
    g = len(per_q_head) // num_kv_heads
    return [max(per_q_head[k * g:(k + 1) * g]) for k in range(num_kv_heads)]


def test_calibration_ids_layout():
    """BOS, then the same n seeded-uniform ids `repeats` times; reproducible across calls."""
    ids = calibration_ids(7, TINY_OPTS)
    n = TINY_OPTS.num_random_tokens
    assert ids.shape == (1 + n * TINY_OPTS.repeats,) and ids.dtype == torch.int64
    assert ids[0] == 7
    copies = ids[1:].view(TINY_OPTS.repeats, n)
    assert (copies == copies[0]).all()
    assert copies.min() >= TINY_OPTS.id_low and copies.max() < TINY_OPTS.id_high
    assert torch.equal(ids, calibration_ids(7, TINY_OPTS))
    g = torch.Generator().manual_seed(42)
    assert torch.equal(copies[0], torch.randint(10, 500, (n,), generator=g))


def test_profile_matches_eager_attention_brute_force(tiny_llama):
    """The profiler's scores equal loops over the attention weights transformers itself computes."""
    hc = profile_model(tiny_llama, TINY_OPTS)
    assert tiny_llama.config._attn_implementation == "sdpa", "profile_model must restore the attention"

    ids = calibration_ids(tiny_llama.config.bos_token_id, TINY_OPTS)[None]
    tiny_llama.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tiny_llama(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        tiny_llama.set_attn_implementation("sdpa")
    n, kv = TINY_OPTS.num_random_tokens, tiny_llama.config.num_key_value_heads
    assert len(out.attentions) == 2

    for layer, probs in enumerate(out.attentions):
        probs = probs[0].double()
        echo = group_max(brute_force_scores(probs, n, 0), kv)
        induction = group_max(brute_force_scores(probs, n, 1), kv)
        assert hc.echo_scores[layer] == pytest.approx(echo, abs=1e-5)
        assert hc.induction_scores[layer] == pytest.approx(induction, abs=1e-5)
        # The comparison has teeth: a neighbouring column gives clearly different numbers.
        wrong = group_max(brute_force_scores(probs, n, 2), kv)
        assert max(abs(a - b) for a, b in zip(induction, wrong)) > 1e-3

    assert hc.model == model_identity(tiny_llama.config)
    assert hc.profile.num_random_tokens == 40 and hc.profile.bos_token_id == 1
    assert hc.retrieval_heads == select_retrieval_heads(hc.induction_scores, hc.echo_scores,
                                                        TINY_OPTS.induction_ratio, TINY_OPTS.echo_ratio)


def dense_scores(q, k, scale, n, softcap=None):
    """Full [Hq, T, T] causal softmax (K repeated per GQA group), then the columns by loops."""
    hq, t, _ = q.shape
    kr = k.double().repeat_interleave(hq // k.shape[0], dim=0)
    logits = q.double() @ kr.transpose(1, 2) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return brute_force_scores(probs, n, 0), brute_force_scores(probs, n, 1)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 13, 256])
def test_head_scores_match_dense_softmax_gqa3(chunk_size):
    """GQA ratio 3 (6 query heads on 2 KV heads); chunk sizes that do not divide T = 1 + 7*4 = 29 (and
    one that divides n), so chunks straddle copy boundaries and the diagonal block."""
    torch.manual_seed(chunk_size)
    n, repeats, d = 7, 4, 8
    t = 1 + n * repeats
    q, k = 2 * torch.randn(6, t, d), 2 * torch.randn(2, t, d)
    scale = d ** -0.5
    echo, induction = head_scores(q, k, scale, n, chunk_size=chunk_size)
    want_echo, want_ind = dense_scores(q, k, scale, n)
    assert echo.dtype == torch.float32 and echo.shape == (6,)
    assert echo.tolist() == pytest.approx(want_echo, abs=1e-5)
    assert induction.tolist() == pytest.approx(want_ind, abs=1e-5)


def test_head_scores_explicit_masks_and_softcap():
    """A bool mask, an additive float mask and mask=None agree on a causal mask; softcap (Gemma-2)
    is applied before the softmax."""
    torch.manual_seed(1)
    n, t, d = 5, 1 + 5 * 3, 4
    q, k = 2 * torch.randn(6, t, d), 2 * torch.randn(2, t, d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    additive = torch.zeros(t, t).masked_fill(~causal, float("-inf"))
    ref = head_scores(q, k, 0.5, n, chunk_size=4)
    for mask in (causal, additive):
        got = head_scores(q, k, 0.5, n, chunk_size=4, attention_mask=mask)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    echo, induction = head_scores(q, k, 0.5, n, chunk_size=3, softcap=1.5)
    want_echo, want_ind = dense_scores(q, k, 0.5, n, softcap=1.5)
    assert echo.tolist() == pytest.approx(want_echo, abs=1e-5)
    assert induction.tolist() == pytest.approx(want_ind, abs=1e-5)


@pytest.mark.parametrize("n, repeats, d, kv", [(7, 4, 8, 2), (5, 3, 16, 1), (11, 2, 4, 3)])
def test_flash_head_scores_match_dense_softmax(n, repeats, d, kv):
    """The fused path (flash-attention output + row log-sum-exp, then a few gathered columns) gives
    the dense softmax's scores and SDPA's causal attention output."""
    torch.manual_seed(n)
    t, hq = 1 + n * repeats, 3 * kv
    q, k, v = 2 * torch.randn(hq, t, d), 2 * torch.randn(kv, t, d), torch.randn(kv, t, d)
    scale = d ** -0.5
    out, echo, induction = flash_head_scores(q, k, v, scale, n)
    want_echo, want_ind = dense_scores(q, k, scale, n)
    assert echo.tolist() == pytest.approx(want_echo, abs=1e-5)
    assert induction.tolist() == pytest.approx(want_ind, abs=1e-5)
    rep = hq // kv
    want_out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0), is_causal=True, scale=scale)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)


def test_fused_and_chunked_paths_agree(tiny_llama):
    """Same model, both scoring paths: the fused pass must not change the selection or the scores."""
    import dataclasses

    fused = profile_model(tiny_llama, TINY_OPTS)
    chunked = profile_model(tiny_llama, dataclasses.replace(TINY_OPTS, fused=False))
    assert fused.retrieval_heads == chunked.retrieval_heads
    for a, b in ((fused.echo_scores, chunked.echo_scores), (fused.induction_scores, chunked.induction_scores)):
        assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) < 1e-6


def test_sliding_window_layers_score_with_their_mask(tmp_path):
    """A sliding window shorter than one copy hides every earlier occurrence, so such a layer must
    score zero, exactly as transformers' eager attention (with its own sliding mask) says. Without a
    mask function registered for the hook, transformers hands a custom attention function no mask
    and the layer would silently run (and score) as full causal attention."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, sliding_window=30)
    model = MistralForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.normal_(0, 0.5)
        model.model.layers[0].self_attn.k_proj.weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    model = load_model(tmp_path, "float32")
    hc = profile_model(model, TINY_OPTS)  # copies of n = 40 tokens, window 30

    ids = calibration_ids(1, TINY_OPTS)[None]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(input_ids=ids, output_attentions=True, use_cache=False).attentions[0][0].double()
    assert float(probs[0, 100, :100 - 30].sum()) == 0.0, "eager attention should apply the window"
    n = TINY_OPTS.num_random_tokens
    assert hc.echo_scores[0] == pytest.approx(group_max(brute_force_scores(probs, n, 0), 2), abs=1e-6)
    assert hc.induction_scores[0] == pytest.approx(group_max(brute_force_scores(probs, n, 1), 2), abs=1e-6)
    assert max(hc.echo_scores[0] + hc.induction_scores[0]) == 0.0


def test_max_over_groups_uses_consecutive_query_heads():
    scores = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.0, 0.3])
    assert max_over_groups(scores, 2).tolist() == pytest.approx([0.5, 0.9])
    assert max_over_groups(scores, 3).tolist() == pytest.approx([0.5, 0.9, 0.3])


# --------------------------------------------------------------------------------------------------
# 2. Planted heads
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    """(model, head config): the profiler run once on the planted model (10,001 tokens, ~20 s on 2
    busy cores, dominated by the row log-sum-exps over 2 x 4 x 7,500 x 10,001 logits)."""
    from support.planted import build_planted_model, planted_profile_options

    model = build_planted_model()
    return model, profile_model(model, planted_profile_options())


def test_planted_rope_frequencies_are_whole_turns_per_copy(planted):
    """The construction needs omega_p * 2500 to be a multiple of 2*pi; check how this transformers
    version actually scales linear RoPE rather than trusting the formula."""
    from support.planted import PERIOD, RING_WAVENUMBERS, expected_inv_freq

    model, _ = planted
    inv_freq = model.model.rotary_emb.inv_freq.double()
    torch.testing.assert_close(inv_freq, expected_inv_freq(), atol=1e-8, rtol=1e-6)
    turns = inv_freq * PERIOD / (2 * math.pi)
    assert turns.tolist() == pytest.approx(RING_WAVENUMBERS, abs=1e-4)


@pytest.mark.parametrize("kind", ["echo", "induction"])
def test_planted_attention_rows_peak_where_intended(planted, kind):
    """Checks the construction itself, without the profiler: post-RoPE Q/K from the model's own
    modules (its RMSNorm, projections and rotary embedding), softmax over a few full rows, and all
    the mass must sit, evenly, on the intended columns: i - m*2500 (and i) for the echo head,
    i + 1 - m*2500 for the induction head."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from support.planted import ECHO_HEAD, HEAD_DIM, INDUCTION_HEAD, NUM_HEADS, NUM_KV_HEADS, PERIOD

    model, _ = planted
    layer_idx, q_head = ECHO_HEAD if kind == "echo" else INDUCTION_HEAD
    kv_head = q_head // (NUM_HEADS // NUM_KV_HEADS)
    t = 1 + 4 * PERIOD
    layer = model.model.layers[layer_idx]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(torch.zeros(1, t, dtype=torch.long)))
        q = layer.self_attn.q_proj(x).view(1, t, NUM_HEADS, HEAD_DIM).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(1, t, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q[0, q_head], k[0, kv_head]
    offset = 0 if kind == "echo" else 1
    for i in (PERIOD + 1, 4000, 2 * PERIOD + 17, 3 * PERIOD, t - 1):
        probs = torch.softmax(k[:i + 1].double() @ q[i].double() * HEAD_DIM ** -0.5, dim=0)
        peaks = [j for j in range(i + 1) if (j - i - offset) % PERIOD == 0]
        assert float(probs[peaks].sum()) > 1 - 1e-6, (kind, i)
        assert float(probs[peaks].min()) == pytest.approx(1 / len(peaks), rel=1e-3)


def test_planted_heads_are_exactly_the_selection(planted):
    """Induction head in layer 1 / KV head 0, echo head in layer 0 / KV head 1: with ratios 0.25 of 4 KV
    heads each score selects one head, and it must be the planted one."""
    _, hc = planted
    print(f"\nplanted echo scores {hc.echo_scores}\nplanted induction scores {hc.induction_scores}")
    assert hc.retrieval_heads == [[1], [0]]

    induction, echo = hc.induction_scores[1][0], hc.echo_scores[0][1]
    assert induction > 0.9
    # Every earlier copy and the query itself share the peak: mean of s/(s+1), s = 1, 2, 3.
    assert echo == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3, abs=5e-3)
    others_ind = [s for l, row in enumerate(hc.induction_scores) for h, s in enumerate(row) if (l, h) != (1, 0)]
    others_echo = [s for l, row in enumerate(hc.echo_scores) for h, s in enumerate(row) if (l, h) != (0, 1)]
    assert max(others_ind) < 0.01 and max(others_echo) < 0.01
    # The two planted heads do not score on each other's pattern.
    assert hc.echo_scores[1][0] < 0.01 and hc.induction_scores[0][1] < 0.01


def test_planted_selection_without_echo_ratio(planted):
    """echo_ratio 0 keeps only the induction head: selection is recomputed from the same scores."""
    _, hc = planted
    assert select_retrieval_heads(hc.induction_scores, hc.echo_scores, 0.25, 0.0) == [[], [0]]
    assert select_retrieval_heads(hc.induction_scores, hc.echo_scores, 0.0, 0.25) == [[1], []]


# --------------------------------------------------------------------------------------------------
# 3. Selection
# --------------------------------------------------------------------------------------------------


def test_selection_counts_are_ceil_of_ratio():
    """0.14 * 100 = 14.000000000000002 must select 14, not 15; 1% of 90 heads still selects one."""
    scores_100 = [[float(l * 10 + h) for h in range(10)] for l in range(10)]
    sel = select_retrieval_heads(scores_100, scores_100, 0.14, 0.0)
    assert sum(map(len, sel)) == 14
    # the 14 highest: 99..86 -> layer 9 all ten, layer 8 heads 6..9
    assert sel[9] == list(range(10)) and sel[8] == [6, 7, 8, 9] and not any(sel[:8])

    scores_90 = [[float(l * 10 + h) for h in range(10)] for l in range(9)]
    sel = select_retrieval_heads(scores_90, scores_90, 0.0, 0.01)
    assert sel == [[]] * 8 + [[9]]
    assert sum(map(len, select_retrieval_heads(scores_90, scores_90, 0.15, 0.0))) == 14  # ceil(13.5)
    assert sum(map(len, select_retrieval_heads(scores_90, scores_90, 1.0, 1.0))) == 90


def test_selection_ties_are_broken_by_layer_then_head():
    """Equal scores select exactly `count` heads, the lowest (layer, head) first; Huawei's
    value-membership rule would select all tied heads."""
    flat = [[0.5] * 4 for _ in range(2)]
    assert select_retrieval_heads(flat, flat, 0.25, 0.0) == [[0, 1], []]
    cross = [[0.1, 0.9], [0.9, 0.1]]
    assert select_retrieval_heads(cross, cross, 0.25, 0.0) == [[1], []]
    assert select_retrieval_heads(cross, cross, 0.5, 0.0) == [[1], [0]]
    zeros = [[0.0] * 3 for _ in range(3)]
    assert select_retrieval_heads(zeros, zeros, 0.2, 0.0) == [[0, 1], [], []]


def test_selection_is_the_union_of_both_sets():
    induction = [[0.9, 0.1, 0.0], [0.2, 0.0, 0.3]]
    echo = [[0.9, 0.0, 0.0], [0.0, 0.8, 0.0]]
    # 2/6 by induction: (0,0), (1,2); 2/6 by echo: (0,0), (1,1); overlap counted once, sorted per layer
    assert select_retrieval_heads(induction, echo, 2 / 6, 2 / 6) == [[0], [1, 2]]
    assert select_retrieval_heads(induction, echo, 0.0, 0.0) == [[], []]


def test_selection_matches_reference_on_random_scores():
    """Against a sort by (-score, layer, head) over random scores with many ties (values rounded to 1
    decimal); counts and membership must agree for a range of ratios."""
    g = torch.Generator().manual_seed(3)
    induction = torch.rand(7, 5, generator=g).round(decimals=1).tolist()
    echo = torch.rand(7, 5, generator=g).round(decimals=1).tolist()
    cells = [(l, h) for l in range(7) for h in range(5)]
    for ind_ratio, echo_ratio in ((0.14, 0.01), (0.3, 0.1), (0.5, 0.5), (0.02, 0.0)):
        want = set()
        for scores, ratio in ((induction, ind_ratio), (echo, echo_ratio)):
            count = math.ceil(round(ratio * 35, 9))
            want |= set(sorted(cells, key=lambda c: (-scores[c[0]][c[1]], c))[:count])
        got = select_retrieval_heads(induction, echo, ind_ratio, echo_ratio)
        assert {(l, h) for l, hs in enumerate(got) for h in hs} == want
        assert all(hs == sorted(hs) for hs in got)


# --------------------------------------------------------------------------------------------------
# 4. Bad input
# --------------------------------------------------------------------------------------------------


def test_load_model_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "no-such-model")


def test_load_model_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_load_model_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{ this is not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(tmp_path)


def test_unsupported_architecture_gpt2(tmp_path):
    """GPT-2 loads as a causal LM but has learned absolute positions, not RoPE: the profiler must
    refuse it by name instead of producing scores from a model the method does not cover."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=600, n_positions=256, bos_token_id=1,
                      eos_token_id=2)
    GPT2LMHeadModel(gpt2).save_pretrained(tmp_path)
    model = load_model(tmp_path, "float32")
    with pytest.raises(UnsupportedModelError, match="GPT2") as err:
        profile_model(model, TINY_OPTS)
    assert "RoPE" in str(err.value)


def test_unsupported_architecture_not_a_causal_lm(tmp_path):
    """An encoder-decoder config cannot be loaded as a causal LM; the error names the architecture."""
    from transformers import T5Config

    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100,
             architectures=["T5ForConditionalGeneration"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="T5ForConditionalGeneration"):
        load_model(tmp_path, "float32")


def test_vocabulary_smaller_than_id_range(tiny_llama):
    """The default ids [10000, 12500) do not exist in a 512-token vocabulary."""
    with pytest.raises(ValueError, match=r"\[10000, 12500\).*vocabulary \(512\)"):
        profile_model(tiny_llama, ProfileOptions(progress=False))


def test_missing_bos_token(tiny_llama):
    saved = tiny_llama.config.bos_token_id
    tiny_llama.config.bos_token_id = None
    try:
        with pytest.raises(ValueError, match="bos_token_id"):
            profile_model(tiny_llama, ProfileOptions(num_random_tokens=4, repeats=2, id_low=10, id_high=20, progress=False))
    finally:
        tiny_llama.config.bos_token_id = saved


def _valid_head_config(cfg=None) -> HeadConfig:
    ident = model_identity(cfg if cfg is not None else tiny_llama_config(architectures=["LlamaForCausalLM"]))
    return HeadConfig(model=ident, profile=ProfileSettings(bos_token_id=1),
                      echo_scores=[[0.1, 0.2], [0.3, 0.4]], induction_scores=[[0.5, 0.6], [0.7, 0.8]],
                      retrieval_heads=[[], [1]])


@pytest.fixture
def head_config_file(tmp_path) -> Path:
    path = tmp_path / "heads.json"
    _valid_head_config().save(path)
    return path


def _rewrite(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_head_config_round_trip(head_config_file):
    assert load_head_config(head_config_file, tiny_llama_config()) == _valid_head_config()


def test_head_config_missing(tmp_path):
    with pytest.raises(HeadConfigError, match="not found"):
        load_head_config(tmp_path / "absent.json")


def test_head_config_invalid_json(head_config_file):
    head_config_file.write_text(head_config_file.read_text()[:-20])
    with pytest.raises(HeadConfigError, match="not valid JSON"):
        load_head_config(head_config_file)


@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda raw: raw.update(echo_scores=[[0.1, 0.2]]),
                 "echo_scores must be 2 layers x 2 KV heads", id="echo-layers"),
    pytest.param(lambda raw: raw.update(induction_scores=[[0.1], [0.2]]),
                 "induction_scores must be 2 layers x 2 KV heads", id="induction-heads"),
    pytest.param(lambda raw: raw.update(retrieval_heads=[[0]]), "retrieval_heads must list 2 layers",
                 id="retrieval-layers"),
    pytest.param(lambda raw: raw.update(retrieval_heads=[[], [2]]), r"retrieval_heads\[1\] = \[2\]",
                 id="head-out-of-range"),
    pytest.param(lambda raw: raw.update(retrieval_heads=[[1, 0], []]), r"retrieval_heads\[0\] = \[1, 0\]",
                 id="heads-unsorted"),
    pytest.param(lambda raw: raw.pop("model"), "model", id="no-model"),
    pytest.param(lambda raw: raw.update(extra_field=1), "extra_field", id="unknown-field"),
])
def test_head_config_wrong_shapes(head_config_file, edit, message):
    """Structurally wrong files fail at load time with the offending field named, not later inside
    the attention backend with an index error."""
    _rewrite(head_config_file, edit)
    with pytest.raises(HeadConfigError, match="is invalid") as err:
        load_head_config(head_config_file)
    assert re.search(message, str(err.value)), str(err.value)


def test_head_config_unknown_schema_version(head_config_file):
    _rewrite(head_config_file, lambda raw: raw.update(schema_version=2))
    with pytest.raises(HeadConfigError, match="schema_version 2.*reads version 1"):
        load_head_config(head_config_file)


def test_head_config_for_another_model(head_config_file):
    """Both models are named, so a user sees which mask was applied to which model."""
    other = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 24,
             "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936}
    with pytest.raises(HeadConfigMismatch) as err:
        load_head_config(head_config_file, other)
    msg = str(err.value)
    assert _valid_head_config().model.describe() in msg
    assert model_identity(other).describe() in msg
    assert "LlamaForCausalLM" in msg
    assert "Qwen2ForCausalLM" in msg


def test_head_config_same_shape_different_model(head_config_file):
    """Same layer/head counts but another vocabulary: the fingerprint still tells the models apart."""
    with pytest.raises(HeadConfigMismatch, match="fingerprint"):
        load_head_config(head_config_file, tiny_llama_config(vocab_size=1024))


# --------------------------------------------------------------------------------------------------
# 5. Real model
# --------------------------------------------------------------------------------------------------

REAL_MODEL = "smollm2-135m-instruct"


@pytest.mark.slow
def test_shipped_smollm2_head_config():
    """The shipped mask for SmolLM2-135M-Instruct (from `razor-vllm profile`; `make reproduce` re-runs
    it and compares) is for that model, separates induction heads sharply from the bulk, and its selection is
    the deterministic function of its own scores."""
    from razor_vllm.paths import cache_root, repo_configs_dir

    shipped = repo_configs_dir() / f"{REAL_MODEL}.json"
    model_dir = cache_root() / "models" / REAL_MODEL
    if not shipped.is_file():
        pytest.skip(f"{shipped} not produced yet (run `make demo`)")
    if not (model_dir / "config.json").is_file():
        pytest.skip(f"{model_dir} missing (run `razor-vllm fetch-model {REAL_MODEL}`)")

    model_cfg = json.loads((model_dir / "config.json").read_text())
    hc = load_head_config(shipped, model_cfg)
    assert load_head_config(REAL_MODEL) == hc  # the shipped-name lookup finds the same file

    all_ind = [s for row in hc.induction_scores for s in row]
    selected = [hc.induction_scores[l][h] for l, heads in enumerate(hc.retrieval_heads) for h in heads]
    median = statistics.median(all_ind)
    ratio = statistics.mean(selected) / median
    print(f"\n{REAL_MODEL}: {len(selected)}/{len(all_ind)} retrieval KV heads; mean selected induction "
          f"{statistics.mean(selected):.4f}, median {median:.5f}, ratio {ratio:.1f}x")
    assert ratio >= 20

    p = hc.profile
    assert hc.retrieval_heads == select_retrieval_heads(hc.induction_scores, hc.echo_scores,
                                                        p.induction_ratio, p.echo_ratio)
    total = len(all_ind)
    expected_max = math.ceil(round(p.induction_ratio * total, 9)) + math.ceil(round(p.echo_ratio * total, 9))
    assert hc.num_retrieval <= expected_max


# -- off CPU (`--device cuda|auto`): the chunked score path on any device --------------------------
def test_score_paths_keep_every_tensor_on_the_querys_device():
    """`head_scores` (what runs off CPU) and `gathered_scores` with q/k on the meta device: any
    tensor built on the host and mixed into the math (a mask, an accumulator) raises here, as it
    would on CUDA. Index bookkeeping on the host is allowed (PyTorch accepts CPU index tensors)."""
    from razor_vllm.profile.profiler import gathered_scores, head_scores

    n, t = 5, 1 + 5 * 3
    q = torch.empty(6, t, 8, device="meta")
    k = torch.empty(2, t, 8, device="meta")
    for mask in (None, torch.ones(t, t, dtype=torch.bool).tril(), torch.zeros(t, t)):
        echo, induction = head_scores(q, k, 0.3, n, chunk_size=4, attention_mask=mask, softcap=None)
        assert echo.device.type == induction.device.type == "meta" and echo.shape == (6,)
    echo, induction = gathered_scores(q, k, torch.empty(6, t, device="meta"), 0.3, n)
    assert echo.device.type == "meta"


def test_device_option_refused_with_the_fix_when_unusable(monkeypatch):
    from razor_vllm.profile.profiler import _placement

    assert _placement("cpu") == {}
    with pytest.raises(ValueError, match="use cpu, cuda, cuda:N or auto"):
        _placement("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1", "auto"):
        with pytest.raises(ValueError, match="sees no CUDA device.*use --device cpu"):
            _placement(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _placement("auto") == {"device_map": "auto"}
    assert _placement("cuda:1") == {"device_map": {"": "cuda:1"}}


@pytest.mark.slow
def test_chunked_path_gives_the_shipped_smollm2_heads():
    """The score path a GPU profile takes (the chunked pass, no CPU flash op) gives exactly the
    shipped config's heads for SmolLM2, and its scores within 1e-5 (fp32, other summation order)."""
    from razor_vllm.heads import load_head_config
    from razor_vllm.paths import default_model_dir
    from razor_vllm.profile.profiler import ProfileOptions, load_model, profile_model

    model_dir = default_model_dir()
    if not (model_dir / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct` first")
    shipped = load_head_config("smollm2-135m-instruct")
    got = profile_model(load_model(model_dir, "float32"), ProfileOptions(fused=False, progress=False))
    assert got.retrieval_heads == shipped.retrieval_heads
    for a, b in ((got.echo_scores, shipped.echo_scores), (got.induction_scores, shipped.induction_scores)):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), "scores moved beyond fp32 reordering"
