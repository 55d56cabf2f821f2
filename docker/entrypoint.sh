#!/bin/sh
# razor-vllm container entrypoint: serves $MODEL with RazorAttention through vLLM's OpenAI server,
#
#   vllm serve "$MODEL" --host 0.0.0.0 --port "$PORT" --attention-backend razor \
#       --no-enable-prefix-caching --additional-config '{"razor": {...}}' "$@"
#
# The command is built and validated by razor_vllm/serve/entrypoint.py (through RazorConfig, the
# engine's own validator), which then execs vllm. Settings, highest precedence first: arguments
# given to the container (appended last); RAZOR_ADDITIONAL_CONFIG (the whole JSON, verbatim);
# RAZOR_HEAD_CONFIG, RAZOR_WINDOW, RAZOR_SINKS, RAZOR_COMPENSATION, RAZOR_RETRIEVAL,
# RAZOR_KV_LAYOUT; then the defaults. MODEL and PORT are read there too. Any invalid setting
# exits 2 before vLLM starts.
set -eu
exec razor-vllm container-serve "$@"
