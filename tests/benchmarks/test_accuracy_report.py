"""benchmarks.accuracy_report: rows -> the summary schema, markdown tables and the Pareto plot."""

import json

from benchmarks import accuracy_report

FIELDS = {"model", "task", "length", "protocol", "method", "n", "accuracy", "kv_fraction", "delta_vs_full",
          "delta_ci95", "flip_share", "settings"}


def _row(i, label, correct, kv):
    method = label.split()[0]
    return {"sample": f"passkey/4096/{i}", "task": "passkey", "length": 4096, "protocol": "exact-prefill",
            "label": label, "method": method, "correct": correct, "kv_fraction": kv, "sinks": 64, "window": 256,
            "compensation": "single", "retrieval_fraction": 0.15,
            "setting": None if method == "full" else {"induction_ratio": 0.14}}


def test_report_writes_the_summary_schema_and_tables(tmp_path, capsys):
    rows = tmp_path / "mymodel_4096.jsonl"
    lines = []
    for i in range(10):
        lines += [_row(i, "full", True, 1.0), _row(i, "razor s64 w256 single r0.14", i != 3, 0.22),
                  _row(i, "streaming s64 w844", i < 2, 0.22)]
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary, png = tmp_path / "s.json", tmp_path / "p.png"
    assert accuracy_report.main([str(rows), "--summary", str(summary), "--plot", str(png)]) == 0
    recs = json.loads(summary.read_text())
    assert all(FIELDS <= set(r) for r in recs) and {r["model"] for r in recs} == {"mymodel"}
    razor = next(r for r in recs if r["task"] == "mean" and r["method"] == "razor")
    assert (razor["n"], razor["accuracy"], razor["delta_vs_full"], razor["flip_share"]) == (10, 0.9, -0.1, 0.1)
    md = capsys.readouterr().out
    assert "| razor s64 w256 single r0.14 * | 10 | 22.0 % | 90.0 % | -10.0 [" in md
    assert png.stat().st_size > 1000
