"""benchmarks/head_structure.py: KV-level vs query-level selection on a hand-made config whose answer is
known, and the optional per-query-head scores of a head config."""

from __future__ import annotations

import pytest

from benchmarks.head_structure import structure
from razor_vllm.heads import HeadConfig, ModelIdentity, ProfileSettings


def _cfg(query_induction, query_echo=None, kv=2):
    layers, hq = len(query_induction), len(query_induction[0])
    g = hq // kv
    query_echo = query_echo or [[0.0] * hq for _ in range(layers)]
    kv_of = lambda rows: [[max(r[k * g:(k + 1) * g]) for k in range(kv)] for r in rows]  # noqa: E731
    ident = ModelIdentity(architecture="T", num_layers=layers, num_attention_heads=hq, num_kv_heads=kv, head_dim=8,
                          config_fingerprint="x")
    return HeadConfig(model=ident, profile=ProfileSettings(bos_token_id=0), echo_scores=kv_of(query_echo),
                      induction_scores=kv_of(query_induction), retrieval_heads=[[] for _ in range(layers)],
                      query_echo_scores=query_echo, query_induction_scores=query_induction)


def test_query_level_selection_spreads_over_more_kv_heads():
    # 5 layers x 8 query heads (2 KV heads, G = 4) = 40 query heads, 10 KV heads. Top 20 % of KV heads
    # = 2 (layer 0 KV 0 and layer 1 KV 0: the two strongest groups); top 20 % of query heads = 8,
    # which fall in 4 groups (two per group of the strong ones, the next four in other groups).
    qi = [[0.0] * 8 for _ in range(5)]
    qi[0][:4] = [0.9, 0.8, 0.0, 0.0]
    qi[1][:4] = [0.85, 0.75, 0.0, 0.0]
    qi[2][4], qi[3][4], qi[3][0], qi[4][6] = 0.7, 0.6, 0.65, 0.5
    r = structure("t", _cfg(qi), 0.2, 0.0)
    assert r["kv_level"]["kv_heads"] == 2 and r["kv_level"]["kv_fraction"] == pytest.approx(0.2)
    assert r["query_level"]["query_heads"] == 8
    assert r["query_level"]["kv_heads_touched"] == 6  # (0,0) (1,0) (2,1) (3,1) (3,0) (4,1)
    assert r["overlap"] == {"both": 2, "kv_level_only": 0, "query_level_only": 4, "jaccard": pytest.approx(2 / 6)}


def test_query_scores_must_match_the_model_shape():
    with pytest.raises(ValueError, match="query_induction_scores must be 1 layers x 4 query heads"):
        cfg = _cfg([[0.1, 0.2, 0.3, 0.4]])
        HeadConfig.model_validate({**cfg.model_dump(), "query_induction_scores": [[0.1, 0.2]]})


def test_configs_without_query_scores_still_load_and_are_refused_by_the_report():
    cfg = _cfg([[0.1, 0.2, 0.3, 0.4]])
    old = HeadConfig.model_validate({k: v for k, v in cfg.model_dump().items() if not k.startswith("query_")})
    assert old.query_induction_scores is None
    with pytest.raises(SystemExit, match="re-profile"):
        structure("old", old, 0.14, 0.01)
