#!/bin/sh
# razor-vllm container entrypoint: serves $MODEL with RazorAttention through vLLM's OpenAI server.
#
#   vllm serve "$MODEL" --host 0.0.0.0 --port "$PORT" --attention-backend razor \
#       --no-enable-prefix-caching --additional-config '{"razor": {...}}' "$@"
#
# Settings, highest precedence first:
#   1. arguments given to the container (`docker run IMAGE --max-model-len 4096`, compose `command:`):
#      appended last, and vLLM keeps the last value of a repeated option, so they override anything
#      below (including --port and --additional-config; change PORT rather than --port so that
#      HEALTHCHECK and EXPOSE still match).
#   2. RAZOR_ADDITIONAL_CONFIG: the whole --additional-config JSON, verbatim (validated: a JSON object
#      with a "razor" object). When set, the RAZOR_* variables of 3. are ignored.
#   3. RAZOR_HEAD_CONFIG, RAZOR_WINDOW, RAZOR_SINKS, RAZOR_COMPENSATION, RAZOR_RETRIEVAL (optional).
#   4. the image's ENV defaults, which equal the defaults below.
# MODEL has no default: a missing MODEL exits 2 before vLLM starts, as does any invalid setting.
set -eu

die() {
    echo "razor-vllm entrypoint: error: $*" >&2
    exit 2
}

if [ -z "${MODEL:-}" ]; then
    die "MODEL is not set. Set it to the model to serve, e.g. -e MODEL=/models/smollm2-135m-instruct" \
        "(a Hugging Face model directory mounted under /models) or a Hugging Face model id."
fi

PORT=${PORT:-8000}
case $PORT in
    '' | *[!0-9]*) die "PORT must be a TCP port number, got '$PORT'" ;;
esac

# The JSON is built by Python, never by string pasting: a head config path may hold quotes,
# backslashes or spaces. Errors go to stderr and exit 2.
ADDITIONAL_CONFIG=$(${RAZOR_PYTHON:-python3} -c '
import json, os, sys

def fail(msg):
    sys.stderr.write("razor-vllm entrypoint: error: " + msg + "\n")
    sys.exit(2)

raw = os.environ.get("RAZOR_ADDITIONAL_CONFIG", "").strip()
if raw:
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        fail("RAZOR_ADDITIONAL_CONFIG is not valid JSON (%s): %s" % (e, raw))
    if not isinstance(cfg, dict) or not isinstance(cfg.get("razor"), dict):
        fail("RAZOR_ADDITIONAL_CONFIG must be a JSON object with a \"razor\" object, e.g. "
             "{\"razor\": {\"head_config\": \"/configs/heads.json\", \"window\": 256}}; got: " + raw)
else:
    def integer(name, default, low):
        value = os.environ.get(name, "").strip() or default
        try:
            n = int(value)
        except ValueError:
            n = None
        if n is None or n < low:
            fail("%s must be an integer >= %d, got %r" % (name, low, value))
        return n

    head = os.environ.get("RAZOR_HEAD_CONFIG", "").strip() or "smollm2-135m-instruct"
    compensation = os.environ.get("RAZOR_COMPENSATION", "").strip() or "single"
    if compensation not in ("none", "single", "count"):
        fail("RAZOR_COMPENSATION must be one of none, single, count; got %r" % compensation)
    razor = {"head_config": head, "window": integer("RAZOR_WINDOW", "256", 1),
             "sinks": integer("RAZOR_SINKS", "4", 0), "compensation": compensation}
    retrieval = os.environ.get("RAZOR_RETRIEVAL", "").strip()
    if retrieval:
        if retrieval not in ("config", "all", "none"):
            fail("RAZOR_RETRIEVAL must be one of config, all, none; got %r" % retrieval)
        razor["retrieval"] = retrieval
    cfg = {"razor": razor}
print(json.dumps(cfg))
') || exit 2

echo "razor-vllm entrypoint: vllm serve $MODEL --port $PORT --additional-config $ADDITIONAL_CONFIG $*" >&2
exec vllm serve "$MODEL" \
    --host 0.0.0.0 \
    --port "$PORT" \
    --attention-backend razor \
    --no-enable-prefix-caching \
    --additional-config "$ADDITIONAL_CONFIG" \
    "$@"
