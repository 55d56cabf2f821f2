"""The container entrypoint's logic (`docker/entrypoint.sh` runs `razor-vllm container-serve "$@"`):
environment -> a validated `vllm serve MODEL --attention-backend razor --additional-config ...`
command, then exec. Settings go through `RazorConfig`, the one validator, so the image cannot
accept what the engine would refuse. Precedence (highest first): arguments given to the container
(appended last: vLLM keeps the last value of a repeated option), RAZOR_ADDITIONAL_CONFIG (the whole
JSON, verbatim), RAZOR_HEAD_CONFIG / RAZOR_WINDOW / RAZOR_SINKS / RAZOR_COMPENSATION /
RAZOR_RETRIEVAL / RAZOR_KV_LAYOUT / RAZOR_WHOLE_PROMPT_PREFILL, then RazorConfig's defaults. MODEL has no default. Any invalid
setting exits 2 before vLLM starts.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from razor_vllm.config import RazorConfig, RazorConfigError, parse_razor_config

PREFIX = "razor-vllm entrypoint: error: "
DEFAULT_HEAD_CONFIG = "smollm2-135m-instruct"
# environment variable -> RazorConfig field (the variables a container sets one by one)
ENV_FIELDS = {"RAZOR_HEAD_CONFIG": "head_config", "RAZOR_WINDOW": "window", "RAZOR_SINKS": "sinks",
              "RAZOR_COMPENSATION": "compensation", "RAZOR_RETRIEVAL": "retrieval",
              "RAZOR_KV_LAYOUT": "kv_layout", "RAZOR_WHOLE_PROMPT_PREFILL": "whole_prompt_prefill"}
# always written, so that the logged command shows the effective budget
ALWAYS = ("head_config", "window", "sinks", "compensation")


class EntrypointError(ValueError):
    """A container setting that cannot be served; the message names the variable."""


def additional_config(env: Mapping[str, str]) -> dict:
    """The --additional-config JSON object for this environment (raises EntrypointError)."""
    raw = env.get("RAZOR_ADDITIONAL_CONFIG", "").strip()
    if raw:
        try:
            cfg = json.loads(raw)
        except ValueError as e:
            raise EntrypointError(f"RAZOR_ADDITIONAL_CONFIG is not valid JSON ({e}): {raw}") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("razor"), dict):
            raise EntrypointError('RAZOR_ADDITIONAL_CONFIG must be a JSON object with a "razor" object, e.g. '
                                  '{"razor": {"head_config": "/configs/heads.json", "window": 256}}; got: ' + raw)
        try:
            parse_razor_config(cfg)
        except RazorConfigError as e:
            raise EntrypointError(f"RAZOR_ADDITIONAL_CONFIG: {e}") from None
        return cfg
    given = {field: env[var].strip() for var, field in ENV_FIELDS.items() if env.get(var, "").strip()}
    given.setdefault("head_config", DEFAULT_HEAD_CONFIG)
    try:
        cfg = RazorConfig(**given)
    except Exception as e:  # pydantic's ValidationError: name the variables it is about
        bad = [var for var, field in ENV_FIELDS.items() if field in str(e) and field in given]
        raise EntrypointError(f"{', '.join(bad) or 'RAZOR_*'} invalid: {e}") from None
    razor = {f: getattr(cfg, f) for f in ALWAYS}
    razor.update({f: getattr(cfg, f) for f in given if f not in ALWAYS})
    return {"razor": razor}


def serve_argv(env: Mapping[str, str], args: Sequence[str]) -> list[str]:
    """`vllm serve ...` for this environment and the container's arguments."""
    model = env.get("MODEL", "").strip()
    if not model:
        raise EntrypointError("MODEL is not set. Set it to the model to serve, e.g. "
                              "-e MODEL=/models/smollm2-135m-instruct (a Hugging Face model directory mounted "
                              "under /models) or a Hugging Face model id.")
    port = env.get("PORT", "").strip() or "8000"
    if not port.isdigit():
        raise EntrypointError(f"PORT must be a TCP port number, got '{port}'")
    return ["vllm", "serve", model, "--host", "0.0.0.0", "--port", port, "--attention-backend", "razor",
            # razor turns vLLM's prefix-caching default off by itself; the image says so explicitly
            "--no-enable-prefix-caching",
            "--additional-config", json.dumps(additional_config(env)), *args]


def main(args: Sequence[str]) -> int:
    try:
        argv = serve_argv(os.environ, args)
    except EntrypointError as e:
        sys.stderr.write(PREFIX + str(e) + "\n")
        return 2
    sys.stderr.write("razor-vllm entrypoint: " + shlex.join(argv) + "\n")
    sys.stderr.flush()
    os.execvp(argv[0], argv)
    return 0  # not reached
