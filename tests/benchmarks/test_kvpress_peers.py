"""benchmarks.kvpress_peers: kvpress 0.5.5 presses on the HF harness's prompts, as rows the report reads.

The end-to-end test needs the kvpress venv (scripts/kvpress_venv.sh builds it, ~1.4 GB, CPU torch) and
skips without it; the plan and the child's isolation are checked without it."""

import ast
import json
from pathlib import Path

import pytest

from benchmarks import accuracy_report, kvpress_peers

ROW_FIELDS = {"sample", "task", "length", "depth", "seed", "seq_len", "protocol", "method", "label", "setting",
              "sinks", "window", "compensation", "kv_fraction", "retrieval_fraction", "correct", "score",
              "output", "seconds", "frees_memory", "kv_storage", "press", "compression_ratio",
              "razor_kv_fraction", "context_tokens", "cache_tokens", "peer", "prefill"}


def test_press_plan_sizes_every_press_to_razors_budget():
    policy, _ = kvpress_peers.razor_policy("smollm2-135m-instruct")
    runs = {r["name"]: r for r in kvpress_peers.press_plan(list(kvpress_peers.ALL), policy, 4093, 4096)}
    assert runs["full"]["press"] is None and runs["full"]["label"] == "full"
    ratio = 1 - policy.kv_fraction(4093)
    assert 0.77 < ratio < 0.79
    for name in ("streaming", "snapkv", "expected-attention", "knorm"):
        assert runs[name]["press"]["kwargs"]["compression_ratio"] == pytest.approx(ratio, abs=1e-6)
        assert runs[name]["label"] == f"kvpress {name} c0.78" and runs[name]["method"] == f"kvpress-{name}"
    assert runs["streaming"]["press"]["kwargs"]["n_sink"] == policy.sinks == 64
    # DuoAttention's budget follows from razor's heads, sinks and window (its pattern), not a ratio
    assert runs["duo"]["press"] == {"class": "DuoAttentionPress", "kwargs": {}}
    assert runs["duo"]["label"] == "kvpress duo razor-heads s64 w256"


def test_induction_ratio_sizes_the_presses_to_that_razor_setting():
    from razor_vllm.eval.run import RazorSetting, build_methods

    policy, head_cfg = kvpress_peers.razor_policy("smollm2-135m-instruct")
    # re-selecting at the config's own ratio is the config's selection (identity)
    same, _ = kvpress_peers.razor_policy("smollm2-135m-instruct", head_cfg.profile.induction_ratio)
    assert same == policy
    wide, _ = kvpress_peers.razor_policy("smollm2-135m-instruct", 0.3)
    # the same heads and budget as the eval harness's "r0.3" setting, on the same prompt length
    (razor,) = build_methods(head_cfg, ["razor"], [RazorSetting(induction_ratio=0.3)], 4093)
    assert wide == razor.policy and wide.retrieval_fraction > policy.retrieval_fraction
    runs = {r["name"]: r for r in kvpress_peers.press_plan(["snapkv", "duo"], wide, 4093, 4096, 0.3)}
    assert runs["snapkv"]["press"]["kwargs"]["compression_ratio"] == pytest.approx(1 - wide.kv_fraction(4093))
    assert runs["duo"]["label"] == "kvpress duo razor-heads r0.3 s64 w256"


def test_child_is_self_contained():
    """The child runs in the kvpress venv, which has no razor_vllm."""
    tree = ast.parse(kvpress_peers.CHILD.read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in mods if m.split(".")[0] in ("razor_vllm", "benchmarks")}


@pytest.fixture(scope="module")
def kvpress_python():
    venv = kvpress_peers.kvpress_venv_dir()
    if not (venv / ".kvpress-setup").exists():
        pytest.skip(f"no kvpress venv at {venv}: build it with scripts/kvpress_venv.sh (kvpress 0.5.5 and its "
                    "transformers<5.3 on CPU torch, ~1.4 GB)")
    return kvpress_peers.kvpress_python()  # the script returns at once when its stamp matches


def test_rows_at_1k_resume_pair_and_report(tmp_path, smollm2_dir, kvpress_python):
    out = tmp_path / "smollm2-135m-instruct_1024_kvpress.jsonl"
    args = dict(model_dir=smollm2_dir, heads="smollm2-135m-instruct", tasks=["passkey"], length=1024, n=1,
                threads=1)
    rows = kvpress_peers.run(**args, presses=list(kvpress_peers.ALL), out=out, python=kvpress_python)
    assert len(rows) == len(kvpress_peers.ALL) == len(out.read_text().splitlines())
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full"} | {f"kvpress-{p}" for p in kvpress_peers.PRESSES}
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["protocol"] == "kvpress question-agnostic" and r["sample"] == "passkey/1024/0"
        assert r["context_tokens"] < r["seq_len"] <= 1024
        assert r["peer"].startswith("kvpress 0.5.5,") and r["prefill"] == "shared"
        if r["method"] != "full":
            assert r["frees_memory"] is False and r["compensation"] is None
    full = by["full"]
    assert full["correct"] and full["kv_fraction"] == 1.0 and full["cache_tokens"] == full["context_tokens"]
    razor_kv = full["razor_kv_fraction"]
    for p in ("streaming", "snapkv", "expected-attention", "knorm"):
        r = by[f"kvpress-{p}"]
        assert r["kv_storage"] == "pruned" and r["kv_fraction"] == pytest.approx(razor_kv, abs=1e-5)
        assert abs(r["cache_tokens"] - r["kv_fraction"] * r["context_tokens"]) <= 1  # the context, pruned
    duo = by["kvpress-duo"]
    assert duo["kv_storage"] == "masked" and duo["cache_tokens"] == duo["context_tokens"]  # masks, keeps all
    assert (duo["sinks"], duo["window"]) == (64, 256) and duo["retrieval_fraction"] == pytest.approx(14 / 90)
    assert duo["kv_fraction"] == pytest.approx(razor_kv, abs=0.01)  # same heads, sinks and window as razor

    # a re-run finds every row and never starts the child (no python needed)
    again = kvpress_peers.run(**args, presses=list(kvpress_peers.ALL), out=out, python=Path("/nonexistent"))
    assert len(again) == len(rows) == len(out.read_text().splitlines())

    # the shared prefill gives kvpress' own per-press pipeline's answers
    own = kvpress_peers.run(**args, presses=["full", "snapkv", "duo"], out=tmp_path / "own.jsonl",
                            python=kvpress_python, prefill="own")
    assert {r["label"]: r["output"] for r in own} == {r["label"]: r["output"] for r in rows if r["label"] in
                                                       {o["label"] for o in own}}

    summary = tmp_path / "s.json"
    assert accuracy_report.main([str(out), "--summary", str(summary)]) == 0
    recs = json.loads(summary.read_text())
    assert {r["model"] for r in recs} == {"smollm2-135m-instruct"}
    assert {r["label"] for r in recs if r["task"] == "mean"} == {r["label"] for r in rows}
    assert all(r["delta_vs_full"] is not None for r in recs if r["label"] != "full")
    print(kvpress_peers.table(rows, "smollm2-135m-instruct", 1024))
