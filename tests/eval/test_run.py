"""The paired evaluation harness (razor_vllm.eval.run): method budgets, the staged grid, the paired
statistics of the summary, resume, and (on the real model) razor keeping a needle that StreamingLLM
at the same KV budget loses."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from razor_vllm.eval.run import (MIN_FULL_ACCURACY, RazorSetting, build_methods, paired_bootstrap, pareto, plot,
                                 sequence_depth, settings_grid, summarize)
from razor_vllm.heads import load_head_config
from razor_vllm.paths import default_model_dir

SMOL = default_model_dir()
needs_smol = pytest.mark.skipif(not (SMOL / "config.json").exists(),
                                reason="run `razor-vllm fetch-model smollm2-135m-instruct`")


def test_build_methods_budget_matches():
    """Streaming gets the same KV as razor with the same sinks; random protects the same number of heads."""
    cfg = load_head_config("smollm2-135m-instruct")
    ms = build_methods(cfg, ["full", "razor", "random", "streaming"], [RazorSetting(256, "single", 0.14, 0.01, 16)],
                       seq_len=4096)
    by = {m.name: m.policy for m in ms}
    assert by["full"] is None
    assert abs(by["streaming"].kv_fraction(4096) - by["razor"].kv_fraction(4096)) < 1e-3
    assert by["streaming"].sinks == by["random"].sinks == by["razor"].sinks == 16
    assert sum(map(len, by["random"].retrieval_heads)) == sum(map(len, by["razor"].retrieval_heads)) == 14
    assert by["random"].retrieval_heads != by["razor"].retrieval_heads
    assert by["streaming"].retrieval_heads == tuple(() for _ in range(30))


def test_streaming_label_is_stable_over_a_runs_prompt_lengths_and_its_budget_exact():
    """Qwen at 16k with 30 % heads: razor's KV grows by a third of a token per prompt token, so a
    window matched per prompt (16,380-16,384 tokens) differs by a token; the label names the window
    at the nominal length, so the control stays one row of the summary."""
    cfg = load_head_config("qwen2.5-coder-0.5b-instruct")
    setting = RazorSetting(induction_ratio=0.3)
    labels, windows = set(), set()
    for n in range(16378, 16385):
        (razor, streaming) = build_methods(cfg, ["razor", "streaming"], [setting], n, label_len=16384)
        assert abs(streaming.policy.kv_fraction(n) - razor.policy.kv_fraction(n)) * n <= 0.5  # exact budget
        labels.add(streaming.label)
        windows.add(streaming.policy.window)
    assert len(windows) > 1 and labels == {f"streaming s64 w{max(windows)}"}
    # without label_len the label is the prompt's own window (the rows of earlier runs keep theirs)
    (plain,) = build_methods(cfg, ["streaming"], [setting], 16378)
    assert plain.label == f"streaming s64 w{min(windows)}"


def test_build_methods_dedupes_shared_controls_and_honours_controls_first():
    cfg = load_head_config("smollm2-135m-instruct")
    settings = [RazorSetting(256, c, 0.14, 0.01, 64) for c in ("single", "count")]
    ms = build_methods(cfg, ["full", "razor", "streaming"], settings, seq_len=4096)
    assert [m.name for m in ms].count("streaming") == 1  # both weightings keep the same KV
    assert len({m.label for m in ms}) == len(ms) == 4
    first = build_methods(cfg, ["razor", "random"], [RazorSetting(sinks=4), RazorSetting(window=512)], 4096,
                          controls="first")
    assert [m.name for m in first] == ["razor", "random", "razor"]


def test_settings_grid_one_at_a_time_changes_one_field_from_the_base():
    grid = settings_grid([64, 4, 16], [256, 128], ["single", "none"], [0.14, 0.3], 0.01, one_at_a_time=True)
    base = grid[0]
    assert base == RazorSetting(256, "single", 0.14, 0.01, 64)
    assert len(grid) == 1 + 2 + 1 + 1 + 1
    for s in grid[1:]:
        assert sum(a != b for a, b in zip(asdict(s).values(), asdict(base).values())) == 1
    assert len(settings_grid([64, 4], [256, 128], ["single"], [0.14], 0.01, one_at_a_time=False)) == 4


def test_sequence_depths_do_not_depend_on_n_and_spread():
    ds = [sequence_depth(i) for i in range(20)]
    assert ds[:5] == [sequence_depth(i) for i in range(5)]
    assert all(0 <= d < 1 for d in ds)
    # any prefix covers the context: every fifth of [0, 1) gets some of the first 10
    assert {int(d * 5) for d in ds[:10]} == set(range(5))


def _row(sample, task, label, correct, protocol="exact-prefill", kv=0.2):
    method = label.split()[0]
    return {"sample": sample, "task": task, "length": 4096, "protocol": protocol, "label": label, "method": method,
            "correct": correct, "kv_fraction": 1.0 if method == "full" else kv, "sinks": 64, "window": 256,
            "compensation": "single", "retrieval_fraction": 0.15,
            "setting": None if method == "full" else {"induction_ratio": 0.14}}


def test_summary_is_paired_and_keeps_weak_tasks_out_of_the_mean():
    rng = np.random.default_rng(0)
    full_a, razor_a = rng.random(40) < 0.9, rng.random(40) < 0.7
    rows = []
    for i in range(40):
        rows += [_row(f"a/{i}", "a", "full", bool(full_a[i])), _row(f"a/{i}", "a", "razor x", bool(razor_a[i]))]
        # task b: the full model fails it (below MIN_FULL_ACCURACY): reported, kept out of the mean
        rows += [_row(f"b/{i}", "b", "full", i < 4), _row(f"b/{i}", "b", "razor x", i < 40)]
    recs = {(r.task, r.label): r for r in summarize(rows, "m")}
    a = recs[("a", "razor x")]
    assert a.n == 40 and a.accuracy == pytest.approx(razor_a.mean())
    assert a.delta_vs_full == pytest.approx(razor_a.mean() - full_a.mean())
    assert a.delta_ci95[0] < a.delta_vs_full < a.delta_ci95[1]
    assert a.flip_share == pytest.approx(np.mean(full_a != razor_a))
    assert recs[("b", "full")].accuracy < MIN_FULL_ACCURACY and recs[("b", "razor x")].excluded
    mean = recs[("mean", "razor x")]
    assert mean.tasks == ["a"] and mean.n == 40 and mean.accuracy == a.accuracy
    assert recs[("mean", "full")].delta_vs_full is None


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    a, b = rng.random(400) < 0.8, rng.random(400) < 0.6
    d, lo, hi = paired_bootstrap(list(a), list(b))
    diff = a.astype(float) - b.astype(float)
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert d == pytest.approx(diff.mean())
    assert lo == pytest.approx(d - 1.96 * se, abs=0.01) and hi == pytest.approx(d + 1.96 * se, abs=0.01)
    assert paired_bootstrap([True] * 5, [True] * 5) == (0.0, 0.0, 0.0)


def test_pareto_front():
    rows = [_row("a/0", "a", f"razor {k}", c, kv=kv) for k, c, kv in
            (("p", True, 0.2), ("q", False, 0.1), ("r", False, 0.3), ("s", True, 0.4))]
    front = pareto([r for r in summarize(rows, "m") if r.task == "a"])
    assert [r.label for r in front] == ["razor q", "razor p"]


def test_plot_is_a_grid_of_model_length_rows_and_protocol_columns(tmp_path):
    import matplotlib.image

    rows = [_row(f"a/{i}", "a", label, i % 3 > 0, protocol=p) for i in range(6)
            for p in ("exact-prefill", "question-compressed") for label in ("full", "razor x")]
    records = summarize(rows, "m1") + summarize(rows, "m2")  # 2 models x 2 protocols at one length
    plot(records, tmp_path / "p.png")
    h, w = matplotlib.image.imread(tmp_path / "p.png").shape[:2]
    # 2 x 2 panels of 5.5 x 4.5 in; a single row of 4 would be 22 x 4.5 in
    assert (w, h) == pytest.approx((11 * 120, 9 * 120), abs=2)


@pytest.mark.slow
@needs_smol
def test_run_eval_resumes_and_grows_n(tmp_path, capsys):
    """A cut run resumes without repeating or losing a prompt; a larger n only adds prompts."""
    from razor_vllm.eval.run import run_eval

    cfg = load_head_config("smollm2-135m-instruct")
    out = tmp_path / "rows.jsonl"
    kw = dict(tasks=["passkey"], lengths=[600], methods=["full", "razor"], settings=[RazorSetting(window=64, sinks=4)],
              out=out)
    rows = run_eval(SMOL, cfg, n=2, **kw)
    assert len(rows) == 2 * 2 * 2  # prompts x protocols x methods
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # interrupted mid-prompt, mid-line
    again = run_eval(SMOL, cfg, n=2, **kw)
    def keys(rs):
        return sorted((r["sample"], r["protocol"], r["label"]) for r in rs)

    assert keys(again) == keys(rows) and len(out.read_text().splitlines()) == 8
    # the redone runs give the same answers (greedy, same prompt, same model)
    assert {k: r["output"] for k, r in zip(keys(again), sorted(again, key=lambda r: (r["sample"], r["protocol"], r["label"])))} \
        == {k: r["output"] for k, r in zip(keys(rows), sorted(rows, key=lambda r: (r["sample"], r["protocol"], r["label"])))}
    grown = run_eval(SMOL, cfg, n=3, **kw)
    assert len(grown) == 12 and [r for r in grown[:8]] == [json.loads(l) for l in out.read_text().splitlines()[:8]]
    err = capsys.readouterr().err
    assert "ETA" in err and "[1/1] passkey/600/2" in err  # growing n counts only the new prompt
    # a sweep extending finished prompts with a new setting counts each of them (not only unseen prompts)
    wider = run_eval(SMOL, cfg, n=3, **{**kw, "settings": [RazorSetting(window=64, sinks=4), RazorSetting(window=32, sinks=4)]})
    err = capsys.readouterr().err
    assert "3 of 3 prompts to run" in err and "[3/3]" in err and len(wider) == 12 + 3 * 2
    assert run_eval(SMOL, cfg, n=3, **kw) and "0 of 3 prompts to run" in capsys.readouterr().err
    # rows name their dtype, and a resume in another dtype is refused (it would pair across dtypes)
    assert {r["dtype"] for r in grown} == {"float32"}
    with pytest.raises(ValueError, match="holds rows run in float32.*--dtype float32"):
        run_eval(SMOL, cfg, n=3, dtype="bfloat16", **kw)


@pytest.mark.slow
@needs_smol
def test_razor_finds_a_passkey_far_outside_its_window_and_streaming_does_not():
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks
    from razor_vllm.eval.hf_razor import continue_greedy, prefill
    from razor_vllm.profile.profiler import load_model

    tok = AutoTokenizer.from_pretrained(SMOL)
    sample = tasks.make_suite(["passkey"], [4096], 2, 0, tok)[0]  # depth 0.25: ~3000 tokens before the window
    assert sample.depth == 0.25
    ctx, question = tasks.build_prompt_ids(sample, tok)
    ids = ctx + question
    model = load_model(SMOL, "float32")
    cfg = load_head_config("smollm2-135m-instruct", model.config)
    pols = {m.name: m.policy for m in build_methods(cfg, ["full", "razor", "streaming"],
                                                    [RazorSetting(256, "single", 0.14, 0.01, 4)], len(ids))}
    cache, logits = prefill(model, ids)
    out = {}
    for name, policy in pols.items():
        gen = continue_greedy(model, cache, [], sample.max_new_tokens, policy, [tok.eos_token_id], first_logits=logits)
        out[name] = tok.decode(gen, skip_special_tokens=True)
    print(out)
    assert tasks.is_correct(sample, out["full"])
    assert tasks.is_correct(sample, out["razor"]), out["razor"]
    assert not tasks.is_correct(sample, out["streaming"]), out["streaming"]
    assert pols["razor"].kv_fraction(len(ids)) < 0.25
    torch.testing.assert_close(pols["streaming"].kv_fraction(len(ids)), pols["razor"].kv_fraction(len(ids)),
                               atol=1e-3, rtol=0)
