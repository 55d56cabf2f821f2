#!/usr/bin/env bash
# Break a behaviour on purpose and show that the test which names it fails (issue #19: "each test
# fails when the behaviour it names is broken"). Each case: a one-line change to the shipped code
# (or, for the metrics case, to the one call the test must not swallow), the test, the expected
# failure; the file is restored from git afterwards. Prints one line per case and exits non-zero if
# a test passed with its behaviour broken. Slow (engines); run alone on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
fails=0
ONLY=${1:-}  # a case name: run only that one
case_() {  # name file python-replace-old python-replace-new test-id
  local name=$1 file=$2 old=$3 new=$4 test=$5
  [ -z "$ONLY" ] || [[ ",$ONLY," == *",$name,"* ]] || return 0
  "$PY" - "$file" "$old" "$new" <<'PYEOF' || { echo "MUTATION NOT APPLIED: $name"; fails=1; return; }
import sys
path, old, new = sys.argv[1:]
s = open(path).read()
assert s.count(old) == 1, f"{old!r} occurs {s.count(old)} times in {path}"
open(path, "w").write(s.replace(old, new))
PYEOF
  if "$PY" -m pytest -q -x -p no:cacheprovider "$test" > "out/mutation_$name.log" 2>&1; then
    echo "PASSED WITH THE BEHAVIOUR BROKEN: $name ($test)"; fails=1
  else
    echo "failed as it must: $name ($test): $(grep -m1 -E '^E |Error' "out/mutation_$name.log" | cut -c1-160)"
  fi
  git checkout -q -- "$file"
}
mkdir -p out
case_ no-compression razor_vllm/config.py \
  '        return RazorConfig(**section)' \
  '        return RazorConfig(**{**section, "window": 2048})' \
  tests/vllm_backend/test_backend_paged.py::test_paged_equals_uniform_chunked_prefill
case_ metrics-unavailable tests/vllm_backend/test_backend_paged.py \
  'for m in llm.get_metrics() if' 'for m in llm.get_metrics_gone() if' \
  tests/vllm_backend/test_backend_paged.py::test_paged_preemption
case_ compiled-differs razor_vllm/vllm/backend.py \
  '        return self.strategy.forward(layer, query, key, value, kv_cache, attn_metadata, output)' \
  '        out = self.strategy.forward(layer, query, key, value, kv_cache, attn_metadata, output)
        if not self._vllm_config.model_config.enforce_eager:  # MUTATION: compiled mode attends differently
            out.mul_(0.5)
        return out' \
  tests/vllm_backend/test_backend_paged.py::test_compiled_mode_equals_eager
case_ demo-exit-code razor_vllm/serve/demo.py \
  '        return 1
    print("demo OK")' '        return 0
    print("demo OK")' \
  tests/serve/test_demo.py::test_demo_exits_1_on_a_wrong_answer
case_ profile-drift razor_vllm/heads.py '    seed: int = 42' '    seed: int = 43' \
  tests/profile/test_make_profile.py
exit $fails
