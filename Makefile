# razor-vllm: `make demo` serves the default model with RazorAttention through `vllm serve` and asks it
# a long-context question; `make test` runs the tests; `make profile` re-runs the head profiling.
# All set up .venv first (scripts/setup.sh; a no-op in seconds once done).
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m-instruct
export VLLM_TARGET_DEVICE ?= cpu
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: setup demo profile reproduce loadtest test test-heavy test-all models models-all check-cuda check-cuda-ci gpu-wheels profile-shipped clean

setup:
	@bash scripts/setup.sh

# Fetch the default model, use its shipped head config (profile it once if none ships), start
# `vllm serve --attention-backend razor` (paged KV layout) on 127.0.0.1, ask a ~6k-token passkey
# through the openai client, print the answer and the KV saving read from the server, stop it.
# Exits non-zero if anything failed (razor_vllm/serve/demo.py).
demo: setup
	$(BIN)/razor-vllm demo --model $(MODEL)

# Profile the default model's retrieval heads into out/, print the head table, and check the result
# reproduces the shipped config.
profile: setup
	$(BIN)/razor-vllm fetch-model $(MODEL)
	$(BIN)/razor-vllm profile $(MODEL) --out out/$(MODEL).json --plot out/$(MODEL).png \
		--compare razor_vllm/configs/$(MODEL).json

reproduce: profile

# Concurrent streaming clients, cancellations and over-long prompts against a real server, then
# checks the KV cache is empty again on /metrics (a few minutes; writes out/loadtest.json).
loadtest: setup
	$(BIN)/razor-vllm fetch-model $(MODEL)
	$(BIN)/python benchmarks/loadtest.py

# `make test` is CI's tier (.ci/run; 30-minute budget on 2 cores): every test except the heavy tier
# (tests/conftest.py HEAVY: minutes each, re-checking in another mode what a CI test covers), which
# `make test-heavy` runs; `make test-all` runs both, before an issue is resolved.
test: setup models
	$(BIN)/python -m pytest -q -ra --durations=25 -m "not heavy" tests

test-heavy: setup models-all
	$(BIN)/python -m pytest -q -ra --durations=0 -m heavy tests

test-all: setup models-all
	$(BIN)/python -m pytest -q -ra --durations=25 tests

# razor against the production CUDA wheel (vllm==0.33.0, installed --no-deps in a side venv cached under
# ~/.cache/razor-vllm; 336 MB once): its planner, config checks and interfaces on CPU tensors, and the
# KV capacity on production shapes (out/capacity_shapes_vllm0.33.0.json). No CUDA kernel runs here.
check-cuda: setup models
	bash scripts/check_cuda.sh $(CHECK_CUDA_ARGS)

# CI's share of check-cuda (CI must stay under 30 minutes): the heavy-tier harness configurations
# (tests/conftest.py HEAVY) are left out; `make check-cuda` runs them all, before every resolve.
check-cuda-ci:
	$(MAKE) check-cuda CHECK_CUDA_ARGS='-m "not heavy"'

# The wheels scripts/gpu_check.sh needs on the GPU machine (no network there; carried as .whl/):
# pydantic and its parts for CPython 3.11-3.13, and pytest's pure-Python stack (a few MB).
GPU_PURE := annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 pydantic==2.14.4 \
	pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4
gpu-wheels: setup
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .whl $(GPU_PURE)
	for v in 3.11 3.12 3.13; do $(BIN)/python -m pip download -q --no-deps --only-binary=:all: \
		--python-version $$v --platform manylinux2014_x86_64 -d .whl pydantic-core==2.50.5 || exit 1; done

# Gemma 3 (a second architecture, with sliding-window layers) is fetched too, so that the tests of
# the worker-side refusal and the three-process shutdown run instead of skipping (~240 MB, cached).
models:
	$(BIN)/razor-vllm fetch-model $(MODEL)
	$(BIN)/razor-vllm fetch-model gemma3-270m

# + Qwen2.5-Coder-0.5B-Instruct (491 MB, ~2 min to convert): the heavy tier's second-model tests
models-all: models
	$(BIN)/razor-vllm fetch-model qwen2.5-coder-0.5b-instruct

# Re-create the shipped head config (commit the result together with the change that required it).
profile-shipped: setup
	$(BIN)/razor-vllm profile $(MODEL) --out razor_vllm/configs/$(MODEL).json --plot docs/$(MODEL)-heads.png

clean:
	rm -rf out .pytest_cache
