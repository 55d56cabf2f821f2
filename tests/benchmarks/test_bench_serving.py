"""benchmarks/serving/ (`python -m benchmarks.serving`): the physical-limit arithmetic that
docs/performance.md prints beside every measurement (`limits`), checked against the formulas written
out by hand for SmolLM2-135M (30 layers x 3 KV heads x head_dim 64, fp32) and the shipped head config
(14 retrieval KV heads); merging and reloading measured runs (`grid`); reading a server's log
(`servers`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks.serving import grid, limits, servers
from razor_vllm.paths import default_model_dir

REPO = Path(__file__).resolve().parents[2]
SMOL = default_model_dir()


@pytest.fixture(scope="module")
def facts():
    if not (SMOL / "config.json").exists():
        pytest.skip(f"SmolLM2 not found at {SMOL}: run `razor-vllm fetch-model smollm2-135m-instruct`")
    return limits.model_facts(SMOL, "smollm2-135m-instruct", window=256, sinks=4, dtype_bytes=4,
                             max_model_len=8192)


def test_model_facts(facts):
    assert (facts["layers"], facts["kv_heads"], facts["q_heads"], facts["head_dim"]) == (30, 3, 9, 64)
    assert facts["retrieval_heads"] == 14 and facts["local_heads"] == 76
    assert abs(facts["params"] - 134.5e6) < 0.1e6  # SmolLM2-135M, tied embeddings


@pytest.mark.parametrize("ctx,batch", [(1088, 1), (4160, 8), (8064, 8), (100, 1)])
def test_decode_limits_match_the_hand_formulas(facts, ctx, batch):
    lim = limits.decode_limits(facts, ctx, batch)
    stock_kv = 30 * 3 * 2 * 64 * 4 * ctx  # layers x kv heads x (K, V) x head_dim x 4 B x T
    kept = min(ctx, 4 + 256 + 1)  # sinks + window + compensation token
    razor_kv = 2 * 64 * 4 * (14 * ctx + 76 * kept)
    assert lim["kv_bytes_per_seq"] == {"stock": stock_kv, "razor": razor_kv}
    weights = facts["step_weight_params"] * 4
    assert lim["bytes_per_step"]["stock"] == weights + batch * stock_kv
    assert lim["bound_speedup_bytes"] == pytest.approx((weights + batch * stock_kv) / (weights + batch * razor_kv))
    # attention FLOPs per token: 4 x head_dim per (query head, key) -> 9 query heads = 3 KV x group 3
    assert lim["flops_per_token"]["stock"] - 2 * facts["step_weight_params"] == 4 * 64 * 3 * 90 * ctx
    if ctx < 261:  # nothing evicted yet: razor reads what stock reads
        assert lim["kv_bytes_per_seq"]["razor"] == stock_kv


# ---- --render with several files: merging runs into one grid -----------------------------------
def _run(backend, length, conc, out_tok_s, rep=0, t=0.0):
    metrics = {"output_tok_s": out_tok_s, "total_tok_s": out_tok_s, "ttft_mean_s": 1.0, "tpot_mean_ms": 10.0,
               "steady_decode_tok_s": None, "out_tok_per_cpu_s": None}
    return {**metrics, "backend": backend, "input_len": length, "concurrency": conc, "rep": rep,
            "loadavg_before": [1.0, 1.0, 1.0], "wall_clock": t}


def _server(backend, port, kv=6):
    cmd = ["/venv/bin/python", "-m", "razor_vllm.vllm.cli_shim", "serve", "m", "--port", str(port), "--dtype", "float32"]
    return {"backend": backend, "spec": backend, "cmd": cmd, "kv_space_gib": kv, "kv_cache_tokens": 1000}


def _part(runs, ports=(8410, 8411), git="abc", razor_kv=6):
    return {"backends": ["stock", "razor"], "specs": ["stock", "razor"], "runs": runs, "model": {},
            "servers": [_server("stock", ports[0]), _server("razor", ports[1], razor_kv)],
            "machine": {"git": git}, "timing": {"total_s": 10.0, "startup_s": 2.0, "grid_s": 8.0}}


def test_merge_pairs_only_runs_of_the_same_source_and_later_files_replace_cells():
    a = _part([_run("stock", 1024, 1, 10.0, t=1), _run("razor", 1024, 1, 9.0, t=2),
               _run("stock", 4096, 8, 2.0, t=3), _run("razor", 4096, 8, 3.0, t=4)], git="old")
    # b: other ports (same servers otherwise); re-measures 1k x 1 twice and adds 8k x 8
    b = _part([_run("stock", 1024, 1, 10.0, rep=0, t=5), _run("razor", 1024, 1, 10.0, rep=0, t=6),
               _run("razor", 1024, 1, 12.0, rep=1, t=7), _run("stock", 1024, 1, 10.0, rep=1, t=8),
               _run("stock", 8000, 8, 1.0, t=9), _run("razor", 8000, 8, 2.0, t=10)], ports=(9000, 9001), git="new")
    merged = grid.merge_runs([a, b], ["a.json", "b.json"])
    cells = {(c["input_len"], c["concurrency"]): c for c in grid.build_cells(merged["runs"], merged["backends"])}
    assert list(cells) == [(1024, 1), (4096, 8), (8000, 8)]  # sorted, each cell once
    # 1k x 1 comes from b only: geometric mean of its two side-by-side pairs, 1.0 and 1.2
    assert cells[(1024, 1)]["ratios"]["razor"]["output_tok_s"] == pytest.approx((1.0 * 1.2) ** 0.5)
    assert cells[(4096, 8)]["ratios"]["razor"]["output_tok_s"] == pytest.approx(1.5)
    assert cells[(8000, 8)]["ratios"]["razor"]["output_tok_s"] == pytest.approx(2.0)
    assert {r["source"] for r in merged["runs"] if r["input_len"] == 1024} == {"b.json"}
    assert [s["git"] for s in merged["timing"]["sources"]] == ["old", "new"]
    assert merged["timing"]["total_s"] == 20.0


def test_merge_refuses_runs_of_servers_started_differently():
    a = _part([_run("stock", 1024, 1, 10.0), _run("razor", 1024, 1, 9.0)])
    b = _part([_run("stock", 8000, 8, 1.0), _run("razor", 8000, 8, 2.0)], razor_kv=3)
    with pytest.raises(SystemExit, match="started differently"):
        grid.merge_runs([a, b], ["a.json", "b.json"])


def test_load_run_reads_checkpoints_and_finished_runs_alike(tmp_path):
    part = _part([_run("stock", 1024, 1, 10.0), _run("razor", 1024, 1, 9.0)])
    (tmp_path / "x.partial.json").write_text(json.dumps(part))
    finished = {"config": {"backends": part["backends"], "backend_specs": part["specs"]},
                **{k: part[k] for k in ("servers", "runs", "machine", "model", "timing")}, "cells": []}
    (tmp_path / "x.json").write_text(json.dumps(finished))
    a, b = grid.load_run(tmp_path / "x.partial.json"), grid.load_run(tmp_path / "x.json")
    assert a["timing"].pop("interrupted") is True and "interrupted" not in b["timing"]
    assert a == b


# ---- the server log: vLLM's KV capacity line (razor_vllm.serve.process.parse_kv_capacity_log) --------
def test_parse_server_log_reads_the_kv_capacity_line(tmp_path):
    log = tmp_path / "razor.log"
    log.write_text("INFO 01-01 00:00:00 [kv_cache_utils.py:1] CPU KV cache size: 123,456 tokens, Maximum "
                   "concurrency for 8,192 tokens per request: 15.07x\n"
                   "INFO razor KV layout: paged, 14 retrieval heads\n"
                   "INFO Reducing Torch threads from 4 to 2\n")
    assert servers.parse_server_log(log) == {"kv_cache_tokens": 123456, "max_concurrency": 15.07,
                                             "layout": "razor KV layout: paged, 14 retrieval heads",
                                             "torch_threads": 2}
    from razor_vllm.serve.process import parse_kv_capacity_log

    cap = parse_kv_capacity_log(log.read_text())
    assert cap["max_model_len"] == 8192 and cap["log_line"].startswith("CPU KV cache size: 123,456 tokens")
    assert parse_kv_capacity_log("no such line") is None
