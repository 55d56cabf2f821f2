"""Set once for the whole session, before any test module imports vLLM or Triton: the CPU platform
for vLLM and the Triton interpreter (kernels run on CPU tensors here). Plus the shared model fixture.
tests/ is on sys.path (this conftest's folder), so helpers import as `support.*`."""

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen when @triton.jit runs: before any import of it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import pytest  # noqa: E402

from razor_vllm.paths import default_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The default model's HF directory (`razor-vllm fetch-model`; `make test` fetches it)."""
    path = default_model_dir()
    if not (path / "config.json").exists():
        pytest.skip("run `razor-vllm fetch-model smollm2-135m-instruct` first (make test does)")
    return path


# The heavy tier: tests that take minutes each on 2 cores and re-check, in another mode, behaviour
# that a CI-tier test already covers. `make test` (CI, 30-minute budget) deselects them;
# `make test-heavy` runs only them and `make test-all` runs everything (before an issue is
# resolved). One list, so the split is visible and changed in one place; each entry says what
# covers its behaviour in the CI tier.
HEAVY = {
    # compiled mode: the README block test (CI tier) runs the compiled default and checks its answer
    "tests/vllm_backend/test_backend_paged.py::test_compiled_mode_equals_eager",
    # the chunked protocol (vLLM's default) stays in CI; whole-prompt prefill is the paged==uniform
    # one-chunk test's protocol in CI
    "tests/vllm_backend/test_vllm_e2e.py::test_fp32_vllm_equals_hf_in_both_protocols[exact-prefill]",
    # stock vLLM through the console script: the README block (CI) goes through the same script
    "tests/serve/test_console_script.py::test_stock_vllm_serve_through_the_console_script",
    # the demo's success path stays in CI; the exit code on a wrong answer starts a second server
    "tests/serve/test_demo.py::test_demo_exits_1_on_a_wrong_answer",
    # the bf16 uniform layout vs the oracle (loose bound): the fp32 paged-vs-oracle test (CI) is
    # the tight one
    "tests/vllm_backend/test_vllm_e2e.py::test_shipped_config_matches_hf_oracle",
    # all heads retrieval == stock vLLM: the HF identity tests (CI, both protocols) pin the oracle to
    # stock, and the fp32 test (CI) pins vLLM to the oracle
    "tests/vllm_backend/test_vllm_e2e.py::test_retrieval_all_equals_stock_vllm",
    # chunked prefill: the fp32 paged-vs-oracle test (CI) runs the paged layout in 512-token chunks
    "tests/vllm_backend/test_backend_paged.py::test_paged_equals_uniform_chunked_prefill",
    # the entrypoint's argument building runs in CI against a stub vllm (tests/test_docker.py); this
    # one serves for real
    "tests/serve/test_console_script.py::test_docker_entrypoint_serves",
    # the profile of the real model: the profiler's tests (CI) check the scores against brute force
    # and the selection rule on planted heads; this re-runs `make profile` on SmolLM2 (70 s)
    "tests/profile/test_make_profile.py::test_make_profile_reproduces_the_shipped_config",
    # `make demo`: the README serving block (CI) serves the same model and answers a 4k passkey
    "tests/serve/test_demo.py::test_demo_succeeds_and_reports_the_saving",
    # streaming clients, cancellations and over-long prompts against a server (`make loadtest`)
    "tests/serve/test_loadtest.py::test_loadtest_small",
    # the second model (issue #18) needs `make models-all` (491 MB); SmolLM2 and Gemma cover the
    # conversion in CI
    "tests/test_fetch.py::test_converted_qwen_loads_and_answers_in_chat_form",
    # ... and served by razor through vLLM; the serving path itself is SmolLM2's README block (CI)
    "tests/serve/test_vllm_serve_qwen.py::test_passkey_outside_the_window_through_the_openai_client",
    "tests/serve/test_vllm_serve_qwen.py::test_kv_figures_are_qwens",
    # config-time refusals through a real subprocess: all of them run in-process in CI
    # (tests/vllm_backend/test_engine_checks.py, same command lines, same messages); CI keeps four
    # here (no razor section, another model's config, prefix caching, the worker-side gemma case)
    "tests/serve/test_serve_startup.py::test_refused_at_startup_with_a_clear_message[corrupt-head-config]",
    "tests/serve/test_serve_startup.py::test_refused_at_startup_with_a_clear_message[missing-head-config]",
    "tests/serve/test_serve_startup.py::test_refused_at_startup_with_a_clear_message[smollm2-config-on-gemma]",
    "tests/serve/test_serve_startup.py::test_refused_at_startup_with_a_clear_message[invalid-razor-setting]",
    "tests/serve/test_serve_startup.py::test_refused_at_startup_with_a_clear_message[kv-cache-dtype-fp8]",
    "tests/serve/test_serve_startup.py::test_refused_at_startup_with_a_clear_message[paged-without-hybrid-manager]",
    "tests/serve/test_serve_startup.py::test_refused_at_startup_with_a_clear_message[speculative-decoding]",
    "tests/serve/test_serve_startup.py::test_refused_at_startup_with_a_clear_message[kv-connector]",
    "tests/serve/test_serve_startup.py::test_refused_at_startup_with_a_clear_message[paged-with-pipeline-parallel]",
    # the vLLM-side accuracy harness (two `vllm serve` starts): the README block (CI) serves through the
    # same RazorServer and client; accuracy_report's own test (CI) covers the summary schema
    "tests/benchmarks/test_protocol_accuracy.py::test_serve_rows_pair_with_the_hf_suite_and_resume",
    # the passkey through whole-prompt prefill and the openai client: the README block (CI) answers
    # a 4k passkey through the client in vLLM's default chunking; the one-chunk paged==uniform test
    # (CI) covers whole-prompt prefill in the engine
    "tests/serve/test_vllm_serve.py::test_passkey_at_4k_outside_the_window",
    # the GPU profile's score path on the real model: CI checks it against the fused path on a tiny
    # model (test_fused_and_chunked_paths_agree) and its device handling on the meta device
    "tests/profile/test_profiler.py::test_chunked_path_gives_the_shipped_smollm2_heads",
    # the triton path (interpreted) in the real vllm-cpu engine == the cpu path, four schedules
    # (~2.5 min): CI runs the same forward through vLLM 0.33's runner code step by step against the
    # oracle (tests/cuda/test_mrv2_paged.py in `make check-cuda`)
    "tests/vllm_backend/test_paged_triton_engine.py::test_triton_equals_cpu_whole_prompt_prefill",
    "tests/vllm_backend/test_paged_triton_engine.py::test_triton_equals_cpu_chunked_prefill",
    "tests/vllm_backend/test_paged_triton_engine.py::test_triton_equals_cpu_many_concurrent_mixed_lengths",
    "tests/vllm_backend/test_paged_triton_engine.py::test_triton_equals_cpu_preemption",
    # two of the four MRv2-harness configurations (`make check-cuda` runs all; CI's check-cuda-ci
    # keeps fp32 with vLLM's unified_attention siblings and bf16, both S = 4, W = 8, and the audit)
    "tests/cuda/test_mrv2_paged.py::test_schedule_replays_against_the_oracle_and_ring_step[fp32-S0-W8-count]",
    "tests/cuda/test_mrv2_paged.py::test_schedule_replays_against_the_oracle_and_ring_step[fp32-S2-W1-single-razor-siblings]",
}


def pytest_collection_modifyitems(config, items):
    root = config.rootpath
    names = set()
    for item in items:
        nodeid = item.nodeid if item.nodeid.startswith("tests/") else f"tests/{item.nodeid}"
        names.add(nodeid)
        if nodeid in HEAVY:
            item.add_marker(pytest.mark.heavy)
    # a renamed test would silently leave the heavy tier; only checked when the whole suite is collected
    if len({i.nodeid.split("::")[0] for i in items}) > 20:
        missing = {h for h in HEAVY if h not in names}
        assert not missing, f"tests/conftest.py HEAVY names tests that do not exist: {sorted(missing)} ({root})"
