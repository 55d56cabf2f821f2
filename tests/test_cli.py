"""The `razor-vllm` command line (run as a real subprocess where it matters)."""

import json
import subprocess
import sys

from razor_vllm.cli import main
from razor_vllm.heads import load_head_config
from razor_vllm.heads import select_retrieval_heads

SHIPPED = "smollm2-135m-instruct"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "razor_vllm.cli", *args], capture_output=True, text=True)


def test_fetch_model_lists_the_registry():
    out = _run("fetch-model", "--list")
    assert out.returncode == 0 and SHIPPED in out.stdout and "Apache-2.0" in out.stdout


def test_unknown_model_is_a_clear_error():
    out = _run("fetch-model", "no-such-model")
    assert out.returncode == 2 and "unknown model 'no-such-model'" in out.stderr and SHIPPED in out.stderr


def test_profile_of_a_missing_dir_is_a_clear_error(tmp_path):
    out = _run("profile", str(tmp_path / "nope"), "--quiet")
    assert out.returncode == 2 and "neither a directory nor a fetchable model" in out.stderr


def test_select_reproduces_and_changes_the_selection(tmp_path):
    shipped = load_head_config(SHIPPED)
    same = tmp_path / "same.json"
    assert main(["select", SHIPPED, "--induction-ratio", "0.14", "--out", str(same)]) == 0
    assert load_head_config(same).compare(shipped) == []
    wider = tmp_path / "wider.json"
    assert main(["select", SHIPPED, "--induction-ratio", "0.25", "--out", str(wider)]) == 0
    cfg = load_head_config(wider)
    assert cfg.profile.induction_ratio == 0.25
    assert cfg.retrieval_heads == select_retrieval_heads(shipped.induction_scores, shipped.echo_scores, 0.25, 0.01)
    assert cfg.num_retrieval > shipped.num_retrieval
    assert all(set(a) <= set(b) for a, b in zip(shipped.retrieval_heads, cfg.retrieval_heads))


def test_compare_configs_reports_score_drift(tmp_path):
    raw = json.loads(load_head_config(SHIPPED).model_dump_json())
    raw["echo_scores"][0][0] += 1e-4
    path = tmp_path / "drift.json"
    path.write_text(json.dumps(raw))
    problems = load_head_config(path).compare(load_head_config(SHIPPED))
    assert len(problems) == 1 and "echo_scores" in problems[0]


def test_fix_vllm_cli_is_idempotent():
    first, second = _run("fix-vllm-cli"), _run("fix-vllm-cli")
    assert first.returncode == 0 and second.returncode == 0
    assert "already fixed" in second.stdout or "real `vllm`" in second.stdout
