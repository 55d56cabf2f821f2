"""benchmarks.protocol_accuracy: the vLLM-side accuracy run, through `vllm serve` and the openai client,
in rows that pair with the HF harness's and that accuracy_report reads."""

import json

from benchmarks import accuracy_report, protocol_accuracy
from razor_vllm.eval import tasks
from razor_vllm.eval.run import sequence_suite


def test_serve_rows_pair_with_the_hf_suite_and_resume(smollm2_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)  # the server logs go to ./out
    out = tmp_path / "smollm2-135m-instruct_1024_vllm-serve.jsonl"
    argv = ["--tasks", "passkey", "--length", "1024", "--n", "1", "--configs", "stock,razor-s64",
            "--protocols", "whole-prompt", "--out", str(out)]
    assert protocol_accuracy.main(argv) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["full", "razor s64 w256 single r0.14"]

    # The server saw exactly the HF harness's prompt 0 (same tokens: same chat template and text).
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    (i, sample), = sequence_suite(["passkey"], [1024], 1, 0, tok)
    ctx, question = tasks.build_prompt_ids(sample, tok)
    for r in rows:
        assert (r["sample"], r["prompt_tokens"]) == (f"passkey/1024/{i}", len(ctx) + len(question))
        assert r["protocol"] == "vllm-serve whole-prompt"
        assert r["max_num_batched_tokens"] == 1024 + protocol_accuracy.MARGIN  # one chunk: the whole prompt
    assert rows[0]["correct"], rows[0]["output"]  # stock vLLM finds a 1k passkey
    full, razor = rows[0]["kv_fraction"], rows[1]["kv_fraction"]
    assert full == 1.0 and 0 < razor < 0.6  # 1k tokens > 64 sinks + 256 window: the local heads evicted

    # Resume: nothing left to run, no server started, no row added.
    capsys.readouterr()
    assert protocol_accuracy.main(argv) == 0
    assert "==" not in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2

    # accuracy_report reads the rows as those of a model, length and protocol, razor paired with full.
    summary = tmp_path / "summary.json"
    assert accuracy_report.main([str(out), "--summary", str(summary)]) == 0
    recs = json.loads(summary.read_text())
    rec = next(r for r in recs if r["method"] == "razor" and r["task"] == "passkey")
    assert (rec["model"], rec["length"], rec["protocol"], rec["n"]) == (
        "smollm2-135m-instruct", 1024, "vllm-serve whole-prompt", 1)
    assert rec["delta_vs_full"] == float(rows[1]["correct"]) - float(rows[0]["correct"])
