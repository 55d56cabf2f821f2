# razor-vllm: `make demo` runs the main job on the default model, `make test` runs the tests.
# Both set up .venv first (scripts/setup.sh; a no-op in seconds once done).
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m-instruct
export VLLM_TARGET_DEVICE ?= cpu
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: setup demo test test-fast profile-shipped clean

setup:
	@bash scripts/setup.sh

# Fetch the default model, profile its retrieval heads, print the head table, and check the result
# reproduces the shipped config.
demo: setup
	$(BIN)/razor-vllm fetch-model $(MODEL)
	$(BIN)/razor-vllm profile $(MODEL) --out out/$(MODEL).json --plot out/$(MODEL).png \
		--compare configs/$(MODEL).json

test: setup
	$(BIN)/razor-vllm fetch-model $(MODEL)
	$(BIN)/python -m pytest -q -ra tests

# Re-create the shipped head config (commit the result together with the change that required it).
profile-shipped: setup
	$(BIN)/razor-vllm profile $(MODEL) --out configs/$(MODEL).json --plot docs/$(MODEL)-heads.png

clean:
	rm -rf out .pytest_cache
